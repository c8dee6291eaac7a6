"""Images/second of one full StyleGAN2-ADA training iteration, as the reference (stylegan2-ada-pytorch) counts it.

    python benchmarks/train_step.py                          # res 32 and 64, batch 32, preset auto, 2 threads
    python benchmarks/train_step.py --res 32 --reference     # and the plain reference paths, back-to-back
    python benchmarks/train_step.py --res 64 --method loop --iters 16 --repeats 3
    python benchmarks/train_step.py --res 32 64 --compile --reference-checkout /work/scratch/sg2ada
    python benchmarks/train_step.py --device cuda --res 256 --batch 32 --compile   # img/s, s/kimg, peak GiB

One iteration is `StyleGAN2Trainer.step(real)`: G main, G path-length reg every 4, D main, D R1 every 16, ADA
at a fixed p = 0.2, G_ema update. Data loading is excluded (one random batch is reused). Figures are amortized
over a 16-iteration window (the lazy-regularisation period):

* ``--method kinds`` (default): a 16-iteration window holds three kinds of iteration: 1 with every phase
  (batch_idx % 16 == 0), 3 with G reg but no R1 (% 4 == 0), 12 with the main phases only. One repeat times one
  step of each kind and weighs them 1 : 3 : 12, i.e. exactly the work of 16 consecutive steps for the price
  of 3. The trainer's ``batch_idx`` picks the kind (with ``augment="fixed"`` nothing else depends on it).
* ``--method loop``: ``--iters`` (a multiple of 16) consecutive steps, timed as a whole.

The figure is the median over ``--repeats``. ``--reference`` builds a second trainer with the same seed whose
steps run under ``layers.reference_paths()`` (and NCHW), and interleaves the two step by step, so the ratio
new / reference is measured under the same machine load: on a shared machine prefer that ratio to the
absolute figures. The load average is printed next to every figure, and so is a second, load-robust figure:
"CPU-time bound" = batch x threads / (process CPU seconds per iteration), what the step does when its threads
have the cores to themselves (other processes stretch wall time, not much our CPU time).

``--reference-checkout PATH`` (a checkout of NVlabs/stylegan2-ada-pytorch outside the project) also times NVIDIA's
own implementation, replayed as its training loop runs (reference_replay.py), interleaved with styleray's step
under the same load, and prints the ratio styleray / NVIDIA: the side-by-side figure of shared/BENCHMARKS.md.
On CUDA every row also gives s/kimg and the peak memory of the variant's steps (``torch.cuda.max_memory_allocated``,
JSON key ``<variant>_peak_gib``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import statistics
import sys
import time

TARGET_RATIO = 3.0  # styleray / NVIDIA's implementation, side by side on one CPU (shared/BENCHMARKS.md)
NVIDIA = "nvidia"  # the variant name of the replayed reference implementation
KINDS = ((0, 1), (4, 3), (1, 12))  # (batch_idx, how many of this kind in a 16-iteration window)
PHASES = ("Gmain", "Greg", "Dmain", "Dreg", "EMA")  # the trainer's phases (forward + backward of every round), EMA


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


# Variants that --compare can time next to "new" (the trainer's defaults plus this command's flags).
VARIANTS = {
    "reference": "plain reference paths (layers.reference_paths()), NCHW, scale-conv-scale modulation",
    "nchw": "new, but NCHW activations",
    "channels-last": "new, but channels-last activations",
    "fused": "new, but grouped-conv (fused) modulated convolution in G",
    "compile": "new, plus torch.compile of the main phases",
}


def variant_options(args, name: str) -> dict:
    opts = dict(reference=False, channels_last=args.channels_last, compile=args.compile, fused=args.fused_modconv)
    if name == "reference":
        opts.update(reference=True, channels_last=False, compile=False, fused=False)
    elif name == "nchw":
        opts.update(channels_last=False)
    elif name == "channels-last":
        opts.update(channels_last=True)
    elif name == "fused":
        opts.update(fused=True)
    elif name == "compile":
        opts.update(compile=True)
    return opts


def build_trainer(args, res: int, opts: dict):
    import torch

    real = torch.rand([args.batch // args.workers, 3, res, res], generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = real.to(args.device)  # data loading and the host-to-device copy are not timed
    if opts.get(NVIDIA):
        from reference_replay import ReferenceReplay

        replay = ReferenceReplay(args.reference_checkout, res, args.batch // args.workers, args.augment_p,
                                 args.device, fp16_res=args.reference_fp16_res)
        return replay, real
    from styleray.config import resolve_preset
    from styleray.models.training import StyleGAN2Trainer

    model_cfg, train_cfg = resolve_preset(
        args.preset,
        resolution=res,
        workers=args.workers,
        train_overrides=dict(batch=args.batch, batch_gpu=args.batch_gpu, augment="fixed", augment_p=args.augment_p),
    )
    trainer = StyleGAN2Trainer(
        model_cfg, train_cfg, args.device, channels_last=opts["channels_last"], compile=opts["compile"]
    )
    trainer.G.set_fused_modconv(opts["fused"])
    return trainer, real


class PhaseClock:
    """Wall time of each phase of a trainer (wraps every phase's `accumulate` and the EMA update)."""

    def __init__(self, trainer, sync):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.cpu_seconds: dict[str, float] = collections.defaultdict(float)
        targets = [(phase, "accumulate", phase.name) for phase in trainer.phases] + [(trainer, "_update_ema", "EMA")]
        for owner, attribute, name in targets:
            fn = getattr(owner, attribute)

            def timed(*a, _fn=fn, _name=name, **k):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                out = _fn(*a, **k)
                sync()
                self.seconds[_name] += time.perf_counter() - t0
                self.cpu_seconds[_name] += time.process_time() - c0
                return out

            setattr(owner, attribute, timed)


def run_step(trainer, real, batch_idx: int, reference: bool, sync) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    from styleray.models import layers

    ctx = layers.reference_paths() if reference else contextlib.nullcontext()
    trainer.batch_idx = batch_idx
    with ctx:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.step(real)
        sync()
    return time.perf_counter() - t0, time.process_time() - c0


def measure(args, res: int) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    variants = [(name, variant_options(args, name)) for name in ["new", *args.compare]]
    if args.reference_checkout:
        variants.append((NVIDIA, {"reference": False, NVIDIA: True}))
    cuda = args.device.startswith("cuda")
    peaks: dict[str, float] = {name: 0.0 for name, _ in variants}
    trainers = {name: build_trainer(args, res, opts) for name, opts in variants}
    batch = args.batch
    clocks = {name: PhaseClock(tr, sync) for name, (tr, _) in trainers.items()}

    # Warm-up: one step of every kind (allocator, oneDNN primitive caches, compilation).
    for name, opts in variants:
        tr, real = trainers[name]
        for _ in range(args.warmup):
            for batch_idx, _ in KINDS:
                run_step(tr, real, batch_idx, opts["reference"], sync)
        clocks[name].seconds.clear()
        clocks[name].cpu_seconds.clear()

    figures: dict[str, list[float]] = {name: [] for name, _ in variants}
    cpu_figures: dict[str, list[float]] = {name: [] for name, _ in variants}
    loads = [loadavg()]
    for rep in range(args.repeats):
        for name, opts in variants:  # interleaved: every variant sees the same load
            tr, real, ref = *trainers[name], opts["reference"]
            if cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            if args.method == "kinds":
                per_kind = {b: run_step(tr, real, b, ref, sync) for b, _ in KINDS}
                seconds = sum(per_kind[b][0] * count for b, count in KINDS) / 16
                cpu = sum(per_kind[b][1] * count for b, count in KINDS) / 16
            else:
                times = [run_step(tr, real, i, ref, sync) for i in range(args.iters)]
                seconds = sum(t for t, _ in times) / args.iters
                cpu = sum(c for _, c in times) / args.iters
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(args.device) / 2**30)
            figures[name].append(batch / seconds)
            cpu_figures[name].append(batch * args.threads / cpu)
            print(f"  res {res} repeat {rep + 1}/{args.repeats} {name:9s} {batch / seconds:6.3f} img/s "
                  f"({seconds:6.2f} s/iter, {cpu:6.2f} CPU-s/iter)  load {loadavg()}", flush=True)
        loads.append(loadavg())

    result = {"res": res, "batch": batch, "loads": loads, "variants": [name for name, _ in variants]}
    for name, _ in variants:
        result[name] = statistics.median(figures[name])
        result[name + "_cpu"] = statistics.median(cpu_figures[name])
        result[name + "_all"] = figures[name]
        result[name + "_s_per_kimg"] = 1000 / result[name]
        if cuda:
            result[name + "_peak_gib"] = peaks[name]
        weights = {"Gmain": 1, "Greg": 1 / 4, "Dmain": 1, "Dreg": 1 / 16, "EMA": 1}
        if args.method == "kinds":  # each repeat ran every kind once: 3 Gmain, 2 Greg, 3 Dmain, 1 Dreg
            counts = {"Gmain": 3, "Greg": 2, "Dmain": 3, "Dreg": 1, "EMA": 3}
        else:
            counts = {k: args.iters * w for k, w in weights.items()}
        for key, clock in (("_phases", clocks[name].seconds), ("_phases_cpu", clocks[name].cpu_seconds)):
            result[name + key] = {
                k: clock[k] / (args.repeats * counts[k]) * weights[k] for k in PHASES if counts[k]
            }
    return result


