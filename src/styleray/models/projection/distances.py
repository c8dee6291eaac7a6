"""How far a generated image is from the target: the distances a projection minimises, and PSNR.

A :class:`Distance` embeds images once (``embed``) and compares embeddings (``compare``), so the target is
embedded once per projection, not once per step. Two are provided:

* ``vgg16`` (:mod:`styleray.models.projection.vgg16`): LPIPS-style, on VGG16 features; needs a local
  weights file.
* ``pixel-msssim`` (here): ``mse_weight * MSE + (1 - MS-SSIM)`` on images scaled to [0, 1]. Needs no
  weights. MS-SSIM is Wang, Simoncelli and Bovik's multi-scale SSIM (2003): Gaussian windows (sigma 1.5),
  contrast-structure terms at the finer scales and the full SSIM at the coarsest, combined with the
  published exponents, renormalised over the scales a small image has (each scale at least 8 px).

Images are float tensors ``[N, C, H, W]`` in [-1, 1] (the generator's range).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PIXEL_MSSSIM = "pixel-msssim"
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # per-scale exponents, finest first (Wang et al.)
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # stabilisers for a dynamic range of 1
MIN_SCALE_SIDE = 8  # MS-SSIM uses only scales at least this many pixels on a side


class Distance(nn.Module):
    """embed(images) once, compare(embedded, embedded) per step; lower is closer. A named registry entry."""

    name: str = ""
    description: str = ""

    def embed(self, images: torch.Tensor) -> object:  # [N, C, H, W] in [-1, 1]
        raise NotImplementedError

    def compare(self, a: object, b: object) -> torch.Tensor:  # -> [N]
        raise NotImplementedError

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # [N]
        return self.compare(self.embed(images), self.embed(target))


def psnr(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1], on the 0..255 scale: [N] (inf when equal)."""
    a = ((images.float() + 1) * 127.5).clamp(0, 255)
    b = ((target.float() + 1) * 127.5).clamp(0, 255)
    mse = (a - b).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(255.0**2 / mse)


def psnr_uint8(a, b) -> float:
    """PSNR in dB of two uint8 arrays of the same shape (what is written to disk)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---------------------------------------------------------------------------------------------------------
# MS-SSIM
# ---------------------------------------------------------------------------------------------------------


def _gaussian_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # [size]


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' (no padding): [N, C, H, W] -> [N, C, H-k+1, W-k+1]."""
    c, k = x.shape[1], window.numel()
    x = F.conv2d(x, window.to(x).reshape(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, window.to(x).reshape(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def _ssim_terms(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(luminance * contrast-structure, contrast-structure), each averaged over pixels and channels: [N]."""
    mu_a, mu_b = _blur(a, window), _blur(b, window)
    var_a = _blur(a * a, window) - mu_a**2
    var_b = _blur(b * b, window) - mu_b**2
    cov = _blur(a * b, window) - mu_a * mu_b
    cs = (2 * cov + SSIM_C2) / (var_a + var_b + SSIM_C2)
    lum = (2 * mu_a * mu_b + SSIM_C1) / (mu_a**2 + mu_b**2 + SSIM_C1)
    return (lum * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def msssim_scales(side: int) -> int:
    """How many MS-SSIM scales an image of this side has (each at least MIN_SCALE_SIDE px, at most 5)."""
    if side < MIN_SCALE_SIDE:
        raise ValueError(f"MS-SSIM needs images of at least {MIN_SCALE_SIDE} px, got {side}")
    return min(len(MSSSIM_WEIGHTS), int(math.log2(side / MIN_SCALE_SIDE)) + 1)


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of images in [0, 1]: [N] in (0, 1], 1 when equal."""
    scales = msssim_scales(min(a.shape[-2:]))
    weights = torch.tensor(MSSSIM_WEIGHTS[:scales], device=a.device)
    weights = weights / weights.sum()
    smallest = min(a.shape[-2:]) >> (scales - 1)
    window = _gaussian_window(min(11, smallest - 1 + smallest % 2))  # odd, fits the coarsest scale
    values = []
    for s in range(scales):
        ssim, cs = _ssim_terms(a, b, window)
        values.append(ssim if s == scales - 1 else cs)
        if s < scales - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    stacked = torch.stack(values, dim=1).clamp(min=1e-6)  # [N, scales]; negative cs would make the power NaN
    return stacked.pow(weights).prod(dim=1)


class PixelMSSSIM(Distance):
    """``mse_weight * MSE + (1 - MS-SSIM)`` on images scaled to [0, 1]: needs no weights."""

    name = PIXEL_MSSSIM
    description = "pixel MSE + (1 - multi-scale SSIM) (no VGG16 weights)"

    def __init__(self, mse_weight: float = 10.0):  # weight of the MSE (on [0, 1]) against 1 - MS-SSIM
        super().__init__()
        self.mse_weight = mse_weight

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() + 1) / 2  # [N, C, H, W] in [0, 1]

    def compare(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b = b.expand_as(a)
        mse = (a - b).square().flatten(1).mean(1)
        return self.mse_weight * mse + (1 - ms_ssim(a, b))
