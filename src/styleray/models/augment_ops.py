"""The image operations the ADA augment pipe executes: batched homogeneous matrices, exact pixel blitting,
one-resampling geometric transforms, colour matrices, the image-space filter bank and cutout.

Each function is deterministic: `augment.AugmentPipe` draws the parameters and calls these. Pixel coordinates
are centered: pixel (i, j) of an H x W image sits at (x, y) = (j - (W - 1) / 2, i - (H - 1) / 2). Geometric
matrices are *inverse* transforms: they map an output pixel to the input position it samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Cohen-Daubechies-Feauveau 9/7 biorthogonal wavelet low-pass pair (the JPEG 2000 lossy filters), derived from
# the halfband polynomial 1 + 4y + 10y^2 + 20y^3, y = sin^2(w/2): both filters have 4 zeros at Nyquist, the
# 7-tap one takes the factor of the real root. Both are symmetric (linear phase: no shift, so flips and
# 90-degree rotations through `resample` are exact) and biorthogonal: sum_m DOWN[m] UP[m + 2l] = [l == 0],
# which makes `_downsample2x(_upsample2x(x)) == x`. (The reference implementation uses the orthogonal Symlet-6,
# which is not symmetric: its nonlinear phase shifts mirrored content by about 0.4 pixel.)
CDF97_UP = (
    -0.09127176311425017, -0.05754352622850029, 0.5912717631142504, 1.115087052457001,
    0.5912717631142504, -0.05754352622850029, -0.09127176311425017,
)  # fmt: skip  # interpolation filter, sum 2 (the gain of 2x zero insertion)
CDF97_DOWN = (
    0.026748757410810075, -0.01686411844287497, -0.07822326652899025, 0.2668641184428747, 0.6029490182363602,
    0.2668641184428747, -0.07822326652899025, -0.01686411844287497, 0.026748757410810075,
)  # fmt: skip  # anti-aliasing filter, sum 1


# The 4-point interpolating half-band low-pass (the autocorrelation of the Daubechies-2 wavelet, over 2):
# lo(w) + lo(w + pi) = 1, so a low-pass and its mirrored high-pass hi[k] = (-1)^k lo[k] add up to the identity.
# The image-space filter bank of the reference's `imgfilter` splits images into octaves with it.
HALFBAND_LO = (-1 / 32, 0.0, 9 / 32, 1 / 2, 9 / 32, 0.0, -1 / 32)
FILTER_BANDS = 4  # octaves of the image-space filter bank, lowest first
FILTER_EXPECTED_POWER = (10 / 13, 1 / 13, 1 / 13, 1 / 13)  # a 1/f spectrum's share of each octave

# ---------------------------------------------------------------------------------------------------------
# Batched homogeneous matrices. Every parameter is a [batch] tensor; every result is [batch, 3, 3] (2D) or
# [batch, 4, 4] (color space).


def _matrix(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    """Stacks a matrix whose entries are [batch] tensors or Python numbers into [batch, rows, cols]."""
    entries = [e if isinstance(e, torch.Tensor) else torch.full_like(like, float(e)) for row in rows for e in row]
    return torch.stack(entries, dim=-1).reshape(like.shape[0], len(rows), len(rows[0]))


def translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], like=tx)  # [batch, 3, 3]


def scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], like=sx)  # [batch, 3, 3]


def rotate2d(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise rotation (in x-right, y-down pixel coordinates: clockwise on screen)."""
    return _matrix([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], like=cos)  # [batch, 3, 3]


def translate3d(t: torch.Tensor) -> torch.Tensor:
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], like=t)  # [batch, 4, 4]


def scale3d(s: torch.Tensor) -> torch.Tensor:
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], like=s)  # [batch, 4, 4]


def rotate3d(axis: tuple[float, ...], theta: torch.Tensor) -> torch.Tensor:
    """Rotation by `theta` [batch] around the unit `axis` (x, y, z, ...): Rodrigues' formula
    R = cos I + sin [axis]_x + (1 - cos) axis axis^T, embedded in a 4x4 matrix."""
    x, y, z = axis[:3]
    c, s = torch.cos(theta), torch.sin(theta)
    k = 1 - c
    return _matrix(
        [
            [c + x * x * k, x * y * k - z * s, x * z * k + y * s, 0],
            [y * x * k + z * s, c + y * y * k, y * z * k - x * s, 0],
            [z * x * k - y * s, z * y * k + x * s, c + z * z * k, 0],
            [0, 0, 0, 1],
        ],
        like=theta,
    )  # [batch, 4, 4]


# ---------------------------------------------------------------------------------------------------------
# Geometric transforms.


def _reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Maps integer indices onto [0, size) by mirror reflection without repeating the edge (like
    `F.pad(mode='reflect')`)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= size, period - index, index)


