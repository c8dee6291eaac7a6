"""Issue test 6: `ray job submit --working-dir . -- styleray train ...` against a real `ray start --head`.

The cluster is this test's own: its own temp dir, ports and auth token (token auth stays on: the Jobs API
refuses a client without the token, and the submitting client presents it through RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN_PATH). It is started from the virtualenv, so the job's `styleray` is the venv's. Teardown
stops exactly its processes (by PID, found from its temp dir and GCS port), never other Ray clusters.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from styleray.platform import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
VENV_BIN = os.path.dirname(sys.executable)


def _processes() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) from /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out[int(name)] = (ppid, argv)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_cluster(temp: str, gcs_port: int) -> None:
    """SIGTERM, then SIGKILL, the processes whose argv names this cluster's temp dir or GCS port (the
    daemonised head processes), and all their descendants (workers, agents)."""
    mine = re.compile(rf"{re.escape(temp)}|:{gcs_port}(?!\d)")
    procs = _processes()
    me, ancestors = os.getpid(), set()
    pid = me
    while pid in procs and pid not in ancestors:
        ancestors.add(pid)
        pid = procs[pid][0]
    ours = {p for p, (_, argv) in procs.items() if any(mine.search(a) for a in argv)} - ancestors
    while True:
        children = {p for p, (ppid, _) in procs.items() if ppid in ours} - ours - ancestors
        if not children:
            break
        ours |= children
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in ours:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while sig == signal.SIGTERM and time.time() < deadline and any(_alive(p) for p in ours):
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head(helpers):
    temp = tempfile.mkdtemp(prefix="srj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    token = os.path.join(temp, "token")
    with open(token, "w", encoding="utf-8") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=VENV_BIN + os.pathsep + env.get("PATH", ""))
    gcs, dashboard = helpers.port(), helpers.port()
    ports = {
        "--port": gcs, "--dashboard-port": dashboard, "--ray-client-server-port": helpers.port(),
        "--dashboard-agent-listen-port": helpers.port(), "--metrics-export-port": helpers.port(),
        "--runtime-env-agent-port": helpers.port(), "--node-manager-port": helpers.port(),
        "--object-manager-port": helpers.port(),
    }
    cmd = [os.path.join(VENV_BIN, "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "2",
           "--temp-dir", os.path.join(temp, "ray"), "--disable-usage-stats"]
    cmd += [str(x) for kv in ports.items() for x in kv]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
        yield {"env": env, "address": f"http://127.0.0.1:{dashboard}", "temp": temp}
    finally:
        _stop_cluster(temp, gcs)
        shutil.rmtree(temp, ignore_errors=True)


def test_jobs_api_requires_the_token(head):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{head['address']}/api/jobs/", timeout=30)
    assert err.value.code == 401
    request = urllib.request.Request(f"{head['address']}/api/jobs/")
    request.add_header("Authorization", f"Bearer {open(head['env']['RAY_AUTH_TOKEN_PATH']).read().strip()}")
    assert urllib.request.urlopen(request, timeout=30).status == 200


def test_ray_job_submit_styleray_train_completes_and_leaves_a_checkpoint(head, tiny_data, tmp_path, helpers):
    out = tmp_path / "run"
    cmd = [os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", head["address"], "--working-dir", ".",
           "--", "styleray", "train", "--data", tiny_data, "--out", str(out), "--workers", "2",
           "--preset", "cpu-tiny", "--batch", "8", "--kimg", "0.064", "--tick", "0.032", "--snap", "2",
           "--resume", "none"]
    done = subprocess.run(cmd, cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "succeeded" in log and "done: 0.064 kimg" in log, log[-3000:]
    ck = ckpt_lib.load_checkpoint(str(out / "checkpoints" / "ckpt-000000000064"))
    assert ck.meta["kimg"] == pytest.approx(0.064) and len(set(ck.meta["replicas"])) == 1
    assert [r["tick"] for r in helpers.metrics(out)] == [1, 2]
