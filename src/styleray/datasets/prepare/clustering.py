"""``--clusters K``: k-means over simple image features; the cluster becomes the class label.

Features of a final square image (128 numbers, computed in the pipeline and kept in each image's record):

- colour: a 4x4x4 RGB histogram of the foreground (alpha >= 1/2), normalised, square-rooted (Hellinger), so
  that palette differences count;
- shape: the alpha mask averaged down to 8x8, so that pose and framing count.

Each half is L2-normalised and scaled by 1/sqrt(2), so both weigh the same. k-means is plain Lloyd with
k-means++ seeding, ``n_init`` restarts, a fixed seed; clusters are numbered by decreasing size (ties: by their
first member), so labels are reproducible.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

FEATURE_DIM = 128


def image_features(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """float32 [128] for a square image [R, R, 3] and its alpha [R, R]."""
    fg = rgb[alpha >= 0.5]
    q = (fg >> 6).astype(np.int32)  # 4 levels per channel
    hist = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64).astype(np.float32)
    colour = np.sqrt(hist / max(hist.sum(), 1.0))
    shape = np.asarray(Image.fromarray(alpha.astype(np.float32), "F").resize((8, 8), Image.Resampling.BOX),
                       np.float32).ravel()
    parts = [v / max(float(np.linalg.norm(v)), 1e-6) / np.sqrt(2.0) for v in (colour, shape)]
    return np.concatenate(parts).astype(np.float32)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        idx = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=d2 / total)
        centres.append(x[idx])
        d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return np.stack(centres)


def _sq_dist(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[n, k] squared distances without an [n, k, d] temporary."""
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None], 0.0)


def _lloyd(x: np.ndarray, centres: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray, float]:
    for _ in range(iters):
        d = _sq_dist(x, centres)  # [n, k]
        labels = d.argmin(1)
        new = np.stack([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(len(centres))])
        if np.allclose(new, centres):
            break
        centres = new
    d = _sq_dist(x, centres)
    labels = d.argmin(1)
    return labels, centres, float(d[np.arange(len(x)), labels].sum())


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 4, iters: int = 100) -> np.ndarray:
    """Cluster index per row of x [n, d], numbered by decreasing cluster size."""
    if not 1 <= k <= len(x):
        raise ValueError(f"--clusters {k} must be between 1 and the number of accepted images ({len(x)})")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        labels, _, inertia = _lloyd(x, _kmeans_pp(x, k, rng), iters)
        if best is None or inertia < best[1]:
            best = (labels, inertia)
    labels = best[0]
    sizes = np.bincount(labels, minlength=k)
    first = np.array([np.flatnonzero(labels == j)[0] if sizes[j] else len(x) for j in range(k)])
    order = sorted(range(k), key=lambda j: (-sizes[j], first[j]))
    remap = np.empty(k, np.int64)
    remap[order] = np.arange(k)
    return remap[labels]
