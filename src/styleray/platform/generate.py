"""``styleray generate``: images, a grid or a morph from a checkpoint's G_ema, written to a file or folder."""

from __future__ import annotations

import io
import os

from styleray import storage

GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def write_samples(
    checkpoint: str,  # a checkpoint folder, or a run folder (its newest checkpoint)
    seeds: list[int],
    out: str,  # a .gif: a morph through the seeds; an image file: a grid; else a folder of one PNG per seed
    *,
    truncation: float = 1.0,
    class_idx: int | None = None,
    noise_mode: str = "const",
    cols: int | None = None,
    steps: int = 24,  # morph frames between two seeds
):
    """Sample and write; returns the checkpoint that was used."""
    from styleray.models import sampling
    from styleray.platform.checkpoint import load_generator

    G, ckpt = load_generator(checkpoint)
    if out.lower().endswith(".gif"):
        frames = sampling.morph(G, seeds, steps=steps, truncation_psi=truncation, class_idx=class_idx)
        pil = [sampling.to_pil(f) for f in frames]
        buf = io.BytesIO()
        pil[0].save(buf, format="GIF", save_all=True, append_images=pil[1:], duration=40, loop=0)
        storage.write_bytes(out, buf.getvalue())
        return ckpt
    imgs = sampling.generate_images(G, seeds, truncation_psi=truncation, class_idx=class_idx, noise_mode=noise_mode)
    if out.lower().endswith(GRID_SUFFIXES):
        _write_image(out, sampling.to_pil(sampling.image_grid(imgs, cols=cols)))
    else:
        for seed, img in zip(seeds, imgs):
            _write_image(storage.join(out, f"seed{seed:06d}.png"), sampling.to_pil(img))
    return ckpt


def _write_image(path: str, image) -> None:
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(os.path.splitext(path)[1].lower(), "PNG")
    image.save(buf, format=fmt)
    storage.write_bytes(path, buf.getvalue())
