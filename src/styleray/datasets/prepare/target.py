"""One image as a projection target: decoded safely and framed the way ``prepare`` frames training images.

A generator only reproduces what looks like its training data, so a raw picture of a character goes through
the same steps as a raw training image (``pipeline.py``): safe decode (``decode.py``: pixel limit before
decoding, every mode to RGB, EXIF), the mask from the image's own alpha or the classic remover, crop to the
figure with a margin, pad to 1:1 on white, Lanczos to the model's resolution (``square.py``).

``frame``:
    prepare   always frame like ``prepare``
    resize    only composite any alpha on white, pad to a square on white (centred) and resize: the image
              as it is (a generated image, an already prepared one)
    auto      ``resize`` for a square image whose border is white (what ``prepare`` writes, or a generated
              figure on white), else ``prepare``
When the remover finds no figure, ``prepare`` falls back to ``resize`` and says so in ``Target.framing``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from styleray.datasets.prepare.decode import Rejected, decode_image
from styleray.datasets.prepare.removers import from_soft_alpha, segment_classic
from styleray.datasets.prepare.square import clean_alpha, on_white, square_on_white

FRAMES = ("auto", "prepare", "resize")
WHITE_LEVEL = 240  # a border pixel is white when each channel is at least this
WHITE_BORDER = 0.9  # ... and a border is white when this share of its pixels is
DEFAULT_MAX_PIXELS = 40_000_000  # as prepare's --max-pixels
DEFAULT_MARGIN = 0.05  # as prepare's --margin
MIN_SIDE = 16  # a target's shorter side must be at least this many pixels


class BadTarget(ValueError):
    """An image that cannot be a target; ``code`` is decode's reason code (unreadable, too-large, too-small)."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Target:
    image: np.ndarray  # [R, R, C] uint8 at the model's resolution (C = 3, or 1 for a grayscale model)
    framing: str  # what was done: "prepare", "resize", or "resize (no figure found)"
    width: int  # the source's size, pixels
    height: int
    mode: str  # the source's PIL mode


def frame_target(
    data: bytes,
    resolution: int,
    *,
    frame: str = "auto",
    channels: int = 3,  # the model's image channels (1: the result is converted to grayscale)
    margin: float = DEFAULT_MARGIN,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Target:
    """``data`` (an image file's bytes) as the model sees it; BadTarget when it is not a usable image."""
    if frame not in FRAMES:
        raise ValueError(f"--frame {frame!r} must be one of {', '.join(FRAMES)}")
    try:
        dec = decode_image(data, max_pixels=max_pixels, min_size=MIN_SIDE, work_size=max(1024, 2 * resolution))
    except Rejected as r:
        raise BadTarget(r.code, r.detail) from None
    if frame == "auto":
        frame = "resize" if _is_square_on_white(dec.rgb, dec.alpha) else "prepare"
    framing = frame
    if frame == "prepare":
        if dec.alpha is not None:
            seg = from_soft_alpha(dec.alpha.astype(np.float32) / 255.0)
        else:
            seg = segment_classic(dec.rgb)
        if seg.mask.any():
            image, _ = square_on_white(dec.rgb, clean_alpha(seg.alpha, seg.mask), seg.mask, resolution, margin)
        else:
            framing = "resize (no figure found)"
    if framing != "prepare":
        image = _pad_and_resize(on_white(dec.rgb, dec.alpha), resolution)
    if channels == 1:
        image = np.asarray(Image.fromarray(image).convert("L"))[..., None]
    return Target(np.ascontiguousarray(image), framing, dec.width, dec.height, dec.mode)


def _is_square_on_white(rgb: np.ndarray, alpha: np.ndarray | None) -> bool:
    h, w = rgb.shape[:2]
    if h != w:
        return False
    flat = on_white(rgb, alpha)
    border = np.concatenate([flat[0], flat[-1], flat[1:-1, 0], flat[1:-1, -1]])  # [perimeter, 3]
    return float((border >= WHITE_LEVEL).all(axis=1).mean()) >= WHITE_BORDER


def _pad_and_resize(rgb: np.ndarray, resolution: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    side = max(h, w)
    canvas = np.full((side, side, 3), 255, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = rgb
    img = Image.fromarray(canvas)
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(img)
