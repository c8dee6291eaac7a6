"""benchmarks/gpu_check.sh, the one command a GPU session runs: what it plans, its refusal on a CPU machine, and a
rehearsal of every step on the CPU inside an environment shaped like the lent GPU machine (torch, numpy, pillow,
pyarrow, scipy, pytest, onnxruntime, and no Ray, FastAPI, YAML or tqdm), which is what its torch tier must need.

No GPU exists here: the rehearsal runs the same steps at toy sizes on the CPU (its figures mean nothing) and the
gpu tests skip themselves; the GPU run itself is what a GPU session does with this script."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
# What the lent machine has (and what those need); everything else is absent there.
GPU_MACHINE = ("torch", "numpy", "pillow", "pyarrow", "scipy", "pytest", "onnxruntime")


def _run(*args: str, python: str = sys.executable, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": python})


def test_dry_run_lists_every_step_and_what_it_skips(tmp_path):
    done = _run("--dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    for step in ("gpu-tests", "throughput-256-32", "throughput-512-32", "throughput-512-8", "train", "resume", "grid"):
        assert f"{step}: " in done.stdout
    assert "pytest -m gpu" in done.stdout and "--device cuda" in done.stdout
    assert "--gpus --workers 1" in done.stdout  # Ray imports in this venv: the Ray tier trains through Ray Train
    assert os.listdir(tmp_path) == []  # a dry run runs nothing


def test_a_cpu_machine_is_refused_at_once_with_the_reason(tmp_path):
    done = _run("--out", str(tmp_path))
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "--dry-run" in done.stderr
    assert not os.path.exists(tmp_path / "report.md")


def _distributions(names) -> set[str]:
    """The installed distributions ``names`` need, themselves included."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [re.match(r"[A-Za-z0-9._-]+", r).group() for r in dist.requires or [] if "extra ==" not in r]
    return seen


@pytest.fixture(scope="module")
def gpu_machine_python(tmp_path_factory) -> str:
    """A venv that sees only the lent GPU machine's packages (linked from this venv), not Ray and the rest."""
    root = tmp_path_factory.mktemp("gpu-machine")
    site = root / "site"
    site.mkdir()
    for name in _distributions(GPU_MACHINE):
        dist = md.distribution(name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            src, dst = dist.locate_file(top), site / top
            if os.path.exists(src) and not os.path.exists(dst) and not top.endswith(".pth"):
                os.symlink(src, dst)
    venv.create(root / "venv", with_pip=False)
    python = str(root / "venv" / "bin" / "python")
    purelib = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                      text=True).strip()
    with open(os.path.join(purelib, "gpu_machine.pth"), "w") as f:
        f.write(str(site) + "\n")
    missing = subprocess.run([python, "-c", "import ray"], capture_output=True, text=True)
    assert missing.returncode != 0 and "No module named 'ray'" in missing.stderr
    return python


@pytest.mark.slow
def test_rehearsal_runs_every_torch_tier_step_without_ray(gpu_machine_python, tmp_path):
    done = _run("--rehearse", "--out", str(tmp_path), python=gpu_machine_python, timeout=900)
    report = (tmp_path / "report.md").read_text()
    assert done.returncode == 0, report + done.stderr
    assert "Ray tier: skipped (Ray does not import)" in report and "no step failed" in report
    for step in ("gpu-tests", "throughput-16-8", "data", "train", "resume", "grid"):
        assert f"| {step} |" in report and f"| {step} | " in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert all("passed" in rows[s] for s in ("gpu-tests", "throughput-16-8", "train", "resume", "grid"))
    assert "skipped" in (tmp_path / "logs" / "gpu-tests.log").read_text()  # collected without Ray, then skipped
    assert "img/s" in rows["throughput-16-8"]
    assert "ckpt-000000000096" in rows["resume"] and "ckpt-000000000096" not in rows["train"]  # resumed to more kimg
    assert (tmp_path / "grid.png").stat().st_size > 0
