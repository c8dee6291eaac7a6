"""A weights-free proxy extractor: the image's colours on a coarse grid.

``pixels-8x8`` averages each image down to 8x8 and returns its RGB values scaled to [-1, 1]: 192 features.
Fréchet distance and KID over these features compare the layout and colour statistics of generated images
with the data's (blobs in the wrong place, wrong palette, too little variety: mode collapse), but not texture
or detail. It is a proxy for FID, not FID: numbers are not comparable with any published FID, and the sweep
command names it as such (``pixel-fid``) wherever it reports it. Use it when the Inception-v3 weights are
not available (offline machines, CI).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PIXELS_EXTRACTOR = "pixels-8x8"
PIXEL_GRID = 8  # side of the grid the image is averaged down to
PIXEL_FEATURE_DIM = 3 * PIXEL_GRID * PIXEL_GRID


class PixelGrid(nn.Module):
    """uint8 [N, C, H, W] (C = 1 or 3, H = W >= PIXEL_GRID) -> float [N, 3 * grid * grid] in [-1, 1]."""

    def __init__(self, grid: int = PIXEL_GRID):  # grid: side of the averaged image, in pixels
        super().__init__()
        self.grid = grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1  # [N, C, H, W]
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if x.shape[-1] < self.grid or x.shape[-2] < self.grid:
            raise ValueError(f"images of {x.shape[-1]}x{x.shape[-2]} px are smaller than the {self.grid}x{self.grid} grid")
        return F.adaptive_avg_pool2d(x, self.grid).flatten(1)  # [N, 3 * grid * grid]


def build_pixel_grid(weights: str | None = None) -> PixelGrid:
    """The registry's build function: there are no weights (a path is an error, not ignored)."""
    if weights:
        raise ValueError(f"--extractor {PIXELS_EXTRACTOR} has no weights; drop --inception {weights}")
    return PixelGrid()
