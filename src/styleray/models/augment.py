"""Adaptive discriminator augmentation (ADA), the `bgc` set of StyleGAN2-ADA.

Karras et al., "Training Generative Adversarial Networks with Limited Data" (NeurIPS 2020), section 2 and
appendix B. Every augmentation is applied to each image independently with probability `p` (times the op's
multiplier). `p` is tuned during training by `AdaController` so that the discriminator's overfitting
heuristic r_t = E[sign(D(real))] stays near a target.

The pipeline has three stages, in the paper's order:

1. Pixel blitting (xflip, rotate90, xint). Composed into one integer 3x3 matrix per image and applied
   by exact index gathering with reflected borders: no interpolation, so a flipped image is *exactly* flipped.
2. General geometric transforms (scale, rotate, aniso, xfrac). Composed into one 3x3 matrix per image and
   applied with a single resampling (`resample`): reflect-pad by the margin the transform needs, upsample 2x
   with a smooth interpolation filter, bilinear `grid_sample` on the 2x grid, anti-alias filter and
   downsample 2x (the paper's Appendix B.2 idea, simplified). The filters are the symmetric CDF 9/7
   biorthogonal wavelet pair, so the up/down pair is exactly the identity for the identity transform and
   mirror-symmetric transforms are not shifted. Images where no general op fired still go through the
   resampling when another image of the batch needs it (identity up to float rounding, ~1e-6); a batch where
   none fired skips it.
3. Color transforms (brightness, contrast, lumaflip, hue, saturation). Composed into one 4x4 homogeneous
   color matrix per image and applied to RGB. lumaflip, hue and saturation act around the luma axis
   (1, 1, 1)/sqrt(3); for 1-channel images only brightness and contrast apply.

Everything is differentiable w.r.t. the images, including double backward (R1 regularization takes the
gradient of D(augment(x)) w.r.t. x with `create_graph=True` and backpropagates it again). On torch 2.13,
`F.grid_sample` supports double backward for its input natively (grid_sampler_2d_backward is itself
differentiable), so no custom autograd function is needed; `tests/models/test_augment.py` checks this
with `gradgradcheck` so a torch upgrade that loses it fails loudly.

All randomness comes from torch's global RNG on the images' device, so saving/restoring RNG state makes a
resumed run draw the same augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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

# Unit luma axis in homogeneous RGB coordinates: lumaflip, hue and saturation act around it.
_LUMA_AXIS = (1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3), 0.0)


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
# Executing transforms on images. Pixel coordinates are centered: pixel (i, j) of an H x W image sits at
# (x, y) = (j - (W - 1) / 2, i - (H - 1) / 2). Matrices are *inverse* transforms: they map an output pixel
# to the input position it samples.


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
    For one channel the matrix must be gain * I plus an offset (brightness and contrast only)."""
    n, c, h, w = images.shape
    flat = images.reshape(n, c, h * w)  # [N, C, H*W]
    if c == 3:
        flat = color[:, :3, :3] @ flat + color[:, :3, 3:]  # [N, 3, H*W]
    else:
        flat = flat * color[:, :1, :1] + color[:, :1, 3:]  # [N, 1, H*W]
    return flat.reshape(n, c, h, w)


# ---------------------------------------------------------------------------------------------------------


def _non_negative(name: str, value: float) -> float:
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"AugmentPipe({name}={value}) must be a finite number >= 0 (0 disables it)")
    return float(value)


