"""Helpers of the data-preparation tests (a uniquely named module: conftest.py is not importable by name)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from styleray.datasets.synthetic import render_figure

SIZE = 96  # sample figures: longer side, pixels


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height; a few hundred bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * (1 + 3 * 64) * 4)  # a few rows; the rest is missing
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


# name -> (bytes, expected reason code); None = a good image that must come out.
def awkward_files() -> dict[str, tuple[bytes, str | None]]:
    fig = lambda i: render_figure(i, size=SIZE, seed=5, background="solid")[0]  # noqa: E731
    gray16 = (np.asarray(fig(2).convert("L"), np.uint16) * 257).astype(np.uint16)
    cut, cut_mask, _ = render_figure(6, size=SIZE, seed=5, background="solid")
    rgba = cut.convert("RGBA")
    rgba.putalpha(Image.fromarray(cut_mask.astype(np.uint8) * 255))  # a cut-out: transparent background
    jpeg = _encoded(fig(7), "JPEG", quality=90)
    return {
        "good/plain.png": (_encoded(fig(1), "PNG"), None),
        "good/cmyk.jpg": (_encoded(fig(3).convert("CMYK"), "JPEG", quality=95), None),
        "good/gray16.png": (_encoded(Image.fromarray(gray16), "PNG"), None),
        "good/gray.png": (_encoded(fig(4).convert("L"), "PNG"), None),
        "good/palette.gif": (_encoded(fig(5).convert("P", palette=Image.Palette.ADAPTIVE), "GIF"), None),
        "good/rgba.png": (_encoded(rgba, "PNG"), None),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "unreadable"),
        "bad/empty.png": (b"", "unreadable"),
        "bad/text.png": (b"this is not a picture, just text pretending to be one\n" * 4, "unreadable"),
        "bad/tiny.png": (_encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "too-small"),
        "bad/bomb.png": (png_claiming(60000, 60000), "too-large"),
    }


class BorderContrastNet:
    """Builds a tiny torch segmentation 'network' (fixed weights): foreground = far from the corners' colour."""

    @staticmethod
    def build():
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.smooth = torch.nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
                self.head = torch.nn.Conv2d(1, 1, 1)
                with torch.no_grad():
                    self.smooth.weight.fill_(1.0 / 9)
                    self.head.weight.fill_(30.0)
                    self.head.bias.fill_(-12.0)

            def forward(self, x):  # [1, 3, 320, 320] ImageNet-normalised -> [1, 1, 320, 320]
                x = self.smooth(x)
                b = 12
                corners = torch.cat([x[..., :b, :b], x[..., :b, -b:], x[..., -b:, :b], x[..., -b:, -b:]], dim=3)
                bg = corners.mean(dim=(2, 3), keepdim=True)
                dist = ((x - bg) ** 2).sum(1, keepdim=True).sqrt()
                return torch.sigmoid(self.head(dist))

        return Net().eval()
