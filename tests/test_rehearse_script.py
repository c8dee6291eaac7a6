"""scripts/rehearse-node-loss.sh: bad input is refused with a reason; run for real (slow), the job survives the
loss of a worker node and finishes from a checkpoint, and the script leaves none of its processes behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "rehearse-node-loss.sh")
VENV = os.path.dirname(os.path.dirname(sys.executable))


def test_script_is_valid_bash_and_executable():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_bad_kimg_and_missing_venv_are_refused_with_a_reason(tmp_path):
    bad = subprocess.run([SCRIPT, "lots"], capture_output=True, text=True, env={**os.environ, "VENV": VENV})
    assert bad.returncode == 2 and "KIMG 'lots' must be a number" in bad.stderr
    none = subprocess.run([SCRIPT], capture_output=True, text=True, env={**os.environ, "VENV": str(tmp_path)})
    assert none.returncode == 2 and "make venv" in none.stderr


def _our_processes(mark: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace")
        except OSError:
            continue
        if mark in argv:
            found.append(pid)
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_job_survives_a_lost_worker_node():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    done = subprocess.run([SCRIPT, "0.768"], capture_output=True, text=True, env={**env, "VENV": VENV}, timeout=840)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "killing worker node w2" in log and "the job SUCCEEDED" in log
    resumed = float(re.search(r"resumed_kimg (\d+\.\d+)", log).group(1))
    final = float(re.search(r"final kimg (\d+\.\d+)", log).group(1))
    assert resumed > 0 and final >= 0.768  # continued from a checkpoint, then trained to the end
    work = re.search(r"\(temp dir (/tmp/srnl\.\w+)\)", log).group(1)
    assert not os.path.exists(work) and not _our_processes(work)  # cleaned up after itself
