"""Shared by the serve tests: tiny checkpoints, a free port, image decoding, polling, the page in chromium."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from typing import Iterator

import numpy as np
from PIL import Image

from styleray.config import RunSpec, resolve_preset
from styleray.models.training import StyleGAN2Trainer
from styleray.platform.checkpoint import save_checkpoint

RESOLUTION = 32
CLASSES = 3


def make_checkpoint(run_dir: str, seed: int, cur_nimg: int, resolution: int = RESOLUTION, c_dim: int = CLASSES) -> str:
    """A freshly initialised cpu-tiny generator saved as a checkpoint (different seeds: different weights)."""
    model, train = resolve_preset(
        "cpu-tiny", resolution=resolution, c_dim=c_dim, train_overrides={"batch": 4, "seed": seed}
    )
    trainer = StyleGAN2Trainer(model, train)
    meta = {"cur_nimg": cur_nimg, "kimg": cur_nimg / 1000, "tick": 0}
    return save_checkpoint(run_dir, trainer.state_dict(), config=RunSpec(model, train).to_dict(), meta=meta)


def make_broken_checkpoint(run_dir: str, cur_nimg: int, how: str) -> str:
    """A checkpoint whose files are whole (hash fine, tensors load) but whose generator cannot be served:
    ``unbuildable``: its model config does not fit its weights (the network cannot be built from them);
    ``nan``: the weights are NaN (the network builds, its samples are not finite)."""
    model, train = resolve_preset("cpu-tiny", resolution=RESOLUTION, c_dim=CLASSES, train_overrides={"batch": 4})
    state = StyleGAN2Trainer(model, train).state_dict()
    if how == "unbuildable":
        state["model_cfg"] = {**state["model_cfg"], "channel_max": state["model_cfg"]["channel_max"] // 2}
    elif how == "nan":
        state["G_ema"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in state["G_ema"].items()}
    else:
        raise ValueError(f"how={how!r}: unbuildable or nan")
    meta = {"cur_nimg": cur_nimg, "kimg": cur_nimg / 1000, "tick": 0}
    return save_checkpoint(run_dir, state, config=RunSpec(model, train).to_dict(), meta=meta)


@contextlib.contextmanager
def running_app(args) -> Iterator[str]:
    """The application for ``args`` (ServeArgs) on a private Ray cluster (2 CPUs), served on 127.0.0.1 by
    Ray's real HTTP proxy: its base URL. Shut down, with the cluster, on exit."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from styleray.serve.app import build_app

    if ray.is_initialized():  # a cluster left behind by an earlier module
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="styleray", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def frames(data: bytes) -> list[np.ndarray]:
    im = Image.open(io.BytesIO(data))
    out = []
    for i in range(getattr(im, "n_frames", 1)):
        im.seek(i)
        out.append(np.asarray(im.convert("RGB")))
    return out


def start_moto(log_path: str):
    """A moto S3 server on 127.0.0.1 (the moto_server next to this Python): (endpoint URL, process)."""
    import os
    import subprocess
    import sys
    import time

    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    log = open(log_path, "w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return f"http://127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto_server did not start; see {log_path}")


class SlowClients:
    """Connections that each send their headers and the first bytes of a declared 100-byte body, then
    nothing. One per source address (127.x.y.z all reach 127.0.0.1 on Linux)."""

    def __init__(self, port: int, sources: list[str], path: str = "/v1/samples", headers: str = ""):
        self.socks: list[socket.socket] = []
        self.codes: dict[socket.socket, int] = {}  # HTTP status answered so far (0: none yet, -1: not HTTP)
        request = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"seeds"'
        ).encode()
        for source in sources:
            s = socket.socket()
            self.socks.append(s)
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            s.sendall(request)
            self.codes[s] = 0

    def wait(self, deadline_s: float, want: int | None = None) -> list[int]:
        """Poll until ``want`` connections (default all) are answered or the deadline passes; their codes."""
        import select
        import time

        end = time.monotonic() + deadline_s
        want = len(self.socks) if want is None else want
        while sum(1 for c in self.codes.values() if c) < want and time.monotonic() < end:
            readable, _, _ = select.select([s for s, c in self.codes.items() if not c], [], [], 0.2)
            for s in readable:
                head = s.recv(64)
                self.codes[s] = int(head[9:12]) if head.startswith(b"HTTP/1.1 ") else -1
        return list(self.codes.values())

    def close(self) -> None:
        for s in self.socks:
            s.close()


def until(predicate, deadline_s: float, what: str, poll_s: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned), failing after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out after {deadline_s} s waiting for {what}"
        time.sleep(poll_s)


@contextlib.contextmanager
def browser_page(key: str):
    """A headless chromium page that sends ``key`` as the Basic-auth password, and the page errors it records
    (the test asserts there are none)."""
    from playwright.sync_api import sync_playwright
    from test_serve_http import CHROMIUM_ARGS, _chromium

    executable = _chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(http_credentials={"username": "viewer", "password": key}).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            browser.close()
