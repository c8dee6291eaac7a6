"""``styleray generate``: images, a grid or a morph from a checkpoint's G_ema, written to a file or folder.

The latents are seeds, and projected images (``projected_w.npz`` from ``styleray project``): a morph between
two real images is ``--latents a/projected_w.npz,b/projected_w.npz --out morph.gif``. Images use the
generator's own noise maps (a projection's optimised maps are in its npz; after pivotal tuning they are the
tuned run's own).
"""

from __future__ import annotations

import io
import os

from styleray import storage

GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def write_samples(
    checkpoint: str,  # a checkpoint folder, or a run folder (its newest checkpoint)
    seeds: list[int],
    out: str,  # a .gif: a morph through the latents; an image file: a grid; else a folder of one PNG each
    *,
    truncation: float = 1.0,
    class_idx: int | None = None,
    noise_mode: str = "const",
    cols: int | None = None,
    steps: int = 24,  # morph frames between two latents
    latents: list[str] | None = None,  # projected_w.npz files (styleray project), before the seeds
):
    """Sample and write; returns the checkpoint that was used."""
    from styleray.models import sampling
    from styleray.platform.checkpoint import load_generator

    G, ckpt = load_generator(checkpoint)
    latents = latents or []
    if not seeds and not latents:
        raise ValueError("give --seeds, --latents or both")
    if latents and noise_mode == "random":
        raise ValueError("--noise random needs a seed per image; projected latents (--latents) have none")
    names = [f"latent{i:02d}" for i in range(len(latents))] + [f"seed{seed:06d}" for seed in seeds]
    ws = _latents_then_seeds(G, latents, seeds, truncation, class_idx)
    if out.lower().endswith(".gif"):
        if len(names) < 2:
            raise ValueError("a morph (.gif) needs at least two latents or seeds")
        sampling.check_frame_noise(noise_mode)
        frames = sampling.synthesize(G, sampling.lerp_frames(ws, steps), None, noise_mode)
        pil = [sampling.to_pil(f) for f in frames]
        buf = io.BytesIO()
        pil[0].save(buf, format="GIF", save_all=True, append_images=pil[1:], duration=40, loop=0)
        storage.write_bytes(out, buf.getvalue())
        return ckpt
    imgs = sampling.synthesize(G, ws, seeds if not latents else None, noise_mode)
    if out.lower().endswith(GRID_SUFFIXES):
        _write_image(out, sampling.to_pil(sampling.image_grid(imgs, cols=cols)))
    else:
        for name, img in zip(names, imgs):
            _write_image(storage.join(out, f"{name}.png"), sampling.to_pil(img))
    return ckpt


def _latents_then_seeds(G, latents: list[str], seeds: list[int], truncation: float, class_idx: int | None):
    """[N, num_ws, w_dim]: the w of each projected_w.npz (checked against G), then each seed's w."""
    import torch

    from styleray.models import sampling
    from styleray.platform.projection.outputs import read_latent

    parts = []
    for path in latents:
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            raise ValueError(f"--latents {path}: no such file") from None
        parts.append(read_latent(data, G.num_ws, G.w_dim, f"--latents {path}")[0][None])
    if seeds:
        parts.append(sampling.seeds_to_ws(G, seeds, truncation, class_idx=class_idx).cpu())
    return torch.cat(parts).to(next(G.parameters()).device)


def _write_image(path: str, image) -> None:
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(os.path.splitext(path)[1].lower(), "PNG")
    image.save(buf, format=fmt)
    storage.write_bytes(path, buf.getvalue())
