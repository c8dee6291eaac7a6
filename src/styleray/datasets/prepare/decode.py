"""Safe decoding of untrusted image bytes into 8-bit RGB plus an optional alpha channel.

- The pixel count is read from the header (``Image.open`` is lazy) and checked against ``max_pixels`` before a
  single pixel is decoded, so a decompression bomb (a tiny PNG whose header claims 60000x60000) costs nothing.
- EXIF orientation is applied; animated images give their first frame.
- Modes: ``1``/``L``/``P``/``YCbCr``/``LAB``/``HSV`` -> RGB; ``CMYK`` -> RGB; ``LA``/``PA``/``RGBa``/``La`` and
  palettes with transparency -> RGB + alpha; 16-bit (``I;16*``) and 32-bit (``I``, ``F``) greyscale are scaled
  to 8 bits (``I;16``: ``v / 257``; ``I``: the same when values exceed 255; ``F``: ``x 255`` when within 0..1).
- An alpha channel that is opaque everywhere is dropped (``alpha is None``).
- Large images are reduced on decode to at most ``work_size`` pixels on the longer side (JPEG's draft mode
  decodes at 1/2, 1/4, 1/8 scale directly), which bounds per-image memory and time.

Any failure becomes a :class:`Rejected` with a reason code and a human-readable detail, never an exception.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Rejection reason codes, shared by every stage (the report counts by code).
UNREADABLE = "unreadable"
TOO_LARGE = "too-large"
TOO_SMALL = "too-small"


class Rejected(Exception):
    """An image that does not make it into the dataset: `code` is one of the reason codes, `detail` says why."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass
class Decoded:
    rgb: np.ndarray  # [H, W, 3] uint8 (possibly reduced to work_size)
    alpha: np.ndarray | None  # [H, W] uint8, None when the image is opaque
    width: int  # original width (after EXIF rotation), pixels
    height: int  # original height (after EXIF rotation), pixels
    mode: str  # the source's PIL mode, for the report


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit greyscale and float images scaled into 8-bit L."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        a = a.astype(np.float32) / 257.0
    elif im.mode == "I":
        a = a.astype(np.float32)
        if a.max(initial=0) > 255:
            a = a / (257.0 if a.max() <= 65535 else float(a.max()) / 255.0)
    else:  # F
        a = a.astype(np.float32)
        if a.size and a.min() >= 0 and a.max() <= 1.0:
            a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _normalise_mode(im: Image.Image) -> Image.Image:
    """RGB or RGBA, whatever the source mode."""
    mode = im.mode
    if mode in ("RGB", "RGBA"):
        return im
    if mode.startswith("I") or mode == "F":
        return _to_8bit(im).convert("RGB")
    if mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if mode in ("LA", "La", "PA", "RGBa", "RGBX") or "A" in mode:
        return im.convert("RGBA")
    if mode == "L" and "transparency" in im.info:
        return im.convert("RGBA")
    return im.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def _reduce(im: Image.Image, work_size: int) -> Image.Image:
    longer = max(im.size)
    if longer <= work_size:
        return im
    scale = work_size / longer
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def decode_image(data: bytes, *, max_pixels: int, min_size: int, work_size: int) -> Decoded:
    """Decodes `data` or raises :class:`Rejected` (unreadable, too-large, too-small)."""
    if not data:
        raise Rejected(UNREADABLE, "empty file (0 bytes)")
    old_limit = Image.MAX_IMAGE_PIXELS
    try:
        # Our own check below decides; PIL's bomb check must not fire first on a legitimate large limit.
        Image.MAX_IMAGE_PIXELS = max(int(max_pixels), 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise Rejected(TOO_LARGE, f"{e} (--max-pixels {max_pixels})") from None
            except UnidentifiedImageError:
                raise Rejected(UNREADABLE, f"not an image PIL can identify ({len(data)} bytes)") from None
            except (OSError, ValueError, SyntaxError) as e:  # broken headers
                raise Rejected(UNREADABLE, f"corrupt header: {e}") from None
            w, h = im.size
            if w * h > max_pixels:
                raise Rejected(TOO_LARGE, f"{w}x{h} = {w * h} pixels > --max-pixels {max_pixels}")
            if min(w, h) < min_size:
                raise Rejected(TOO_SMALL, f"{w}x{h}: shorter side < --min-size {min_size}")
            source_mode = im.mode
            try:
                if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
                    w, h = h, w
                if im.format == "JPEG" and max(w, h) > 2 * work_size:
                    im.draft(None, (work_size, work_size))  # decode at a reduced scale
                im.load()
                im = ImageOps.exif_transpose(im)
                im = _normalise_mode(im)
                im = _reduce(im, work_size)
            except Image.DecompressionBombError as e:
                raise Rejected(TOO_LARGE, str(e)) from None
            except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
                raise Rejected(UNREADABLE, f"truncated or corrupt {im.format or 'image'} data: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    arr = np.asarray(im)
    alpha = None
    if im.mode == "RGBA":
        alpha = np.ascontiguousarray(arr[..., 3])
        arr = arr[..., :3]
        if alpha.min() >= 255:
            alpha = None
    return Decoded(rgb=np.ascontiguousarray(arr, dtype=np.uint8), alpha=alpha, width=w, height=h,
                   mode=source_mode)
