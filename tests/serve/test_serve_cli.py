"""`styleray serve`: its flags, errors that exit 2 with the reason, and a real server started and stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import RESOLUTION, decode, free_port, make_checkpoint

from styleray import cli


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--checkpoint", "--host", "--port", "--replicas", "--gpus-per-replica", "--min-replicas", "--no-batching"]:
        assert flag in out
    assert "127.0.0.1" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--min-replicas", "1"], "autoscaling needs both"),
        (["--replicas", "0"], "--replicas Input should be greater than or equal to 1"),
        (["--device", "cuda"], "gpus_per_replica > 0"),
        (["--batch-wait-ms", "5000"], "--batch-wait-ms"),
        (["--port", "70000"], "--port 70000 must lie in 1-65535"),
    ],
)
def test_bad_flags_exit_2_with_reason(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--checkpoint", str(tmp_path), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_exits_2_before_starting_ray(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--checkpoint", str(tmp_path / "none")])
    assert e.value.code == 2
    assert "--checkpoint:" in capsys.readouterr().err


def test_flags_for_the_new_serve_args_map_onto_them(tmp_path):
    """The reload and HTTP-limit settings are ServeArgs fields; a `serve` flag whose dest is the field's name
    reaches them (lists from action="append"), and a bad value is reported under the flag's name."""
    import argparse

    from styleray.serve.cli_serve import serve_args_from_flags

    base = dict(checkpoint="runs/r1", device="auto", replicas=1, min_replicas=None, max_replicas=None,
                gpus_per_replica=0.0, cpus_per_replica=1.0, no_batching=False, max_batch_size=32, batch_wait_ms=5.0,
                api_key_env="STYLERAY_API_KEY")
    args = serve_args_from_flags(argparse.Namespace(**base, reload_roots=["/data/runs"], trusted_proxies=["10.0.0.1"],
                                                    body_timeout_s=3.0, max_requests_per_client=None))
    assert args.reload_roots == ("/data/runs",) and args.trusted_proxies == ("10.0.0.1",) and args.body_timeout_s == 3
    assert args.max_requests_per_client == 32 and os.path.isabs(args.checkpoint)  # None: the default
    with pytest.raises(ValueError, match="^--trusted-proxy 'nope' is not an IP address"):
        serve_args_from_flags(argparse.Namespace(**base, trusted_proxies=["nope"]))
    with pytest.raises(ValueError, match="^--reload-scheme 'file' is not a URL scheme"):
        serve_args_from_flags(argparse.Namespace(**base, reload_schemes=["file"]))
    parsed = cli.build_parser().parse_args([
        "serve", "--checkpoint", "runs/r1", "--reload-root", "/a", "--reload-root", "/b", "--reload-scheme", "gs",
        "--max-header-kb", "8", "--trusted-proxy", "10.0.0.0/8", "--client-ip-header", "X-Real-IP"])
    args = serve_args_from_flags(parsed)  # the command's own flags reach the same fields
    assert args.reload_roots == ("/a", "/b") and args.reload_schemes == ("gs",) and args.max_header_kb == 8
    assert args.trusted_proxies == ("10.0.0.0/8",) and args.client_ip_header == "X-Real-IP"
    assert args.body_timeout_s == 10 and args.max_checkpoint_mb == 2048  # flags not given: the defaults
    parsed = cli.build_parser().parse_args(["serve", "--checkpoint", "runs/r1", "--max-running-projections", "2",
                                            "--projections-kept", "5", "--max-projection-steps", "300"])
    args = serve_args_from_flags(parsed)
    assert (args.max_running_projections, args.projections_kept, args.max_projection_steps) == (2, 5, 300)
    with pytest.raises(ValueError, match="^--max-projection-steps"):
        serve_args_from_flags(cli.build_parser().parse_args(
            ["serve", "--checkpoint", "runs/r1", "--max-projection-steps", "99999"]))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_serve_command_serves_until_interrupted(tmp_path):
    run_dir = str(tmp_path / "run")
    make_checkpoint(run_dir, seed=0, cur_nimg=500)
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "STYLERAY_API_KEY": "cli-key"}
    cmd = [sys.executable, "-m", "styleray.cli", "serve", "--checkpoint", run_dir, "--port", str(port),
           "--address", "local", "--cpus-per-replica", "0.5"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            try:
                if httpx.get(base + "/healthz", headers={"X-API-Key": "cli-key"}, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "styleray serve did not come up in 180 s"
            time.sleep(1)
        assert httpx.get(base + "/healthz", timeout=5).status_code == 401  # the key from the environment
        r = httpx.get(base + "/v1/sample", params={"seed": 3, "class": 0}, headers={"X-API-Key": "cli-key"}, timeout=60)
        assert r.status_code == 200 and decode(r.content).shape == (RESOLUTION, RESOLUTION, 3)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode in (0, 130), proc.stdout.read().decode(errors="replace")[-3000:]


def test_many_model_flags_reach_serve_args_and_bad_ones_exit_2(tmp_path, capsys):
    """--runs, --model NAME=RUN (repeatable), --models-per-replica and the autoscaling flags map onto ServeArgs;
    nothing to serve, a malformed or repeated --model, a missing --runs folder exit 2 naming the flag."""
    from styleray.serve.cli_serve import serve_args_from_flags

    parsed = cli.build_parser().parse_args([
        "serve", "--runs", "runs", "--model", "heroes=runs/h", "--model", "faces=s3://b/runs/f",
        "--models-per-replica", "2", "--scan-interval-s", "5", "--default-model", "faces", "--min-replicas", "1",
        "--max-replicas", "4", "--target-ongoing-requests", "8", "--gpus-per-replica", "0.25", "--device", "cuda"])
    args = serve_args_from_flags(parsed)
    assert os.path.isabs(args.runs) and args.checkpoint is None
    assert list(args.models) == ["heroes", "faces"] and os.path.isabs(args.models["heroes"])
    assert args.models["faces"] == "s3://b/runs/f" and args.default_model == "faces"
    assert (args.models_per_replica, args.scan_interval_s, args.gpus_per_replica) == (2, 5.0, 0.25)
    assert args.autoscaling == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}
    for argv, message in [
        ([], "nothing to serve: give --runs ROOT, --model NAME=RUN"),
        (["--model", "heroes"], "--model 'heroes': write NAME=RUN"),
        (["--model", "a=x", "--model", "a=y"], "the name 'a' is given twice"),
        (["--model", "a b=x"], "model name 'a b'"),
        (["--runs", str(tmp_path / "none")], "--runs"),
        (["--runs", str(tmp_path), "--models-per-replica", "0"], "--models-per-replica"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.main(["serve", *argv])
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_the_duplicate_name_rule_is_said_at_start(tmp_path, caplog):
    """Two runs named alike under --runs: the start-up check logs which run keeps the plain name."""
    import logging

    from styleray.serve.cli_serve import check_sources, serve_args_from_flags

    make_checkpoint(str(tmp_path / "heroes"), seed=0, cur_nimg=500)
    make_checkpoint(str(tmp_path / "old" / "heroes"), seed=1, cur_nimg=500)
    args = serve_args_from_flags(cli.build_parser().parse_args(["serve", "--runs", str(tmp_path)]))
    with caplog.at_level(logging.INFO):
        check_sources(args)
    text = caplog.text
    assert "two runs named 'heroes': heroes serves as 'heroes', old/heroes as 'old.heroes'" in text
    assert "model old.heroes:" in text and "rescanned every 10 s" in text
