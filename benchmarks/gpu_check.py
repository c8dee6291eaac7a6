"""One command that checks styleray's CUDA path on a machine with one GPU, in under 8 minutes.

    bash benchmarks/gpu_check.sh                 # on the GPU machine: report on stdout and in gpu-check/report.md
    bash benchmarks/gpu_check.sh --dry-run       # anywhere: what it would run, and what it would skip
    bash benchmarks/gpu_check.sh --rehearse      # CPU, toy sizes: checks this script, its figures mean nothing

Two tiers. The torch tier needs only torch (+ numpy, pillow, pytest) and styleray's source on PYTHONPATH: the GPU
test suite (``pytest -m gpu tests/gpu``), the training throughput table of ``benchmarks/train_step.py --device
cuda`` with peak memory, and a short training run on generated data (``--no-ray``) with a checkpoint, a resume
to more kimg and a sample grid. The Ray tier (``--gpus`` through Ray Train, Serve on CUDA) runs where Ray
imports (a cluster's GPU node): the same training run goes through Ray Train, the Ray tests in tests/gpu run;
where Ray does not import, the report says they were skipped and why.

Every step runs as a subprocess with its own time limit; its output goes to ``OUT/logs/STEP.log``. The report
(``OUT/report.md`` and stdout) has one line per step: passed, failed or skipped, its time, its figures. The exit
status is 1 if a step failed, 2 if the machine has no CUDA GPU (without --rehearse or --dry-run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (res, batch) of the throughput table: the reference's H100 figures are in ../shared/BENCHMARKS.md
THROUGHPUT = ((256, 32), (512, 32), (512, 8))
REFERENCE_H100_IMG_S = {(256, 32): 131.0, (512, 32): 44.9, (512, 8): 30.1}


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the real check on a GPU, or toy sizes for --rehearse on a CPU."""

    device: str
    throughput: tuple[tuple[int, int], ...]
    bench_args: tuple[str, ...]
    train_res: int
    train_images: int
    train_args: tuple[str, ...]  # preset, kimg, tick...
    resume_kimg: str
    step_timeout_s: dict[str, int] = field(default_factory=dict)


GPU = Sizes(
    device="cuda", throughput=THROUGHPUT, bench_args=("--repeats", "3", "--warmup", "1"),
    train_res=64, train_images=512, train_args=("--preset", "auto", "--kimg", "12", "--tick", "4", "--snap", "1"),
    resume_kimg="16",
    step_timeout_s={"gpu-tests": 150, "throughput": 100, "train": 150, "resume": 60, "grid": 40},
)
REHEARSAL = Sizes(
    device="cpu", throughput=((16, 8),), bench_args=("--preset", "cpu-tiny", "--repeats", "1", "--warmup", "0"),
    train_res=16, train_images=32,
    train_args=("--preset", "cpu-tiny", "--kimg", "0.064", "--tick", "0.032", "--snap", "1"),
    resume_kimg="0.096",
    step_timeout_s={"gpu-tests": 120, "throughput": 300, "train": 300, "resume": 300, "grid": 120},
)


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    timeout_s: int
    skip: str | None = None  # why it does not run here
    status: str = "not run"
    seconds: float = 0.0
    figures: str = ""


def ray_imports() -> bool:
    return importlib.util.find_spec("ray") is not None


def cuda_summary() -> tuple[bool, str]:
    """(has CUDA, one line naming torch, CUDA, the GPU and its capability)."""
    import torch

    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__}: torch.cuda.is_available() is False"
    props = torch.cuda.get_device_properties(0)
    return True, (
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {props.name}, "
        f"compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB"
    )


def plan(sizes: Sizes, out: str, with_ray: bool) -> list[Step]:
    """Every step, in order; those that cannot run here carry the reason."""
    py, t = sys.executable, sizes.step_timeout_s
    steps = [Step("gpu-tests", "pytest -m gpu tests/gpu (Ray tests inside skip where Ray does not import)",
                  [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"],
                  t["gpu-tests"])]
    for res, batch in sizes.throughput:
        steps.append(Step(f"throughput-{res}-{batch}", f"train_step.py at {res}px, batch {batch}",
                          [py, os.path.join(REPO, "benchmarks", "train_step.py"), "--device", sizes.device,
                           "--res", str(res), "--batch", str(batch), *sizes.bench_args,
                           "--json", os.path.join(out, f"throughput-{res}-{batch}.json")],
                          t["throughput"]))
    data, run = os.path.join(out, "data"), os.path.join(out, "run")
    where = ["--gpus", "--workers", "1"] if with_ray and sizes.device == "cuda" else ["--no-ray", "--device",
                                                                                      sizes.device]
    train = [py, "-m", "styleray.cli", "train", "--data", data, "--out", run, "--no-progress", *where]
    steps += [
        Step("data", f"{sizes.train_images} generated images at {sizes.train_res}px",
             [py, "-c", "import sys; from styleray.datasets.synthetic import make_clean_training_set as m; "
                        f"m(sys.argv[1], n={sizes.train_images}, resolution={sizes.train_res})", data], 120),
        Step("train", "a short run " + ("through Ray Train (--gpus)" if "--gpus" in where else "with --no-ray"),
             [*train, *sizes.train_args, "--resume", "none"], t["train"]),
        Step("resume", f"resume the run from its last checkpoint to {sizes.resume_kimg} kimg",
             [*train, *_with_kimg(sizes.train_args, sizes.resume_kimg), "--resume", "latest"], t["resume"]),
        Step("grid", "a 4x4 sample grid from the resumed run",
             [py, "-m", "styleray.cli", "generate", "--checkpoint", run, "--seeds", "0-15",
              "--out", os.path.join(out, "grid.png")], t["grid"]),
    ]
    if not with_ray:
        steps.append(Step("ray-tier", "Ray Train with --gpus and Serve on CUDA", [], 0,
                          skip="Ray does not import here: the tests/gpu Ray tests and --gpus training did not run"))
    return steps


def _with_kimg(args: tuple[str, ...], kimg: str) -> list[str]:
    out = list(args)
    out[out.index("--kimg") + 1] = kimg
    return out


def run_step(step: Step, out: str, env: dict[str, str]) -> None:
    if step.skip:
        step.status = "skipped"
        return
    log = os.path.join(out, "logs", f"{step.name}.log")
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + shlex.join(step.argv) + "\n")
        f.flush()
        try:
            rc = subprocess.run(step.argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                timeout=step.timeout_s).returncode
            step.status = "passed" if rc == 0 else f"failed (exit {rc}, see logs/{step.name}.log)"
        except subprocess.TimeoutExpired:
            step.status = f"failed (over its {step.timeout_s} s limit, see logs/{step.name}.log)"
    step.seconds = time.monotonic() - start
    step.figures = figures_of(step, out, log)


