"""`styleray demo` end to end on a tiny budget, as a user runs it (a subprocess, its own local Ray cluster):
raw images -> prepare (Ray Data) -> train (Ray Train, 2 workers) -> Ray Serve -> grid PNG and morph GIF over
HTTP. A second run in the same folder skips the finished work, serves until Ctrl-C, and its printed URLs
(web page, API docs, Ray dashboard) answer."""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from styleray.demo import DemoConfig, make_raw, pick_port


STYLERAY = os.path.join(os.path.dirname(sys.executable), "styleray")
RESOLUTION, IMAGES, KIMG = 16, 48, 0.064


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "STYLERAY_API_KEY")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _demo_argv(out, port, *extra) -> list[str]:
    return [STYLERAY, "demo", "--out", str(out), "--images", str(IMAGES), "--resolution", str(RESOLUTION),
            "--kimg", str(KIMG), "--port", str(port), *extra]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    t0 = time.monotonic()
    done = subprocess.run(_demo_argv(out, _free_port(), "--no-wait"), env=_env(), capture_output=True, text=True,
                          timeout=300)
    return out, done, time.monotonic() - t0


@pytest.mark.parametrize("kwargs, message", [
    ({"images": 8}, "--images 8 must be >= 16"),
    ({"resolution": 24}, "--resolution 24 must be a power of two"),
    ({"kimg": 0}, "--kimg 0 must be > 0"),
    ({"port": 70000}, "--port 70000 must lie in 0-65535"),
    ({"raw_size": 32}, "--raw-size 32 must lie within 64..2048"),
])
def test_bad_settings_are_refused_with_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DemoConfig(**kwargs)


def test_a_taken_port_is_refused_before_any_work():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ValueError, match=f"--port {s.getsockname()[1]} is in use"):
            pick_port(s.getsockname()[1])
    assert pick_port(0) > 0


def test_a_raw_folder_the_demo_did_not_make_is_left_alone(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "mine.png").write_bytes(b"precious")
    with pytest.raises(ValueError, match="was not made by styleray demo"):
        make_raw(DemoConfig(out=str(tmp_path)))
    assert (tmp_path / "raw" / "mine.png").read_bytes() == b"precious"


def test_raw_images_are_kept_remade_after_an_interruption_or_remade_for_new_settings(tmp_path):
    cfg = DemoConfig(out=str(tmp_path), images=16, raw_size=64)
    assert make_raw(cfg).startswith("made 16")
    assert make_raw(cfg).startswith("kept 16")
    stamp = tmp_path / "raw" / "demo-raw.json"
    stamp.write_text(stamp.read_text().replace("true", "false"))  # as if interrupted while making them
    assert make_raw(cfg).startswith("made 16")
    assert make_raw(DemoConfig(out=str(tmp_path), images=17, raw_size=64)).startswith("made 17")
    assert len(os.listdir(tmp_path / "raw" / "images")) == 17


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_no_wait_runs_every_stage_and_fetches_the_samples_over_http(first_run):
    out, done, seconds = first_run
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    for n, stage in enumerate(["raw", "prepare", "train", "serve", "fetch"], 1):
        assert f"[{n}/5] {stage}:" in done.stdout, done.stdout[-3000:]
    assert re.search(r"web page:\s+http://127\.0\.0\.1:\d+/", done.stdout)
    assert re.search(r"Ray dashboard:\s+http://127\.0\.0\.1:\d+", done.stdout)
    assert len(os.listdir(out / "raw" / "images")) == IMAGES
    side = 8 * RESOLUTION + 7 * 2  # 8 x 8 seeds, 2 px white between
    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG" and grid.size == (side, side) and grid.mode == "RGB"
    with Image.open(out / "morph.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 64 and gif.size == (RESOLUTION, RESOLUTION)
    assert seconds < 240


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_grid_is_the_trained_generators(first_run):
    """What came over HTTP are the served checkpoint's samples: seeds 0..63 at truncation 0.7."""
    from styleray.models import sampling
    from styleray.platform.checkpoint import load_generator

    out, done, _ = first_run
    assert done.returncode == 0
    G, ckpt = load_generator(str(out / f"run-{RESOLUTION}px"))
    assert ckpt.kimg >= KIMG
    expected = sampling.image_grid(sampling.generate_images(G, list(range(64)), truncation_psi=0.7), cols=8, pad=2)
    got = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _wait_for_line(lines: queue.Queue, pattern: str, seen: list[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            break
        if line is None:
            raise AssertionError("the demo exited early:\n" + "".join(seen[-60:]))
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n" + "".join(seen[-60:]))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_second_run_resumes_serves_until_ctrl_c_and_its_urls_answer(first_run):
    out, done, _ = first_run
    assert done.returncode == 0
    port = _free_port()
    proc = subprocess.Popen(_demo_argv(out, port), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        _wait_for_line(lines, r"serving; press Ctrl-C", seen, timeout=240)
        text = "".join(seen)
        assert f"kept {IMAGES} raw images" in text  # nothing redone
        assert "0 processed" in text and "already trained" in text
        urls = dict(re.findall(r"^\s+(web page|API docs|Ray dashboard):\s+(\S+)$", text, flags=re.M))
        assert urls["web page"] == f"http://127.0.0.1:{port}/" and urls["API docs"] == f"http://127.0.0.1:{port}/docs"
        for name, url in urls.items():
            with urllib.request.urlopen(url, timeout=60) as r:
                body = r.read()
                assert r.status == 200, name
                assert b"<html" in body.lower() or b"<!doctype html" in body.lower(), name
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/sample?seed=3", timeout=60) as r:
            assert Image.open(io.BytesIO(r.read())).size == (RESOLUTION, RESOLUTION)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=90) == 0, "".join(seen[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
