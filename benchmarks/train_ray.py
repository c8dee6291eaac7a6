"""Ray Train overhead and recovery time, on this machine.

    .venv/bin/python benchmarks/train_ray.py [--resolution 32] [--batch-per-worker 8] [--ticks 7] [--gpus]

Prints, as a Markdown table and as JSON:
- bare: img/s of the foundation step alone (StyleGAN2Trainer.step on a ready tensor, no Ray Train, no data
  loading, no all-reduce), in 1 and in 2 processes at once (each a Ray worker process with the training
  worker's CPUs and threads): the median over windows of 16 steps (one lazy-regularisation cycle),
  measured before and after the Ray Train runs;
- Ray Train with 1 and 2 workers at the same per-worker batch: the median tick img/s (first tick dropped
  as warm-up) as reported to ray.train.report, so Ray Data ingest, the gloo all-reduces and the
  per-tick report are all inside it. overhead = 1 - img/s / bare(same number of processes). Also the
  share of rank 0's tick wall time spent outside StyleGAN2Trainer.step (data, report, bookkeeping),
  measured inside the same process and window, so load from other programs hardly moves it;
- recovery: seconds from a worker's death (os._exit, injected) to the first training step after every
  worker restored the last checkpoint, split into "worker group back" and "restore + first step".

Each worker gets `cpus_per_worker` torch threads; the bare step uses as many.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch


def bare_img_per_sec(model, train, batch: int, threads: int, windows: int = 6) -> float:
    """Median img/s over `windows` windows of 16 steps (R1 runs every 16: whole cycles are fair), the same
    statistic as the Ray runs' ticks."""
    from styleray.models.training import StyleGAN2Trainer

    torch.set_num_threads(threads)
    trainer = StyleGAN2Trainer(model, train, "cpu")
    real = torch.rand(batch, model.img_channels, model.resolution, model.resolution) * 2 - 1
    for _ in range(16):
        trainer.step(real)
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(16):
            trainer.step(real)
        rates.append(batch * 16 / (time.perf_counter() - t0))
    return statistics.median(rates)


def ray_img_per_sec(run, options) -> dict:
    """Median tick img/s (first tick dropped) and the median share of rank 0's tick time spent outside the
    training step (data, reporting, bookkeeping): a figure that load from other programs hardly moves."""
    from styleray.platform.train import ray_train

    ray_train.fit(run, resume=None, options=options)
    with open(os.path.join(run.out, "metrics.jsonl"), encoding="utf-8") as f:
        ticks = [json.loads(line) for line in f][1:]
    nimg = run.train.tick_kimg * 1000  # images per tick (16 steps)
    outside = [1 - t["step_sec"] * t["img_per_sec"] / nimg for t in ticks]
    return {
        "img_per_sec": statistics.median(t["img_per_sec"] for t in ticks),
        "outside_step": statistics.median(outside),
        "ticks": [t["img_per_sec"] for t in ticks],
    }


def recovery(run, options, marker: str) -> dict[str, float]:
    from styleray.platform.train import ray_train

    summary = ray_train.fit(
        run, resume=None, options=options, inject_failure={"rank": 1, "after_kimg": run.train.tick_kimg * 2, "marker": marker}
    )
    with open(marker, encoding="utf-8") as f:
        died = float(f.read())
    return {
        "worker_group_back_s": summary["started_at"] - died,
        "restore_and_first_step_s": summary["first_step_at"] - summary["started_at"],
        "total_s": summary["first_step_at"] - died,
        "resumed_kimg": summary["resumed_kimg"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-per-worker", type=int, default=8)
    p.add_argument("--ticks", type=int, default=7, help="ticks of 16 steps per Ray run (the first is dropped)")
    p.add_argument("--cpus-per-worker", type=float, default=0.9)
    p.add_argument("--gpus", action="store_true")
    args = p.parse_args()

    import ray

    from styleray.config import RunSpec, resolve_preset
    from styleray.datasets.synthetic import make_clean_training_set
    from styleray.platform.train import ray_train

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = tempfile.mkdtemp(prefix="styleray-bench-")
    data = str(make_clean_training_set(os.path.join(work, "data"), n=512, resolution=args.resolution, seed=0))
    B = args.batch_per_worker
    threads = max(1, int(round(args.cpus_per_worker)))

    def config(workers: int, out: str, ticks: int, snap: int):
        tick = 16 * B * workers / 1000
        model, train = resolve_preset(
            "cpu-tiny", resolution=args.resolution, workers=workers,
            train_overrides=dict(batch=B * workers, kimg=tick * ticks, tick_kimg=tick, snap=snap),
        )
        return RunSpec(model=model, train=train, preset="cpu-tiny", data=data, out=os.path.join(work, out))

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    one = config(1, "bare", 1, 1)
    bare_task = ray.remote(num_cpus=args.cpus_per_worker)(bare_img_per_sec)

    def bare(processes: int) -> float:
        """Summed img/s of `processes` bare steps running at once, each in a Ray worker process like a
        training worker's (same threads, same environment), without Ray Train, data or all-reduce."""
        return sum(ray.get([bare_task.remote(one.model, one.train, B, threads) for _ in range(processes)]))

    before = {w: bare(w) for w in (1, 2)}
    options = ray_train.RayOptions(cpus_per_worker=args.cpus_per_worker, gpus=args.gpus)
    rows = {w: ray_img_per_sec(config(w, f"ray{w}", args.ticks, 10_000), options) for w in (1, 2)}
    after = {w: bare(w) for w in (1, 2)}
    rec = recovery(config(2, "recovery", 4, 1), ray_train.RayOptions(cpus_per_worker=args.cpus_per_worker, max_failures=1),
                   os.path.join(work, "died"))
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()
    print(f"\n{args.resolution}px cpu-tiny, per-worker batch {B}, {threads} torch thread(s) per process, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")
    print("| workers | bare img/s (before / after) | Ray Train img/s | overhead vs bare | "
          "rank 0's tick time outside the step |")
    print("|---|---|---|---|---|")
    for w, r in rows.items():
        ref = (before[w] + after[w]) / 2
        print(f"| {w} | {before[w]:.1f} / {after[w]:.1f} | {r['img_per_sec']:.1f} | "
              f"{(1 - r['img_per_sec'] / ref) * 100:.0f}% | {r['outside_step'] * 100:.1f}% |")
    print(f"\nrecovery: {rec['total_s']:.1f} s from the kill to the first step after restore "
          f"(worker group back {rec['worker_group_back_s']:.1f} s, restore + first step "
          f"{rec['restore_and_first_step_s']:.1f} s; resumed at {rec['resumed_kimg']:.3f} kimg)")
    print(json.dumps({"bare_before": before, "bare_after": after, "ray": rows, "recovery": rec, "load": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
