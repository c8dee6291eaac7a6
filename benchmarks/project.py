"""Projection figures: reconstruction PSNR and time per projection for W, W+ and W+ with pivotal tuning.

    .venv/bin/python benchmarks/project.py --run RUN --data DATA [--targets 4] [--steps 1000] [--pti-steps 350]
        [--threads 1] [--device cpu] [--vgg16 PATH] [--picture benchmarks/projection.png] [--json FILE]

Targets, --targets of each kind:
- generated: images the run's G_ema makes from known latents (seeds 1..N, truncation 1, the model's noise
  maps), so the latent the search finds can be compared with the true one (relative error of w, averaged
  over layers);
- prepared: the first images of DATA (a prepared dataset at the model's resolution), framed as
  ``styleray project`` frames a target.
Methods: ``w`` (the reference's method: one w, --steps), ``w+`` (one w per layer, --steps) and ``w+ pti`` (w+
then --pti-steps of pivotal tuning). Each projection is timed in wall seconds and in CPU seconds of this
process (the latter moves little when other programs share the cores). PSNR is on the uint8 images as
``styleray project`` writes them. The distance is pixel-msssim unless --vgg16 names VGG16 weights.

Prints one Markdown table (median over targets per kind and method) and, with --json, every measurement.
--picture writes one row per target: target | W | W+ | W+ with pivotal tuning, enlarged (nearest).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

METHODS = ("w", "w+", "w+ pti")


def targets(G, data: str, n: int) -> list[tuple[str, str, np.ndarray, torch.Tensor | None]]:
    """(kind, name, uint8 [H, W, C], true ws or None) for n generated and n prepared targets."""
    from styleray.datasets.prepare.target import frame_target
    from styleray.models import sampling

    out = []
    seeds = list(range(1, n + 1))
    ws = sampling.seeds_to_ws(G, seeds)
    images = sampling.synthesize(G, ws)
    for seed, image, w in zip(seeds, images, ws):
        out.append(("generated", f"seed {seed}", image, w))
    names = sorted(f for f in os.listdir(data) if f.endswith(".png"))[:n]
    for name in names:
        with open(os.path.join(data, name), "rb") as f:
            framed = frame_target(f.read(), G.img_resolution, channels=G.img_channels)
        out.append(("prepared", name, framed.image, None))
    return out


def measure(G, image: np.ndarray, method: str, steps: int, pti_steps: int, distance) -> dict:
    from styleray.models.projection.distances import psnr_uint8
    from styleray.models.projection.pivotal import PivotalConfig, pivotal_tuning
    from styleray.models.projection.search import ProjectionConfig, project
    from styleray.models.sampling import to_uint8

    target = torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()
    wall, cpu = time.perf_counter(), time.process_time()
    p = project(G, target, ProjectionConfig(steps=steps, space="w" if method == "w" else "w+"), distance)
    result_image, ws = p.image, p.ws
    if method == "w+ pti":
        tuned = pivotal_tuning(G, p, target, PivotalConfig(steps=pti_steps), distance)
        result_image = tuned.image
    recon = to_uint8(result_image[None])[0]
    return {"psnr": psnr_uint8(recon, image), "seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu, "image": recon, "ws": ws}


def run(args) -> dict:
    from styleray.models.projection.choose import build_distance
    from styleray.platform.checkpoint import load_generator

    torch.set_num_threads(args.threads)
    G, ckpt = load_generator(args.run, args.device)
    distance, note = build_distance("vgg16" if args.vgg16 else "pixel-msssim", args.vgg16)
    print(f"# {ckpt.uri} ({ckpt.kimg:.1f} kimg, {G.img_resolution} px); {note}; {args.threads} thread(s)")
    rows, pictures = [], []
    for kind, name, image, true_ws in targets(G, args.data, args.targets):
        row = [image]
        for method in METHODS:
            m = measure(G, image, method, args.steps, args.pti_steps, distance)
            err = None
            if true_ws is not None:
                err = float(((m["ws"] - true_ws.cpu()).norm(dim=1) / true_ws.cpu().norm(dim=1)).mean())
            rows.append({"kind": kind, "target": name, "method": method, "psnr": round(m["psnr"], 3),
                         "seconds": round(m["seconds"], 2), "cpu_seconds": round(m["cpu_seconds"], 2),
                         "w_error": None if err is None else round(err, 4)})
            print(json.dumps(rows[-1]), flush=True)
            row.append(m["image"])
        pictures.append(row)
    if args.picture:
        write_picture(args.picture, pictures)
    return {"rows": rows, "table": table(rows, args), "checkpoint": ckpt.uri, "distance": distance.name}


def table(rows: list[dict], args) -> str:
    lines = ["| targets | method | steps | PSNR dB (median) | PSNR dB (min–max) | s / projection (median) | "
             "CPU s / projection | w error (generated) |", "|---|---|---|---|---|---|---|---|"]
    for kind in ("generated", "prepared"):
        for method in METHODS:
            sel = [r for r in rows if r["kind"] == kind and r["method"] == method]
            if not sel:
                continue
            psnrs = [r["psnr"] for r in sel]
            steps = f"{args.steps}" + (f" + {args.pti_steps} PTI" if method == "w+ pti" else "")
            err = [r["w_error"] for r in sel if r["w_error"] is not None]
            lines.append(
                f"| {kind} ({len(sel)}) | {method} | {steps} | {statistics.median(psnrs):.2f} | "
                f"{min(psnrs):.2f}–{max(psnrs):.2f} | {statistics.median(r['seconds'] for r in sel):.1f} | "
                f"{statistics.median(r['cpu_seconds'] for r in sel):.1f} | "
                f"{f'{statistics.median(err):.3f}' if err else '—'} |")
    return "\n".join(lines)


def write_picture(path: str, pictures: list[list[np.ndarray]]) -> None:
    from PIL import Image

    from styleray.platform.projection.outputs import side_by_side

    rows = [side_by_side(row) for row in pictures]
    gap = 4
    sheet = np.full((sum(r.shape[0] for r in rows) + gap * (len(rows) - 1), rows[0].shape[1], 3), 255, np.uint8)
    y = 0
    for r in rows:
        sheet[y : y + r.shape[0]] = r
        y += r.shape[0] + gap
    Image.fromarray(sheet).save(path)
    print(f"# wrote {path}: rows = targets; columns = target | W | W+ | W+ with pivotal tuning")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="checkpoint or run folder")
    p.add_argument("--data", required=True, help="prepared dataset at the model's resolution")
    p.add_argument("--targets", type=int, default=4, help="targets of each kind")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--pti-steps", type=int, default=350)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vgg16", default=None, help="VGG16 weights: the LPIPS-style distance instead of pixel-msssim")
    p.add_argument("--picture", default=None, help="write the targets and reconstructions to this PNG")
    p.add_argument("--json", default=None, help="write every measurement to this file")
    args = p.parse_args()
    started = time.time()
    result = run(args)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"load average {os.getloadavg()}, {time.time() - started:.0f} s in all")
    print(result["table"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in result.items()}, f, indent=1)


if __name__ == "__main__":
    main()
