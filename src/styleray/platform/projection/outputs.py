"""What a projection leaves in its folder (local or s3://), every file written atomically (``storage``).

    target.png          the target as the model sees it (framed like prepare, at the model's resolution)
    reconstruction.png  G(w) with the projection's noise maps
    side_by_side.png    target | reconstruction (| after pivotal tuning), enlarged to >= 128 px a tile
    progress.gif        target | reconstruction as the search (and the tuning) went
    curve.png           distance and PSNR per step
    projected_w.npz     w [1, num_ws, w_dim] (the reference's key and shape), the noise maps
                        (``noise.<buffer>``) and ``meta`` (JSON text)
    pti/                with --pti-steps: a run folder holding the tuned generator (checkpoints/ckpt-*)
    summary.json        written last: its presence means the target is done (a re-run skips it)
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from styleray import storage

SUMMARY = "summary.json"
LATENT = "projected_w.npz"
PTI_RUN = "pti"
MIN_TILE = 128  # side-by-side tiles and GIF frames are enlarged (nearest) to at least this many pixels


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> [H, W, C] uint8, rounded as every image styleray writes (sampling.to_uint8)."""
    from styleray.models.sampling import to_uint8 as batch_to_uint8

    return batch_to_uint8(image[None])[0]


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    _pil(array).save(buf, format="PNG")
    return buf.getvalue()


def side_by_side(tiles: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Tiles [H, W, C] uint8 in a row on white, enlarged by an integer factor to >= MIN_TILE px."""
    h, w, c = tiles[0].shape
    k = max(1, -(-MIN_TILE // h))
    big = [np.repeat(np.repeat(t, k, axis=0), k, axis=1) for t in tiles]
    row = np.full((h * k, len(tiles) * (w * k + gap) - gap, c), 255, np.uint8)
    for i, t in enumerate(big):
        row[:, i * (w * k + gap) : i * (w * k + gap) + w * k] = t
    return row


def gif_bytes(frames: list[np.ndarray], ms_per_frame: int = 80) -> bytes:
    pil = [_pil(f) for f in frames]
    buf = io.BytesIO()
    pil[0].save(buf, format="GIF", save_all=True, append_images=pil[1:], duration=ms_per_frame, loop=0)
    return buf.getvalue()


def latent_npz(ws: torch.Tensor, noise: dict[str, torch.Tensor], meta: dict) -> bytes:
    arrays = {"w": ws[None].float().numpy(), "meta": np.array(json.dumps(meta, sort_keys=True))}
    arrays.update({f"noise.{k}": v.float().numpy() for k, v in noise.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_latent(data: bytes, num_ws: int, w_dim: int, source: str = LATENT) -> tuple[torch.Tensor, dict]:
    """(w [num_ws, w_dim], meta) of a projected_w.npz; ValueError when it does not fit this generator."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            w = npz["w"]
            meta = json.loads(str(npz["meta"])) if "meta" in npz.files else {}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{source}: not a projected latent (an .npz with a 'w' array): {e}") from None
    w = w[0] if w.ndim == 3 and w.shape[0] == 1 else w
    if w.shape != (num_ws, w_dim):
        made = f" (made with {meta['checkpoint']}, {meta.get('resolution')} px)" if "checkpoint" in meta else ""
        raise ValueError(f"{source}: w of shape {list(w.shape)}{made} does not fit this generator, which takes "
                         f"[{num_ws}, {w_dim}]: project the image again with this checkpoint")
    return torch.from_numpy(np.ascontiguousarray(w)).float(), meta


def write_summary(out_dir: str, summary: dict) -> None:
    """The last file of a finished target (its presence marks the target done)."""
    storage.write_bytes(storage.join(out_dir, SUMMARY), json.dumps(summary, indent=2, sort_keys=True).encode())


def read_summary(out_dir: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(out_dir, SUMMARY)))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a damaged summary: the target is projected again
