"""From an image and its foreground alpha to the final square picture on white.

1. Crop to the foreground's bounding box grown by ``margin`` (a fraction of the box's longer side) on every
   side, clamped to the image.
2. Composite on white: ``out = rgb * alpha + 255 * (1 - alpha)``; background pixels (alpha 0) are pure white.
3. Pad to 1:1 on white. The crop is centred, except along an axis where the figure is cut by the image's edge:
   there it stays flush with that edge (a bust cut at the waist keeps the cut on the bottom edge instead of
   floating above a white band).
4. Resize to ``resolution`` with Lanczos. The result is RGB, exactly ``resolution`` square.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from styleray.datasets.prepare.checks import bbox, touched_edges


def on_white(rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """uint8 RGB with its uint8 alpha composited on white (transparent pixels have no colour of their own)."""
    if alpha is None:
        return rgb
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.clip(rgb * a + 255.0 * (1.0 - a), 0, 255).astype(np.uint8)


def clean_alpha(alpha: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Soft alpha with its tails snapped (< 0.1 -> 0, > 0.9 -> 1) and zero away from the cleaned mask."""
    from scipy import ndimage

    a = np.where(alpha < 0.1, 0.0, np.where(alpha > 0.9, 1.0, alpha)).astype(np.float32)
    near = ndimage.binary_dilation(mask, iterations=2)
    a[~near] = 0.0
    a[mask & (a < 0.5)] = np.maximum(a[mask & (a < 0.5)], 0.5)  # the mask decides what is figure
    return a


def square_on_white(rgb: np.ndarray, alpha: np.ndarray, mask: np.ndarray, resolution: int,
                    margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [R, R, 3], alpha float32 [R, R]) for a non-empty `mask` (see the module docstring)."""
    box = bbox(mask)
    if box is None:
        raise ValueError("square_on_white needs a non-empty mask")
    h, w = mask.shape
    x0, y0, x1, y1 = box
    pad = int(round(margin * max(x1 - x0, y1 - y0)))
    x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    a = alpha[y0:y1, x0:x1, None]
    comp = rgb[y0:y1, x0:x1].astype(np.float32) * a + 255.0 * (1.0 - a)  # [h', w', 3]
    ch, cw = comp.shape[:2]
    side = max(ch, cw)
    cut = touched_edges(mask)
    left = 0 if cut["left"] and not cut["right"] else side - cw if cut["right"] and not cut["left"] else (side - cw) // 2
    top = 0 if cut["top"] and not cut["bottom"] else side - ch if cut["bottom"] and not cut["top"] else (side - ch) // 2
    canvas = np.full((side, side, 3), 255.0, np.float32)
    canvas[top:top + ch, left:left + cw] = comp
    acanvas = np.zeros((side, side), np.float32)
    acanvas[top:top + ch, left:left + cw] = a[..., 0]
    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    out_alpha = np.asarray(Image.fromarray(acanvas, "F").resize((resolution, resolution), Image.Resampling.BILINEAR))
    return np.asarray(img), np.clip(out_alpha, 0.0, 1.0)