def blit(images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Exact pixel blitting: output pixel c takes input pixel round(inverse @ c), borders reflected.

    images [N, C, H, W]; inverse [N, 3, 3] with integer-valued translation and a signed-permutation 2x2 part.
    """
    n, c, h, w = images.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=images.device, dtype=inverse.dtype) - (h - 1) / 2,
        torch.arange(w, device=images.device, dtype=inverse.dtype) - (w - 1) / 2,
        indexing="ij",
    )
    coords = torch.stack([xs.flatten(), ys.flatten(), torch.ones_like(xs.flatten())])  # [3, H*W]
    source = inverse @ coords  # [N, 3, H*W]
    sx = _reflect_index(torch.round(source[:, 0] + (w - 1) / 2).long(), w)  # [N, H*W]
    sy = _reflect_index(torch.round(source[:, 1] + (h - 1) / 2).long(), h)  # [N, H*W]
    index = (sy * w + sx).unsqueeze(1).expand(n, c, h * w)  # [N, C, H*W]
    return images.reshape(n, c, h * w).gather(2, index).reshape(n, c, h, w)


def _upsample2x(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Zero insertion + separable FIR (odd length K, gain 2 per axis), full support:
    [M, 1, h, w] -> [M, 1, 2h + K - 2, 2w + K - 2]. Output index j sits at input position (j - (K - 1) / 2) / 2."""
    k = taps.numel()
    x = F.conv_transpose2d(x, taps.view(1, 1, k, 1), stride=(2, 1))
    return F.conv_transpose2d(x, taps.view(1, 1, 1, k), stride=(1, 2))


def _downsample2x(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable FIR (odd length K, gain 1) + decimation, valid support:
    [M, 1, h, w] -> [M, 1, (h - K) / 2 + 1, (w - K) / 2 + 1]. Output n is centered on input index 2n + (K - 1) / 2."""
    k = taps.numel()
    x = F.conv2d(x, taps.view(1, 1, k, 1), stride=(2, 1))
    return F.conv2d(x, taps.view(1, 1, 1, k), stride=(1, 2))


def resample(
    images: torch.Tensor,  # [N, C, H, W]
    inverse: torch.Tensor,  # [N, 3, 3] maps centered output pixel coordinates to centered input ones
    up_taps: torch.Tensor,  # [Ku] symmetric interpolation filter, Ku odd, sum 2
    down_taps: torch.Tensor,  # [Kd] symmetric anti-aliasing filter, Kd odd, sum 1, biorthogonal to up_taps
) -> torch.Tensor:
    """Applies one general 2D transform per image with a single resampling: reflect-pad, upsample 2x, bilinear
    `grid_sample` on the 2x grid, filter and downsample 2x. Returns [N, C, H, W]."""
    n, c, h, w = images.shape
    ku, kd = up_taps.numel(), down_taps.numel()
    up_taps, down_taps = up_taps.to(images.dtype), down_taps.to(images.dtype)

    # Output samples on the 2x grid: (2H + Kd - 2) x (2W + Kd - 2), exactly what the downsampling filter reads
    # to make H x W pixels. Their centered positions span +-half (input pixel units).
    out_h, out_w = 2 * h + kd - 2, 2 * w + kd - 2
    half_x, half_y = (w - 1) / 2 + (kd - 1) / 4, (h - 1) / 2 + (kd - 1) / 4

    # Reflect-pad so that every position the transform samples, widened by the reach of the upsampling filter
    # and the bilinear footprint ((Ku - 1) / 4 + 1 / 4 input pixels), lies on real or mirrored pixels. Reflect
    # padding allows at most size - 1; beyond that grid_sample reads zeros. One host sync.
    corners = torch.tensor(
        [[-half_x, half_x, half_x, -half_x], [-half_y, -half_y, half_y, half_y], [1, 1, 1, 1]],
        dtype=inverse.dtype, device=inverse.device,
    )  # [xy1, 4]
    sampled = (inverse @ corners)[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, N * 4]
    extent = torch.cat([-sampled, sampled]).amax(dim=1).tolist()  # furthest positions [-x, -y, +x, +y]
    pad_x0, pad_y0, pad_x1, pad_y1 = (
        min(max(math.ceil(e - (size - 1) / 2 + ku / 4), 0), size - 1)
        for e, size in zip(extent, (w, h, w, h))
    )
    x = F.pad(images, [pad_x0, pad_x1, pad_y0, pad_y1], mode="reflect")  # [N, C, Hp, Wp]
    padded_h, padded_w = x.shape[2:]

    x = _upsample2x(x.reshape(n * c, 1, padded_h, padded_w), up_taps)  # [N*C, 1, 2Hp + Ku - 2, 2Wp + Ku - 2]
    in_h, in_w = x.shape[2:]
    x = x.reshape(n, c, in_h, in_w)

    # affine_grid works in normalized coordinates (align_corners=False). Map output normalized -> centered
    # pixels (s_out), apply the inverse transform, map centered pixels -> input normalized (s_in^-1). The
    # padded image's center sits at ((pad_x1 - pad_x0) / 2, (pad_y1 - pad_y0) / 2) in centered coordinates.
    s_out = torch.diag(inverse.new_tensor([out_w / 4, out_h / 4, 1.0]))
    s_in = inverse.new_tensor([[in_w / 4, 0, (pad_x1 - pad_x0) / 2], [0, in_h / 4, (pad_y1 - pad_y0) / 2], [0, 0, 1]])
    theta = torch.linalg.inv(s_in) @ inverse @ s_out  # [N, 3, 3]
    grid = F.affine_grid(theta[:, :2, :].to(images.dtype), [n, c, out_h, out_w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [N, C, out_h, out_w]

    x = _downsample2x(x.reshape(n * c, 1, out_h, out_w), down_taps)  # [N*C, 1, H, W]
    return x.reshape(n, c, h, w)


def apply_color(images: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """images [N, C, H, W] with C in {1, 3}; color [N, 4, 4] homogeneous RGB transform.

    One channel is treated as gray (r = g = b): its gain is the mean row sum of the matrix's RGB part and its
    offset the mean offset, so a luma flip negates it, as in the reference."""
    n, c, h, w = images.shape
    flat = images.reshape(n, c, h * w)  # [N, C, H*W]
    if c == 3:
        flat = color[:, :3, :3] @ flat + color[:, :3, 3:]  # [N, 3, H*W]
    else:
        gain = color[:, :3, :3].sum(dim=2).mean(dim=1)  # [N]
        offset = color[:, :3, 3].mean(dim=1)  # [N]
        flat = flat * gain[:, None, None] + offset[:, None, None]  # [N, 1, H*W]
    return flat.reshape(n, c, h, w)


# ---------------------------------------------------------------------------------------------------------
# Image-space filtering and corruptions.


def octave_filter_bank(bands: int = FILTER_BANDS) -> torch.Tensor:
    """[bands, K] symmetric FIR filters that split a signal into octaves (band 0 the lowest) and add up to
    the identity: each iteration moves the bands found so far down an octave (2x zero insertion, then the
    half-band low-pass) and puts the half-band high-pass at the top. K = 43 for 4 bands."""
    lo = np.asarray(HALFBAND_LO)
    hi = lo * (-1.0) ** (np.arange(lo.size) - lo.size // 2)
    rows = [np.ones(1)] + [np.zeros(1)] * (bands - 1)
    for top in range(1, bands):
        rows = [np.convolve(_zero_insert(row), lo) for row in rows]
        margin = (rows[top].size - hi.size) // 2
        rows[top][margin : margin + hi.size] += hi
    return torch.as_tensor(np.stack(rows), dtype=torch.float64)


def _zero_insert(taps: np.ndarray) -> np.ndarray:
    out = np.zeros(2 * taps.size - 1)
    out[::2] = taps
    return out


def _reflect_pad(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect padding by ``pad`` on every side, of any size (mirrored again past the far edge, where
    `F.pad` refuses pads larger than the image)."""
    h, w = images.shape[-2:]
    device = images.device
    rows = _reflect_index(torch.arange(-pad, h + pad, device=device), h)
    cols = _reflect_index(torch.arange(-pad, w + pad, device=device), w)
    return images.index_select(-2, rows).index_select(-1, cols)


def apply_filter_bank(
    images: torch.Tensor,  # [N, C, H, W]
    gains: torch.Tensor,  # [N, bands] amplification of each octave, per image
    bank: torch.Tensor,  # [bands, K] from `octave_filter_bank`
) -> torch.Tensor:
    """Filters each image with its own separable FIR sum_b gains[n, b] * bank[b] (reflect-padded borders).
    Runs as convolutions with the shared band filters and a per-image weighted sum, so its double backward is
    made of plain convolutions."""
    n, c, h, w = images.shape
    bands, k = bank.shape
    bank = bank.to(images.dtype)
    x = _reflect_pad(images, k // 2).reshape(n * c, 1, h + k - 1, w + k - 1)
    x = F.conv2d(x, bank.view(bands, 1, 1, k))  # [N*C, bands, H + K - 1, W]
    x = torch.einsum("ncbhw,nb->nchw", x.reshape(n, c, bands, h + k - 1, w), gains.to(images.dtype))
    x = F.conv2d(x.reshape(n * c, 1, h + k - 1, w), bank.view(bands, 1, k, 1))  # [N*C, bands, H, W]
    return torch.einsum("ncbhw,nb->nchw", x.reshape(n, c, bands, h, w), gains.to(images.dtype))


def cutout_mask(
    height: int,
    width: int,
    center: torch.Tensor,  # [N, 2] rectangle centers (x, y), fractions of the image size
    size: torch.Tensor,  # [N] rectangle side, fraction of the image size (0 = no cutout)
) -> torch.Tensor:
    """[N, 1, H, W] float mask: 0 inside each image's rectangle, 1 elsewhere."""
    device = center.device
    xs = (torch.arange(width, device=device) + 0.5) / width  # pixel centers, fractions of the width
    ys = (torch.arange(height, device=device) + 0.5) / height
    half = size[:, None] / 2  # [N, 1]
    outside_x = (xs[None, :] - center[:, :1]).abs() >= half  # [N, W]
    outside_y = (ys[None, :] - center[:, 1:]).abs() >= half  # [N, H]
    return (outside_x[:, None, None, :] | outside_y[:, None, :, None]).to(center.dtype)