class AugmentPipe(torch.nn.Module):
    """StyleGAN2-ADA augmentation pipeline with the `bgc` ops. Each multiplier scales the overall
    probability `p` (a buffer, 0 at start, set by `AdaController`); 0 disables the op."""

    def __init__(
        self,
        xflip: float = 1,  # probability multiplier for x-flip
        rotate90: float = 1,  # probability multiplier for rotation by a random multiple of 90 degrees
        xint: float = 1,  # probability multiplier for integer translation
        xint_max: float = 0.125,  # range of integer translation, fraction of image size
        scale: float = 1,  # probability multiplier for isotropic scaling
        rotate: float = 1,  # probability multiplier for arbitrary rotation
        aniso: float = 1,  # probability multiplier for anisotropic scaling
        xfrac: float = 1,  # probability multiplier for fractional translation
        scale_std: float = 0.2,  # log2 standard deviation of isotropic scaling
        rotate_max: float = 1,  # range of arbitrary rotation, 1 = full circle
        aniso_std: float = 0.2,  # log2 standard deviation of anisotropic scaling
        xfrac_std: float = 0.125,  # standard deviation of fractional translation, fraction of image size
        brightness: float = 1,  # probability multiplier for brightness
        contrast: float = 1,  # probability multiplier for contrast
        lumaflip: float = 1,  # probability multiplier for luma flip (RGB only)
        hue: float = 1,  # probability multiplier for hue rotation (RGB only)
        saturation: float = 1,  # probability multiplier for saturation (RGB only)
        brightness_std: float = 0.2,  # standard deviation of the brightness offset, image units ([-1, 1] range)
        contrast_std: float = 0.5,  # log2 standard deviation of contrast
        hue_max: float = 1,  # range of hue rotation, 1 = full circle
        saturation_std: float = 1,  # log2 standard deviation of saturation
    ) -> None:
        super().__init__()
        self.xflip = _non_negative("xflip", xflip)
        self.rotate90 = _non_negative("rotate90", rotate90)
        self.xint = _non_negative("xint", xint)
        self.xint_max = _non_negative("xint_max", xint_max)
        self.scale = _non_negative("scale", scale)
        self.rotate = _non_negative("rotate", rotate)
        self.aniso = _non_negative("aniso", aniso)
        self.xfrac = _non_negative("xfrac", xfrac)
        self.scale_std = _non_negative("scale_std", scale_std)
        self.rotate_max = _non_negative("rotate_max", rotate_max)
        self.aniso_std = _non_negative("aniso_std", aniso_std)
        self.xfrac_std = _non_negative("xfrac_std", xfrac_std)
        self.brightness = _non_negative("brightness", brightness)
        self.contrast = _non_negative("contrast", contrast)
        self.lumaflip = _non_negative("lumaflip", lumaflip)
        self.hue = _non_negative("hue", hue)
        self.saturation = _non_negative("saturation", saturation)
        self.brightness_std = _non_negative("brightness_std", brightness_std)
        self.contrast_std = _non_negative("contrast_std", contrast_std)
        self.hue_max = _non_negative("hue_max", hue_max)
        self.saturation_std = _non_negative("saturation_std", saturation_std)
        self.register_buffer("p", torch.zeros([]))  # overall augmentation probability, tuned by AdaController
        self.register_buffer("up_taps", torch.tensor(CDF97_UP, dtype=torch.float64), persistent=False)
        self.register_buffer("down_taps", torch.tensor(CDF97_DOWN, dtype=torch.float64), persistent=False)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4f}"

    # -- parameter sampling: one function per stage, drawing from the global RNG on `device` -----------------

    @staticmethod
    def _fires(n: int, probability: float, device: torch.device) -> torch.Tensor:
        return torch.rand([n], device=device) < probability  # [N] bool

    def _blit_inverse(self, n: int, h: int, w: int, p: float, device: torch.device) -> torch.Tensor:
        """Inverse pixel-blitting matrix per image, [N, 3, 3] with integer entries."""
        eye = torch.eye(3, device=device).expand(n, 3, 3)
        inverse = eye
        zeros = torch.zeros([n], device=device)
        if self.xflip > 0:
            flip = torch.floor(torch.rand([n], device=device) * 2)
            flip = torch.where(self._fires(n, self.xflip * p, device), flip, zeros)
            inverse = inverse @ scale2d(1 - 2 * flip, torch.ones_like(flip))  # a flip is its own inverse
        if self.rotate90 > 0:
            quarter = torch.floor(torch.rand([n], device=device) * 4)
            quarter = torch.where(self._fires(n, self.rotate90 * p, device), quarter, zeros).long()
            cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[quarter]  # exact, no trigonometry
            sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[quarter]
            inverse = inverse @ rotate2d(cos, -sin)
        if self.xint > 0:
            shift = (torch.rand([n, 2], device=device) * 2 - 1) * self.xint_max  # [N, xy], fraction of size
            shift = torch.where(self._fires(n, self.xint * p, device)[:, None], shift, torch.zeros_like(shift))
            inverse = inverse @ translate2d(-torch.round(shift[:, 0] * w), -torch.round(shift[:, 1] * h))
        return inverse

    def _general_inverse(self, n: int, h: int, w: int, p: float, device: torch.device) -> torch.Tensor:
        """Inverse general geometric matrix per image, [N, 3, 3]."""
        inverse = torch.eye(3, device=device).expand(n, 3, 3)
        ones = torch.ones([n], device=device)
        zeros = torch.zeros([n], device=device)
        if self.scale > 0:
            s = torch.exp2(torch.randn([n], device=device) * self.scale_std)
            s = torch.where(self._fires(n, self.scale * p, device), s, ones)
            inverse = inverse @ scale2d(1 / s, 1 / s)
        # Rotation is split into a pre- and a post-rotation around the anisotropic scaling, each firing with
        # p_rot such that P(pre or post) = 1 - (1 - p_rot)^2 = rotate * p.
        p_rot = 1 - math.sqrt(min(max(1 - self.rotate * p, 0.0), 1.0))
        for position in ("pre", "post"):
            if self.rotate > 0:
                theta = (torch.rand([n], device=device) * 2 - 1) * math.pi * self.rotate_max
                theta = torch.where(self._fires(n, p_rot, device), theta, zeros)
                inverse = inverse @ rotate2d(torch.cos(-theta), torch.sin(-theta))
            if position == "pre" and self.aniso > 0:
                s = torch.exp2(torch.randn([n], device=device) * self.aniso_std)
                s = torch.where(self._fires(n, self.aniso * p, device), s, ones)
                inverse = inverse @ scale2d(1 / s, s)
        if self.xfrac > 0:
            shift = torch.randn([n, 2], device=device) * self.xfrac_std  # [N, xy], fraction of size
            shift = torch.where(self._fires(n, self.xfrac * p, device)[:, None], shift, torch.zeros_like(shift))
            inverse = inverse @ translate2d(-shift[:, 0] * w, -shift[:, 1] * h)
        return inverse

    def _color_matrix(self, n: int, channels: int, p: float, device: torch.device) -> torch.Tensor:
        """Forward color matrix per image, [N, 4, 4] acting on homogeneous RGB (r, g, b, 1)."""
        eye = torch.eye(4, device=device)
        color = eye.expand(n, 4, 4)
        if self.brightness > 0:
            b = torch.randn([n], device=device) * self.brightness_std
            b = torch.where(self._fires(n, self.brightness * p, device), b, torch.zeros_like(b))
            color = translate3d(b) @ color
        if self.contrast > 0:
            c = torch.exp2(torch.randn([n], device=device) * self.contrast_std)
            c = torch.where(self._fires(n, self.contrast * p, device), c, torch.ones_like(c))
            color = scale3d(c) @ color
        if channels == 1:
            return color
        luma = torch.tensor(_LUMA_AXIS, device=device)  # [4]
        luma_outer = torch.outer(luma, luma)  # [4, 4] projection onto the luma axis
        if self.lumaflip > 0:
            flip = torch.floor(torch.rand([n, 1, 1], device=device) * 2)
            flip = torch.where(self._fires(n, self.lumaflip * p, device)[:, None, None], flip, torch.zeros_like(flip))
            color = (eye - 2 * luma_outer * flip) @ color  # Householder reflection across the chroma plane
        if self.hue > 0:
            theta = (torch.rand([n], device=device) * 2 - 1) * math.pi * self.hue_max
            theta = torch.where(self._fires(n, self.hue * p, device), theta, torch.zeros_like(theta))
            color = rotate3d(_LUMA_AXIS, theta) @ color
        if self.saturation > 0:
            s = torch.exp2(torch.randn([n, 1, 1], device=device) * self.saturation_std)
            s = torch.where(self._fires(n, self.saturation * p, device)[:, None, None], s, torch.ones_like(s))
            color = (luma_outer + (eye - luma_outer) * s) @ color  # scale chroma, keep luma
        return color

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W], float, about [-1, 1]; returns the same shape and dtype."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"AugmentPipe expects float images [N, C, H, W], got {got}")
        p = float(self.p)
        if p <= 0:
            return images  # exact identity, no random draws
        n, channels, h, w = images.shape
        uses_color = self.brightness > 0 or self.contrast > 0 or (
            channels == 3 and (self.lumaflip > 0 or self.hue > 0 or self.saturation > 0)
        )
        if uses_color and channels not in (1, 3):
            raise ValueError(
                f"color augmentations need 1 or 3 channels, got {channels}: "
                "set brightness=contrast=lumaflip=hue=saturation=0 for other channel counts"
            )
        device = images.device
        work_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        x = images.to(work_dtype)

        if self.xflip > 0 or self.rotate90 > 0 or self.xint > 0:
            x = blit(x, self._blit_inverse(n, h, w, p, device).to(work_dtype))
        if self.scale > 0 or self.rotate > 0 or self.aniso > 0 or self.xfrac > 0:
            inverse = self._general_inverse(n, h, w, p, device).to(work_dtype)
            if not torch.equal(inverse, torch.eye(3, dtype=work_dtype, device=device).expand_as(inverse)):
                x = resample(x, inverse, self.up_taps, self.down_taps)
        if uses_color:
            x = apply_color(x, self._color_matrix(n, channels, p, device).to(work_dtype))
        return x.to(images.dtype)


