"""Seconds per kimg on 8 GPUs, estimated from a measured one-GPU step and the all-reduce volume of one iteration.

    python benchmarks/multi_gpu_estimate.py --img-s 30.1 --res 512            # the one-GPU figure at batch/8
    python benchmarks/multi_gpu_estimate.py --img-s 75 --res 512 --gpus 8 --batch 64

One iteration on each GPU = the compute of its share of the batch (``batch / gpus`` images at the measured one-GPU
rate for that per-GPU batch: measure it with ``benchmarks/train_step.py --device cuda --batch batch/gpus``) plus
the gradient all-reduces. styleray averages each phase's gradients in one flat fp32 buffer after the phase's
backward (no overlap with compute, so the two add): G main and D main every iteration, G path length every 4,
D R1 every 16, so the bytes per iteration are 4 * (|G| * (1 + 1/4) + |D| * (1 + 1/16)). A ring all-reduce of S
bytes takes S * 2 (n - 1) / n / busbw, with busbw NCCL's bus bandwidth for large messages on the node's fabric
(the table below: nccl-tests figures of the order published for those machines; an assumption, not measured here).
"""

from __future__ import annotations

import argparse
import sys

# NCCL all-reduce bus bandwidth for large messages inside one node, GB/s (assumed, see the module docstring).
FABRICS = {
    "p3.16xlarge (8x V100, NVLink)": 130.0,
    "p4d.24xlarge (8x A100, NVSwitch)": 230.0,
    "p5.48xlarge (8x H100, NVSwitch)": 450.0,
}
REFERENCE_8XV100_S_PER_KIMG = {512: "9.5-9.7"}  # the reference's published 8x V100 figure at 512 px


def parameter_counts(res: int, preset: str) -> tuple[int, int]:
    from styleray.config import resolve_preset
    from styleray.models.networks import Discriminator, Generator, count_parameters

    model, _ = resolve_preset(preset, resolution=res, workers=8)
    return count_parameters(Generator(model)), count_parameters(Discriminator(model))  # what has gradients


def estimate(img_s: float, batch: int, gpus: int, g_params: int, d_params: int, busbw_gb_s: float) -> dict:
    compute_s = batch / gpus / img_s
    volume = 4 * (g_params * (1 + 1 / 4) + d_params * (1 + 1 / 16))
    allreduce_s = volume * 2 * (gpus - 1) / gpus / (busbw_gb_s * 1e9)
    iteration_s = compute_s + allreduce_s
    return {"compute_s": compute_s, "allreduce_s": allreduce_s, "volume_mb": volume / 1e6,
            "s_per_kimg": iteration_s * 1000 / batch, "img_s": batch / iteration_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img-s", type=float, required=True, help="measured one-GPU img/s at the per-GPU batch")
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="global batch (default 64: auto's at 8 workers)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--preset", default="auto")
    args = p.parse_args(argv)
    g, d = parameter_counts(args.res, args.preset)
    print(f"{args.preset} at {args.res}px: G {g / 1e6:.1f}M, D {d / 1e6:.1f}M parameters; global batch {args.batch} "
          f"on {args.gpus} GPUs ({args.batch // args.gpus} each) at a measured {args.img_s:g} img/s per GPU")
    print("| machine | busbw GB/s (assumed) | all-reduce MB/iter | compute s/iter | all-reduce s/iter | s/kimg | img/s |")
    print("|---|---|---|---|---|---|---|")
    for name, bw in FABRICS.items():
        e = estimate(args.img_s, args.batch, args.gpus, g, d, bw)
        print(f"| {name} | {bw:g} | {e['volume_mb']:.0f} | {e['compute_s']:.3f} | {e['allreduce_s']:.4f} | "
              f"{e['s_per_kimg']:.2f} | {e['img_s']:.0f} |")
    if args.res in REFERENCE_8XV100_S_PER_KIMG:
        print(f"reference, published, 8x V100 at {args.res}px: {REFERENCE_8XV100_S_PER_KIMG[args.res]} s/kimg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
