"""Per-image measurements on a decoded image and its mask: outlier checks, framing, perceptual hash.

Every statistic is documented next to its function, with the flag that thresholds it:

- ``mask_confidence`` (``--min-confidence``): from the remover; how clearly foreground and background separate.
- ``foreground_fraction`` (``--min-foreground``): the mask's share of the image.
- ``frame_touch`` (``--max-frame-touch``): the share of the image's outermost pixels (all four edges) that are
  foreground. A figure cut at the waist touches ~10-20%; a mask that is mostly background leaking in touches
  far more.
- ``cartoon_score`` (``--min-cartoon``): the share of foreground pixels covered by its 16 most frequent colours
  after quantising each channel to 4 bits (4096 bins). Flat-filled cartoons score ~0.9; photographs, whose
  shading and texture spread over hundreds of bins, score well under 0.5.
- framing (``--framing``): ``upper-body`` when the bottom edge cuts through at least 25% of the mask's
  bounding-box width and that box is less than 1.8 times as tall as it is wide (a standing figure whose feet
  touch the edge is tall and barely cut); ``full-body`` otherwise.
- ``phash`` (``--dup-distance``): a colour DCT perceptual hash of the decoded *source* image (so the remover's
  small differences between two copies do not count): per RGB channel, the 32x32 image's 8x8 lowest DCT
  frequencies without DC against their median (3 x 64 = 192 bits). Colour matters: figures drawn from one
  template differ mostly in palette. On the sample figures, distinct figures are >= 28 bits apart while a copy
  re-encoded as JPEG q70 at 85% size moves <= 14 bits at 256 px (<= 26 at 96 px); the default 20 sits between.
  Two images within ``--dup-distance`` bits are near-duplicates; the first in source order is kept.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from styleray.datasets.prepare.config import FRAMINGS

UPPER_BODY, FULL_BODY = FRAMINGS
UPPER_CUT = 0.25  # bottom-edge cut, fraction of the bbox width
UPPER_MAX_ASPECT = 1.8  # bbox height / width

# Rejection reason codes of this stage.
LOW_CONFIDENCE = "low-confidence"
FOREGROUND_TOO_SMALL = "foreground-too-small"
TOUCHES_FRAME = "touches-frame"
PHOTOGRAPHIC = "photographic"
NEAR_DUPLICATE = "near-duplicate"


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), exclusive ends, of the True pixels; None when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def foreground_fraction(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else 0.0


def frame_touch(mask: np.ndarray) -> float:
    """Share of the outermost pixels (the image's perimeter) that are foreground."""
    edge = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(edge.mean()) if edge.size else 0.0


def touched_edges(mask: np.ndarray, min_share: float = 0.02) -> dict[str, bool]:
    """Which edges the foreground is cut by (more than `min_share` of that edge's pixels)."""
    return {"top": mask[0].mean() > min_share, "bottom": mask[-1].mean() > min_share,
            "left": mask[:, 0].mean() > min_share, "right": mask[:, -1].mean() > min_share}


def cartoon_score(rgb: np.ndarray, mask: np.ndarray, max_side: int = 256) -> float:
    """Share of foreground pixels in the 16 most frequent 4-bit-per-channel colours (see module docstring)."""
    step = max(1, math.ceil(max(rgb.shape[:2]) / max_side))  # nearest subsampling: mixes no colours
    px = rgb[::step, ::step][mask[::step, ::step]]
    if len(px) == 0:
        return 0.0
    q = px >> 4
    codes = (q[:, 0].astype(np.int32) << 8) | (q[:, 1].astype(np.int32) << 4) | q[:, 2].astype(np.int32)
    counts = np.bincount(codes, minlength=4096)
    top = np.partition(counts, -16)[-16:]
    return float(top.sum() / len(px))


def classify_framing(mask: np.ndarray) -> str:
    """upper-body or full-body from the mask (rule in the module docstring)."""
    box = bbox(mask)
    if box is None:
        return FULL_BODY
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    band = mask[-max(1, mask.shape[0] // 100):]
    cut = band.any(axis=0).sum() / width
    return UPPER_BODY if cut >= UPPER_CUT and height / width < UPPER_MAX_ASPECT else FULL_BODY


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.astype(np.float64)


_DCT32 = None


def phash(rgb: np.ndarray) -> str:
    """192-bit colour perceptual hash as 48 hex digits (see the module docstring)."""
    global _DCT32
    if _DCT32 is None:
        _DCT32 = _dct_matrix(32)
    a = np.asarray(Image.fromarray(rgb).resize((32, 32), Image.Resampling.BOX), np.float64)  # [32, 32, 3]
    bits = []
    for c in range(3):
        d = _DCT32 @ a[..., c] @ _DCT32.T
        low = d[:8, :8].ravel()[1:]  # 63 coefficients, DC dropped
        bits.append(np.concatenate([[False], low > np.median(low)]))
    return np.packbits(np.concatenate(bits)).tobytes().hex()


def hamming(a: str, b: str) -> int:
    return int(np.bitwise_count(np.frombuffer(bytes.fromhex(a), np.uint8) ^ np.frombuffer(bytes.fromhex(b), np.uint8)).sum())


def near_duplicates(hashes: list[str], max_distance: int) -> list[int | None]:
    """For each hash, the index of an earlier kept one within `max_distance` bits (its original), else None.

    Greedy in order: an image is compared with the earlier *kept* ones only; O(n * kept) vectorised popcounts.
    """
    out: list[int | None] = [None] * len(hashes)
    if max_distance < 0 or not hashes:
        return out
    arr = np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes), dtype=np.uint64).reshape(len(hashes), -1)
    kept = np.empty_like(arr)
    kept_idx = np.empty(len(hashes), dtype=np.int64)
    n_kept = 0
    for i, h in enumerate(arr):
        if n_kept:
            dist = np.bitwise_count(kept[:n_kept] ^ h).sum(axis=1)
            j = int(np.argmin(dist))
            if dist[j] <= max_distance:
                out[i] = int(kept_idx[j])
                continue
        kept[n_kept], kept_idx[n_kept] = h, i
        n_kept += 1
    return out