# ---------------------------------------------------------------------------------------------------------


class AdaController:
    """Adjusts `AugmentPipe.p` from the overfitting heuristic r_t = E[sign(D(real))].

    Every `interval` training steps: p += sign(r_t - target) * batch_size * interval / (ada_kimg * 1000),
    clamped at 0, so p can move from 0 to 1 in `ada_kimg` thousand images.
    """

    def __init__(
        self,
        batch_size: int,  # total batch size over all workers, images per training step
        target: float = 0.6,  # r_t the controller steers towards
        ada_kimg: float = 500,  # thousands of images for p to move by 1
        interval: int = 4,  # training steps between adjustments
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"AdaController(batch_size={batch_size}) must be >= 1")
        if not 0 <= target <= 1:
            raise ValueError(f"AdaController(target={target}) must be in [0, 1] (the paper uses 0.6)")
        if not ada_kimg > 0:
            raise ValueError(f"AdaController(ada_kimg={ada_kimg}) must be > 0 (the paper uses 500)")
        if interval < 1:
            raise ValueError(f"AdaController(interval={interval}) must be >= 1 (the paper uses 4)")
        self.batch_size = int(batch_size)
        self.target = float(target)
        self.ada_kimg = float(ada_kimg)
        self.interval = int(interval)
        self.last_r_t: float | None = None  # r_t of the latest adjustment
        self._signs_sum = torch.zeros([], dtype=torch.float64)  # sum of sign(D(real)) since the last adjustment
        self._signs_count = torch.zeros([], dtype=torch.float64)  # number of logits summed

    @property
    def adjustment(self) -> float:
        """Size of one p step."""
        return self.batch_size * self.interval / (self.ada_kimg * 1000)

    def accumulate(self, real_logits: torch.Tensor) -> None:
        """Adds sign statistics of the discriminator's logits on real images (any shape). No host sync."""
        signs = real_logits.detach().sign().to(torch.float64)
        self._signs_sum = self._signs_sum.to(signs.device) + signs.sum()
        self._signs_count = self._signs_count.to(signs.device) + signs.numel()

    def stats_tensor(self) -> torch.Tensor:
        """[sum, count] float64 on the device logits were accumulated on: all-reduce (sum) it across workers,
        then hand it back with `load_stats`."""
        return torch.stack([self._signs_sum, self._signs_count])

    def load_stats(self, stats: torch.Tensor) -> None:
        """Replaces the accumulated statistics with `stats` [sum, count] (e.g. all-reduced)."""
        if stats.shape != (2,):
            raise ValueError(f"AdaController.load_stats expects a [sum, count] tensor, got shape {tuple(stats.shape)}")
        stats = stats.detach().to(torch.float64)
        self._signs_sum, self._signs_count = stats[0].clone(), stats[1].clone()

    def is_due(self, batch_idx: int) -> bool:
        """Whether `step` adjusts p after `batch_idx` completed training steps."""
        return batch_idx > 0 and batch_idx % self.interval == 0

    def step(
        self,
        batch_idx: int,  # completed training steps, counted from 1 after the first
        pipe: AugmentPipe,
        all_reduce: Callable[[torch.Tensor], Any] | None = None,  # in-place sum across workers; None: one worker
    ) -> float | None:
        """Adjusts `pipe.p` when due and resets the statistics. Returns r_t, or None when p was not adjusted
        (not due, or no logits accumulated)."""
        if not self.is_due(batch_idx):
            return None
        if all_reduce is not None:
            stats = self.stats_tensor()
            all_reduce(stats)
            self.load_stats(stats)
        total, count = self.stats_tensor().tolist()  # one host sync per interval
        self.load_stats(torch.zeros(2, dtype=torch.float64))
        if count == 0:
            return None
        r_t = total / count
        direction = (r_t > self.target) - (r_t < self.target)  # sign(r_t - target)
        with torch.no_grad():
            pipe.p.copy_((pipe.p + direction * self.adjustment).clamp_min(0))
        self.last_r_t = r_t
        return r_t

    def state_dict(self) -> dict[str, float | None]:
        """Plain floats (loadable with weights_only=True). p itself is in `AugmentPipe.state_dict()`."""
        total, count = self.stats_tensor().tolist()
        return {"signs_sum": total, "signs_count": count, "last_r_t": self.last_r_t}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        missing = {"signs_sum", "signs_count", "last_r_t"} - set(state)
        if missing:
            raise KeyError(f"AdaController state is missing {sorted(missing)}")
        self.load_stats(torch.tensor([float(state["signs_sum"]), float(state["signs_count"])], dtype=torch.float64))
        self.last_r_t = None if state["last_r_t"] is None else float(state["last_r_t"])
