"""uint8 arrays -> response bytes: PNG/JPEG/WebP images, GIF/WebP animations, zips of PNGs (Pillow)."""

from __future__ import annotations

import io
import zipfile
from typing import Sequence

import numpy as np
from PIL import Image

PNG_COMPRESS_LEVEL = 3  # zlib level: 6 (Pillow's default) costs ~2x the time for ~5 % smaller files


def _pil(array: np.ndarray) -> Image.Image:
    """[H, W, C] uint8 with C = 1 or 3 -> a PIL image (L or RGB)."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"expected a [H, W, 1|3] uint8 array, got {array.dtype} {array.shape}")
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def encode_image(array: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """One image as png, jpeg or webp (quality 100: lossless WebP)."""
    im = _pil(array)
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif fmt == "jpeg":
        im.save(buf, format="JPEG", quality=int(quality))
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=int(quality), lossless=quality >= 100, method=4)
    else:
        raise ValueError(f"image format {fmt!r} must be png, jpeg or webp")
    return buf.getvalue()


def encode_animation(frames: Sequence[np.ndarray] | np.ndarray, fmt: str, fps: int, quality: int = 90) -> bytes:
    """Frames as an endlessly looping gif or webp animation (quality 100: lossless WebP).

    Both encoders fold a frame identical to the one before it into that frame's duration, so the decoded
    frame count can be lower than ``len(frames)`` while the timing is unchanged.
    """
    if len(frames) == 0:
        raise ValueError("an animation needs at least one frame")
    ims = [_pil(f) for f in frames]
    duration = max(1, round(1000 / fps))  # ms per frame
    buf = io.BytesIO()
    if fmt == "gif":
        ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=duration, loop=0)
    elif fmt == "webp":
        ims[0].save(
            buf, format="WEBP", save_all=True, append_images=ims[1:], duration=duration, loop=0,
            quality=int(quality), lossless=quality >= 100, method=4,
        )
    else:
        raise ValueError(f"animation format {fmt!r} must be gif or webp")
    return buf.getvalue()


def encode_zip(named_pngs: Sequence[tuple[str, np.ndarray]]) -> bytes:
    """A zip of PNGs (stored, not deflated: PNG is already compressed)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in named_pngs:
            zf.writestr(name, encode_image(array, "png"))
    return buf.getvalue()