def figures_of(step: Step, out: str, log: str) -> str:
    """The figures a step leaves: the throughput JSON, the test summary line, the checkpoints written."""
    if step.name.startswith("throughput-"):
        return _throughput_figures(step, out)
    if step.name == "gpu-tests":
        lines = [ln.strip() for ln in open(log, encoding="utf-8") if " passed" in ln or " skipped" in ln
                 or " failed" in ln or "no tests ran" in ln]
        return lines[-1] if lines else ""
    if step.name in ("train", "resume"):
        ckpts = os.path.join(out, "run", "checkpoints")
        names = sorted(n for n in os.listdir(ckpts) if n.startswith("ckpt-")) if os.path.isdir(ckpts) else []
        return f"checkpoints: {', '.join(names[-3:]) or 'none'}"
    return ""


def _throughput_figures(step: Step, out: str) -> str:
    """img/s, s/kimg, peak GiB and the slowest phase of train_step.py's JSON ("new" = styleray's trainer)."""
    path = os.path.join(out, step.name + ".json")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        row = json.load(f)["results"][0]
    img_s = row["new"]
    text = f"{img_s:.3g} img/s, {1000 / img_s:.3g} s/kimg"
    if row.get("new_peak_gib") is not None:
        text += f", peak {row['new_peak_gib']:.3g} GiB"
    reference = REFERENCE_H100_IMG_S.get((row["res"], row["batch"]))
    if reference and step.argv[step.argv.index("--device") + 1] == "cuda":
        text += f" (reference on an H100: {reference} img/s)"
    phases = row.get("new_phases") or {}
    if phases:
        text += "; s/iteration by phase: " + ", ".join(f"{k} {v:.3g}" for k, v in phases.items())
    return text


def report(steps: list[Step], header: list[str]) -> str:
    lines = ["# styleray gpu_check", "", *header, "", "| step | what | status | s | figures |", "|---|---|---|---|---|"]
    for s in steps:
        status = s.status if s.status != "skipped" else f"skipped: {s.skip}"
        lines.append(f"| {s.name} | {s.what} | {status} | {s.seconds:.0f} | {s.figures} |")
    failed = [s.name for s in steps if s.status.startswith("failed")]
    lines += ["", f"failed: {', '.join(failed)}" if failed else "no step failed"]
    skipped = [s.name for s in steps if s.status == "skipped"]
    if skipped:
        lines.append(f"not run here: {', '.join(skipped)} (see each reason above)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    has_cuda, summary = cuda_summary()
    if not has_cuda and not (args.dry_run or args.rehearse):
        print(f"gpu_check needs a CUDA GPU and this machine has none ({summary}). Run it on a GPU machine; "
              "--dry-run lists what it would run.", file=sys.stderr)
        return 2
    sizes = REHEARSAL if args.rehearse else GPU
    with_ray = ray_imports() and not args.no_ray
    steps = plan(sizes, args.out, with_ray)
    header = [f"- machine: {summary}", f"- Ray tier: {'runs' if with_ray else 'skipped (Ray does not import)'}",
              f"- sizes: {'rehearsal on CPU, figures mean nothing' if args.rehearse else 'GPU check'}"]
    if args.dry_run:
        print("\n".join(header))
        for s in steps:
            print(f"{s.name}: {s.what}\n    " + (f"skipped: {s.skip}" if s.skip else shlex.join(s.argv)))
        return 0
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "src"), os.environ.get("PYTHONPATH", "")])}
    for s in steps:
        print(f"gpu_check: {s.name} ({s.what})", file=sys.stderr, flush=True)
        run_step(s, args.out, env)
    text = report(steps, header)
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 1 if any(s.status.startswith("failed") for s in steps) else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "gpu-check"),
                   help="report, logs, run folder and grid (default: $OUT or ./gpu-check)")
    p.add_argument("--dry-run", action="store_true", help="list the steps and what would be skipped; run nothing")
    p.add_argument("--rehearse", action="store_true", help="run every step on the CPU at toy sizes (tests this script)")
    p.add_argument("--no-ray", action="store_true", help="the torch tier only, even where Ray imports")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