def print_table(results: list[dict]) -> None:
    print()
    print("| res | batch | variant | img/s | s/kimg | CPU-time bound img/s | vs new (wall) | vs new (CPU time) |"
          " peak GiB | load (start .. end) |")
    print("|---" * 10 + "|")
    for r in results:
        for name in r["variants"]:
            peak = f"{r[name + '_peak_gib']:.2f}" if name + "_peak_gib" in r else ""
            print(f"| {r['res']} | {r['batch']} | {name} | {r[name]:.3f} | {r[name + '_s_per_kimg']:.1f} |"
                  f" {r[name + '_cpu']:.3f} | {r[name] / r['new']:.2f}x | {r[name + '_cpu'] / r['new_cpu']:.2f}x |"
                  f" {peak} | {r['loads'][0]} .. {r['loads'][-1]} |")
    print()
    for r in results:
        for name in r["variants"]:
            wall = ", ".join(f"{k} {v:.2f}" for k, v in r[name + "_phases"].items())
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in r[name + "_phases_cpu"].items())
            print(f"res {r['res']} {name}: seconds per iteration by phase, amortized: wall: {wall}; CPU: {cpu}")
    for r in results:
        if NVIDIA in r["variants"]:
            wall, cpu = r["new"] / r[NVIDIA], r["new_cpu"] / r[NVIDIA + "_cpu"]
            r["ratio_vs_nvidia"] = {"wall": wall, "cpu": cpu}
            print(f"res {r['res']} batch {r['batch']}: styleray / NVIDIA's implementation, side by side: {wall:.2f}x "
                  f"(wall), {cpu:.2f}x (CPU-time bound); target >= {TARGET_RATIO:.1f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, nargs="+", default=[32, 64], help="resolutions (default: 32 64)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batch-gpu", type=int, default=None, help="images per round (default: one round of --batch)")
    p.add_argument("--preset", default="auto")
    p.add_argument("--workers", type=int, default=1, help="the preset's worker count (one process runs here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--augment-p", type=float, default=0.2)
    p.add_argument("--method", choices=["kinds", "loop"], default="kinds")
    p.add_argument("--iters", type=int, default=16, help="--method loop: iterations per repeat (multiple of 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (one step of each kind)")
    p.add_argument("--compare", nargs="*", default=[], choices=sorted(VARIANTS),
                   help="also time these variants, interleaved with new: "
                   + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    p.add_argument("--reference", action="store_true", help="same as --compare reference")
    p.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last activations (default: the trainer's choice for the device)")
    p.add_argument("--compile", action="store_true", help="torch.compile the main phases' networks")
    p.add_argument("--fused-modconv", action="store_true", help="grouped-conv modulation in G (default off)")
    p.add_argument("--reference-checkout", metavar="PATH",
                   help="a checkout of NVlabs/stylegan2-ada-pytorch (outside the project): also time NVIDIA's own "
                   "training iteration, interleaved, and print the ratio styleray / NVIDIA")
    p.add_argument("--reference-fp16-res", type=int, default=0, metavar="N",
                   help="the reference's num_fp16_res (default 0 = its --fp32, as styleray trains on a CPU; "
                   "4 = its CUDA default)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.reference and "reference" not in args.compare:
        args.compare.append("reference")
    if args.method == "loop" and args.iters % 16:
        fix = max(16, args.iters // 16 * 16)
        p.error(f"--iters {args.iters} must be a multiple of 16 (the R1 interval), e.g. --iters {fix}")

    import torch

    if args.reference_checkout:
        from reference_replay import import_checkout

        import_checkout(args.reference_checkout)  # a bad PATH fails now, not after the first variant's warm-up
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, threads {args.threads}, "
          f"device {args.device}, method {args.method}, repeats {args.repeats}, load {loadavg()}", flush=True)
    results = [measure(args, res) for res in args.res]

    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
