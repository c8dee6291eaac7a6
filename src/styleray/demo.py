"""``styleray demo``: the whole story on the built-in sample data, on one machine.

make the cartoon dataset -> train the cpu-tiny preset -> write a sample grid and a morph GIF.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def run_demo(args) -> int:
    import torch

    from styleray.config import RunConfig, resolve_preset
    from styleray.datasets.reader import BatchSampler, load_image_folder
    from styleray.datasets.synthetic import make_clean_training_set
    from styleray.models import sampling
    from styleray.platform.checkpoint import load_generator
    from styleray.platform.loop import LoopHooks, run_training

    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    out = os.path.abspath(args.out)
    data_dir, run_dir = os.path.join(out, "data"), os.path.join(out, "run")
    t0 = time.time()
    print(f"[1/3] making {args.images} sample images at {args.resolution}px in {data_dir}")
    make_clean_training_set(data_dir, n=args.images, resolution=args.resolution, seed=0)
    data = load_image_folder(data_dir)
    data.labels, data.num_classes = None, 0

    model, train = resolve_preset(
        "cpu-tiny", resolution=args.resolution, workers=1, train_overrides={"kimg": args.kimg, "mirror": True}
    )
    run = RunConfig(model=model, train=train, preset="cpu-tiny", data=data_dir, out=run_dir, device="cpu")
    print(f"[2/3] training cpu-tiny for {args.kimg} kimg -> {run_dir} (resumes if interrupted)")
    sampler = BatchSampler(data, train.batch_per_worker, seed=train.seed, mirror=train.mirror)
    summary = run_training(run, sampler, resume="latest", hooks=LoopHooks(progress=True))

    print("[3/3] sampling the trained generator")
    G, ckpt = load_generator(summary["checkpoint"] or run_dir)
    grid = sampling.image_grid(sampling.generate_images(G, list(range(64)), truncation_psi=0.8), cols=8, pad=2)
    grid_path = os.path.join(out, "grid.png")
    sampling.to_pil(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), 0).save(grid_path)
    frames = sampling.morph(G, [1, 2, 3, 4], steps=16, truncation_psi=0.8, loop=True)
    pil = [sampling.to_pil(f).resize((frames.shape[2] * 4, frames.shape[1] * 4)) for f in frames]
    gif_path = os.path.join(out, "morph.gif")
    pil[0].save(gif_path, save_all=True, append_images=pil[1:], duration=60, loop=0)
    print(f"done in {time.time() - t0:.0f}s: {grid_path}, {gif_path} (checkpoint {ckpt.uri}, {ckpt.kimg:.1f} kimg)")
    return 0
