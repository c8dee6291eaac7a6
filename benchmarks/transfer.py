"""Transfer learning on CPU: the kimg needed to reach a pixel-FID from scratch, and from a model pretrained on
other figures (``styleray train --init-from``, optionally with ``--freeze-d``).

    .venv/bin/python benchmarks/transfer.py [--pretrain-kimg 20] [--kimg 12] [--images 512] [--freeze-d 0 4]

The built-in sample figures (styleray.datasets.synthetic) at 16 px, preset cpu-tiny, one process (--no-ray),
--threads torch threads:
1. source: --pretrain-kimg on full-body figures (dataset seed 1), from scratch;
2. target: upper-body figures of other people (dataset seed 0) for --kimg, from scratch and from the source
   (once per --freeze-d value), measured every tick (--tick kimg) with the pixel proxy of FID (pixels-8x8 over
   --num-gen generated images: a proxy for layout and colour, not comparable with published FIDs).
Prints each run's curve, and for target values of the proxy (the scratch run's value at the end and half-way,
or --target-fid) the kimg each run needed to reach them; as Markdown and as JSON. Minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch


def framing_subset(n: int, seed: int, framing: str, out: str, resolution: int) -> str:
    """`n` sample figures of one framing: twice as many are drawn (framings alternate) and one half kept."""
    from styleray.datasets.synthetic import FRAMINGS, make_clean_training_set

    tmp = make_clean_training_set(os.path.join(out, f"all-{seed}"), n=2 * n, resolution=resolution, seed=seed)
    labels = json.loads((tmp / "dataset.json").read_text())["labels"]
    dest = os.path.join(out, f"{framing}-{seed}")
    os.makedirs(dest, exist_ok=True)
    kept = [[name, cls] for name, cls in labels if FRAMINGS[cls] == framing]
    for name, _ in kept:
        shutil.copy(tmp / name, os.path.join(dest, name))
    with open(os.path.join(dest, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump({"labels": kept, "classes": list(FRAMINGS)}, f)
    shutil.rmtree(tmp)
    return dest


def train_run(data: str, out: str, args, **settings) -> tuple[list[tuple[float, float]], float]:
    """Train; returns the measured (kimg, pixel-FID) of every tick and the wall seconds."""
    from styleray.platform.train.run import train
    from styleray.settings import TrainSettings

    start = time.time()
    train(TrainSettings(data=data, out=out, preset="cpu-tiny", no_ray=True, no_progress=True, device="cpu",
                        seed=args.seed, **settings))
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(r["kimg"], r["fid"]) for r in records if r.get("fid") is not None], time.time() - start


def kimg_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((kimg for kimg, fid in curve if fid <= target), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-kimg", type=float, default=20.0, help="source training on full-body figures")
    p.add_argument("--kimg", type=float, default=12.0, help="each target run on upper-body figures")
    p.add_argument("--images", type=int, default=512, help="figures per subset")
    p.add_argument("--tick", type=float, default=1.0, help="kimg between measurements")
    p.add_argument("--num-gen", type=int, default=1000, help="generated images per measurement")
    p.add_argument("--freeze-d", type=int, nargs="+", default=[0, 4], help="one transfer run per value")
    p.add_argument("--target-fid", type=float, nargs="*", default=None,
                   help="pixel-FID values to reach (default: the scratch run's at the end and half-way)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the cores are shared)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every run")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--grids", default=None, metavar="PNG",
                   help="also write the sample grids side by side: the source, then each target run after its "
                        "second tick and at the end")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work or tempfile.mkdtemp(prefix="styleray-transfer-")
    load_before = os.getloadavg()
    try:
        result = run_all(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"] = {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                         "load_before": load_before, "load_after": os.getloadavg()}
    print(report(result, args))
    print(json.dumps(result))
    return 0


def run_all(args, work: str) -> dict:
    source_data = framing_subset(args.images, 1, "full-body", work, 16)
    target_data = framing_subset(args.images, 0, "upper-body", work, 16)
    measured = dict(metrics=("fid",), extractor="pixels-8x8", metrics_every=1, metrics_num_gen=args.num_gen,
                    tick=args.tick, kimg=args.kimg)
    source = os.path.join(work, "source")
    _, pretrain_s = train_run(source_data, source, args, kimg=args.pretrain_kimg, tick=args.pretrain_kimg / 4, snap=4)
    runs = {"scratch": train_run(target_data, os.path.join(work, "scratch"), args, **measured)}
    for n in args.freeze_d:
        name = f"init-from{f' + freeze-d {n}' if n else ''}"
        runs[name] = train_run(target_data, os.path.join(work, name.replace(" ", "")), args, init_from=source,
                               freeze_d=n, **measured)
    if args.grids:
        compose_grids([source] + [os.path.join(work, n.replace(" ", "")) for n in runs], args.grids)
    scratch = runs["scratch"][0]
    targets = args.target_fid or [scratch[-1][1], scratch[len(scratch) // 2 - 1][1]]
    return {
        "pretrain_kimg": args.pretrain_kimg, "pretrain_s": pretrain_s,
        "curves": {k: c for k, (c, _) in runs.items()}, "seconds": {k: s for k, (_, s) in runs.items()},
        "targets": {f"{t:.4g}": {k: kimg_to_reach(c, t) for k, (c, _) in runs.items()} for t in targets},
    }


def compose_grids(run_dirs: list[str], path: str, scale: int = 2) -> None:
    """One PNG: the first run's last grid, then every other run's grid after its second tick and its last."""
    from PIL import Image

    def grids(run_dir: str) -> list[str]:
        folder = os.path.join(run_dir, "grids")
        return [os.path.join(folder, n) for n in sorted(os.listdir(folder))]

    files = grids(run_dirs[0])[-1:] + [g for d in run_dirs[1:] for g in (grids(d)[1], grids(d)[-1])]
    images = [Image.open(f).convert("RGB") for f in files]
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height + 4 for i in images)), "black")
    y = 0
    for image in images:
        out.paste(image, (0, y))
        y += image.height + 4
    out.resize((out.width * scale, out.height * scale), Image.NEAREST).save(path)


def report(result: dict, args) -> str:
    names = list(result["curves"])
    lines = [f"pretrained {result['pretrain_kimg']:g} kimg on full-body figures ({result['pretrain_s']:.0f} s); "
             f"targets: upper-body figures, {args.kimg:g} kimg each", "",
             "| kimg | " + " | ".join(f"pixel-FID {n}" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, (kimg, _) in enumerate(result["curves"]["scratch"]):
        row = [f"{result['curves'][n][i][1]:.4g}" if i < len(result["curves"][n]) else "" for n in names]
        lines.append(f"| {kimg:g} | " + " | ".join(row) + " |")
    lines += ["", "| pixel-FID to reach | " + " | ".join(f"kimg, {n}" for n in names) + " |",
              "|---" * (len(names) + 1) + "|"]
    for target, reached in result["targets"].items():
        cells = [f"{reached[n]:g}" if reached[n] is not None else f"> {args.kimg:g}" for n in names]
        lines.append(f"| ≤ {target} | " + " | ".join(cells) + " |")
    lines += ["", "wall seconds: " + ", ".join(f"{n} {s:.0f}" for n, s in result["seconds"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
