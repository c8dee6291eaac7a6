"""Adaptive discriminator augmentation (ADA): the augment pipe of StyleGAN2-ADA, every op of the reference.

Karras et al., "Training Generative Adversarial Networks with Limited Data" (NeurIPS 2020), section 2 and
appendix B. Every augmentation is applied to each image independently with probability `p` (times the op's
multiplier). `p` is tuned during training by `ada.AdaController`. `AugmentPipe.named("bgc")` builds the
reference's `--augpipe` sets (config.AUGMENT_PIPES: blit, geom, color, filter, noise, cutout, bg ... bgcfnc).

The stages, in the paper's order (`augment_ops` executes them):

1. Geometric transforms: pixel blitting (xflip, rotate90, xint) and the general ones (scale, rotate, aniso,
   xfrac) are composed into one 3x3 matrix per image and applied with a single resampling of the
   reflect-padded original (`resample`: upsample 2x, bilinear `grid_sample`, downsample 2x), as the
   reference does. The filter pair differs from the reference's: the symmetric CDF 9/7 biorthogonal wavelet
   pair instead of the orthogonal Symlet-6, because it has linear phase: the up/down pair is exactly the
   identity for the identity transform, flips and 90-degree rotations through the resampling are exact
   (sym6 shifts mirrored content by about 0.4 pixel), and the two differ by the filter's response only
   (about 3e-2 on smooth images). When no general op is enabled (`blit`), the integer matrices are applied
   by exact index gathering instead, which equals the resampling up to float rounding.
2. Color transforms (brightness, contrast, lumaflip, hue, saturation): one 4x4 homogeneous color matrix per
   image, acting around the luma axis (1, 1, 1)/sqrt(3). One-channel images are gray: brightness, contrast
   and luma flip (a negation) apply, hue and saturation do not.
3. Image-space filtering (imgfilter): each of four octaves amplified by a random log-normal gain, the total
   power kept for a 1/f spectrum.
4. Corruptions: additive Gaussian noise of a random strength (noise), a zeroed rectangle (cutout).

Every op draws its random numbers in the reference's order and shapes. Everything is differentiable w.r.t.
the images, including double backward (R1 regularization backpropagates through D(augment(x)) twice); on
torch 2.13 `F.grid_sample` supports double backward natively, and `tests/models/test_augment.py` checks it
with `gradgradcheck`. All randomness comes from torch's global RNG on the images' device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from styleray.config import AUGMENT_PIPES
from styleray.models.augment_ops import (
    CDF97_DOWN,
    CDF97_UP,
    FILTER_BANDS,
    FILTER_EXPECTED_POWER,
    apply_color,
    apply_filter_bank,
    blit,
    cutout_mask,
    octave_filter_bank,
    resample,
    rotate2d,
    rotate3d,
    scale2d,
    scale3d,
    translate2d,
    translate3d,
)

# Unit luma axis in homogeneous RGB coordinates: lumaflip, hue and saturation act around it.
_LUMA_AXIS = (1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3), 0.0)
_BLIT_OPS = ("xflip", "rotate90", "xint")
_GENERAL_OPS = ("scale", "rotate", "aniso", "xfrac")


@dataclass(frozen=True)
class AugmentSpec:
    """Which ops the pipe applies and how strongly. Each multiplier scales the overall probability p (0
    disables the op). Defaults: the `bgc` set with the reference's ranges."""

    xflip: float = 1  # probability multiplier for x-flip
    rotate90: float = 1  # probability multiplier for rotation by a random multiple of 90 degrees
    xint: float = 1  # probability multiplier for integer translation
    xint_max: float = 0.125  # range of integer translation, fraction of image size
    scale: float = 1  # probability multiplier for isotropic scaling
    rotate: float = 1  # probability multiplier for arbitrary rotation
    aniso: float = 1  # probability multiplier for anisotropic scaling
    xfrac: float = 1  # probability multiplier for fractional translation
    scale_std: float = 0.2  # log2 standard deviation of isotropic scaling
    rotate_max: float = 1  # range of arbitrary rotation, 1 = full circle
    aniso_std: float = 0.2  # log2 standard deviation of anisotropic scaling
    xfrac_std: float = 0.125  # standard deviation of fractional translation, fraction of image size
    brightness: float = 1  # probability multiplier for brightness
    contrast: float = 1  # probability multiplier for contrast
    lumaflip: float = 1  # probability multiplier for luma flip (a negation for one-channel images)
    hue: float = 1  # probability multiplier for hue rotation (RGB only)
    saturation: float = 1  # probability multiplier for saturation (RGB only)
    brightness_std: float = 0.2  # standard deviation of the brightness offset, image units ([-1, 1] range)
    contrast_std: float = 0.5  # log2 standard deviation of contrast
    hue_max: float = 1  # range of hue rotation, 1 = full circle
    saturation_std: float = 1  # log2 standard deviation of saturation
    imgfilter: float = 0  # probability multiplier for image-space filtering
    imgfilter_bands: tuple[float, ...] = (1, 1, 1, 1)  # probability multipliers of the octaves, lowest first
    imgfilter_std: float = 1  # log2 standard deviation of an octave's amplification
    noise: float = 0  # probability multiplier for additive Gaussian noise
    noise_std: float = 0.1  # standard deviation of the noise's strength, image units
    cutout: float = 0  # probability multiplier for cutout
    cutout_size: float = 0.5  # side of the cutout square, fraction of image size

    def __post_init__(self) -> None:
        object.__setattr__(self, "imgfilter_bands", tuple(self.imgfilter_bands))  # a list is fine too
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for v in value if isinstance(value, tuple) else (value,):
                if not math.isfinite(float(v)) or float(v) < 0:
                    each = "each value " if isinstance(value, tuple) else ""
                    raise ValueError(f"AugmentPipe({f.name}={value}): {each}must be a finite number >= 0 (0 disables it)")
        if len(self.imgfilter_bands) != FILTER_BANDS:
            raise ValueError(f"AugmentPipe(imgfilter_bands={self.imgfilter_bands}) needs {FILTER_BANDS} values")

    @classmethod
    def named(cls, name: str) -> "AugmentSpec":
        """The reference's ``--augpipe NAME``: the ops of ``config.AUGMENT_PIPES[name]`` on, every other off."""
        if name not in AUGMENT_PIPES:
            raise ValueError(f"augment pipe {name!r} is unknown; choose one of: {', '.join(AUGMENT_PIPES)}")
        ops = {op for ops in AUGMENT_PIPES.values() for op in ops}
        return cls(**{op: float(op in AUGMENT_PIPES[name]) for op in ops})


class AugmentPipe(torch.nn.Module):
    """StyleGAN2-ADA augmentation pipeline. ``AugmentPipe(**ops)`` takes `AugmentSpec`'s fields (default: `bgc`);
    ``AugmentPipe.named("bgcfnc")`` a named set. `p` is a buffer, 0 at start, set by `ada.AdaController`."""

    def __init__(self, spec: AugmentSpec | None = None, **ops: float) -> None:
        super().__init__()
        if spec is not None and ops:
            raise ValueError("AugmentPipe takes an AugmentSpec or keyword settings, not both")
        self.spec = spec if spec is not None else AugmentSpec(**ops)
        self.register_buffer("p", torch.zeros([]))  # overall augmentation probability, tuned by AdaController
        self.register_buffer("up_taps", torch.tensor(CDF97_UP, dtype=torch.float64), persistent=False)
        self.register_buffer("down_taps", torch.tensor(CDF97_DOWN, dtype=torch.float64), persistent=False)
        self.register_buffer("filter_bank", octave_filter_bank(), persistent=False)  # [bands, taps]

    @classmethod
    def named(cls, name: str) -> "AugmentPipe":
        return cls(AugmentSpec.named(name))

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4f}"

    # -- parameter sampling: one function per stage, drawing from the global RNG on `device` -----------------

    @staticmethod
    def _fires(n: int, probability: float, device: torch.device) -> torch.Tensor:
        return torch.rand([n], device=device) < probability  # [N] bool

    def _blit_inverse(self, n: int, h: int, w: int, p: float, device: torch.device) -> torch.Tensor:
        """Inverse pixel-blitting matrix per image, [N, 3, 3] with integer entries."""
        s = self.spec
        inverse = torch.eye(3, device=device).expand(n, 3, 3)
        zeros = torch.zeros([n], device=device)
        if s.xflip > 0:
            flip = torch.floor(torch.rand([n], device=device) * 2)
            flip = torch.where(self._fires(n, s.xflip * p, device), flip, zeros)
            inverse = inverse @ scale2d(1 - 2 * flip, torch.ones_like(flip))  # a flip is its own inverse
        if s.rotate90 > 0:
            quarter = torch.floor(torch.rand([n], device=device) * 4)
            quarter = torch.where(self._fires(n, s.rotate90 * p, device), quarter, zeros).long()
            cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[quarter]  # exact, no trigonometry
            sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[quarter]
            inverse = inverse @ rotate2d(cos, sin)  # samples the input rotated by quarter * 90 degrees
        if s.xint > 0:
            shift = (torch.rand([n, 2], device=device) * 2 - 1) * s.xint_max  # [N, xy], fraction of size
            shift = torch.where(self._fires(n, s.xint * p, device)[:, None], shift, torch.zeros_like(shift))
            inverse = inverse @ translate2d(-torch.round(shift[:, 0] * w), -torch.round(shift[:, 1] * h))
        return inverse

    def _general_inverse(self, n: int, h: int, w: int, p: float, device: torch.device) -> torch.Tensor:
        """Inverse general geometric matrix per image, [N, 3, 3]."""
        s = self.spec
        inverse = torch.eye(3, device=device).expand(n, 3, 3)
        ones = torch.ones([n], device=device)
        zeros = torch.zeros([n], device=device)
        if s.scale > 0:
            scale = torch.exp2(torch.randn([n], device=device) * s.scale_std)
            scale = torch.where(self._fires(n, s.scale * p, device), scale, ones)
            inverse = inverse @ scale2d(1 / scale, 1 / scale)
        # Rotation is split into a pre- and a post-rotation around the anisotropic scaling, each firing with
        # p_rot such that P(pre or post) = 1 - (1 - p_rot)^2 = rotate * p.
        p_rot = 1 - math.sqrt(min(max(1 - s.rotate * p, 0.0), 1.0))
        for position in ("pre", "post"):
            if s.rotate > 0:
                theta = (torch.rand([n], device=device) * 2 - 1) * math.pi * s.rotate_max
                theta = torch.where(self._fires(n, p_rot, device), theta, zeros)
                inverse = inverse @ rotate2d(torch.cos(theta), torch.sin(theta))
            if position == "pre" and s.aniso > 0:
                aniso = torch.exp2(torch.randn([n], device=device) * s.aniso_std)
                aniso = torch.where(self._fires(n, s.aniso * p, device), aniso, ones)
                inverse = inverse @ scale2d(1 / aniso, aniso)
        if s.xfrac > 0:
            shift = torch.randn([n, 2], device=device) * s.xfrac_std  # [N, xy], fraction of size
            shift = torch.where(self._fires(n, s.xfrac * p, device)[:, None], shift, torch.zeros_like(shift))
            inverse = inverse @ translate2d(-shift[:, 0] * w, -shift[:, 1] * h)
        return inverse

    def _color_matrix(self, n: int, channels: int, p: float, device: torch.device) -> torch.Tensor:
        """Forward color matrix per image, [N, 4, 4] acting on homogeneous RGB (r, g, b, 1)."""
        s = self.spec
        eye = torch.eye(4, device=device)
        color = eye.expand(n, 4, 4)
        if s.brightness > 0:
            b = torch.randn([n], device=device) * s.brightness_std
            b = torch.where(self._fires(n, s.brightness * p, device), b, torch.zeros_like(b))
            color = translate3d(b) @ color
        if s.contrast > 0:
            c = torch.exp2(torch.randn([n], device=device) * s.contrast_std)
            c = torch.where(self._fires(n, s.contrast * p, device), c, torch.ones_like(c))
            color = scale3d(c) @ color
        luma = torch.tensor(_LUMA_AXIS, device=device)  # [4]
        luma_outer = torch.outer(luma, luma)  # [4, 4] projection onto the luma axis
        if s.lumaflip > 0:
            flip = torch.floor(torch.rand([n, 1, 1], device=device) * 2)
            flip = torch.where(self._fires(n, s.lumaflip * p, device)[:, None, None], flip, torch.zeros_like(flip))
            color = (eye - 2 * luma_outer * flip) @ color  # Householder reflection across the chroma plane
        if channels == 1:
            return color  # gray has no hue or saturation (and draws none, as in the reference)
        if s.hue > 0:
            theta = (torch.rand([n], device=device) * 2 - 1) * math.pi * s.hue_max
            theta = torch.where(self._fires(n, s.hue * p, device), theta, torch.zeros_like(theta))
            color = rotate3d(_LUMA_AXIS, theta) @ color
        if s.saturation > 0:
            sat = torch.exp2(torch.randn([n, 1, 1], device=device) * s.saturation_std)
            sat = torch.where(self._fires(n, s.saturation * p, device)[:, None, None], sat, torch.ones_like(sat))
            color = (luma_outer + (eye - luma_outer) * sat) @ color  # scale chroma, keep luma
        return color

    def _filter_gains(self, n: int, p: float, device: torch.device) -> torch.Tensor:
        """Amplification of each octave per image, [N, bands]: every octave that fires is scaled by a log-normal
        gain, then the gains are renormalised so a 1/f spectrum keeps its power."""
        s = self.spec
        expected_power = torch.tensor(FILTER_EXPECTED_POWER, device=device)  # [bands]
        gains = torch.ones([n, FILTER_BANDS], device=device)
        for band, strength in enumerate(s.imgfilter_bands):
            gain = torch.exp2(torch.randn([n], device=device) * s.imgfilter_std)
            gain = torch.where(self._fires(n, s.imgfilter * p * strength, device), gain, torch.ones_like(gain))
            band_gains = torch.ones([n, FILTER_BANDS], device=device)
            band_gains[:, band] = gain
            gains = gains * band_gains / (expected_power * band_gains.square()).sum(dim=1, keepdim=True).sqrt()
        return gains

    # -- the stages -----------------------------------------------------------------------------------------

    def _geometric(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Every geometric op composed into one matrix per image and applied once to the original."""
        s = self.spec
        uses_blit = any(getattr(s, op) > 0 for op in _BLIT_OPS)
        uses_general = any(getattr(s, op) > 0 for op in _GENERAL_OPS)
        if not (uses_blit or uses_general):
            return x
        n, _, h, w = x.shape
        inverse = self._blit_inverse(n, h, w, p, x.device)
        if not uses_general:
            return blit(x, inverse.to(x.dtype))  # integer moves: exact, and equal to `resample` up to rounding
        inverse = (inverse @ self._general_inverse(n, h, w, p, x.device)).to(x.dtype)
        if torch.equal(inverse, torch.eye(3, dtype=x.dtype, device=x.device).expand_as(inverse)):
            return x  # nothing fired in the whole batch (one host sync)
        return resample(x, inverse, self.up_taps, self.down_taps)

    def _color(self, x: torch.Tensor, p: float) -> torch.Tensor:
        s = self.spec
        channels = x.shape[1]
        if not (s.brightness > 0 or s.contrast > 0 or s.lumaflip > 0 or (channels > 1 and (s.hue > 0 or s.saturation > 0))):
            return x
        if channels not in (1, 3):
            raise ValueError(
                f"color augmentations need 1 or 3 channels, got {channels}: "
                "set brightness=contrast=lumaflip=hue=saturation=0 for other channel counts"
            )
        return apply_color(x, self._color_matrix(x.shape[0], channels, p, x.device).to(x.dtype))

    def _noise(self, x: torch.Tensor, p: float) -> torch.Tensor:
        n, device = x.shape[0], x.device
        sigma = torch.randn([n, 1, 1, 1], device=device).abs() * self.spec.noise_std
        sigma = torch.where(self._fires(n, self.spec.noise * p, device)[:, None, None, None], sigma, torch.zeros_like(sigma))
        return x + (torch.randn(x.shape, device=device) * sigma).to(x.dtype)

    def _cutout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        n, _, h, w = x.shape
        fires = self._fires(n, self.spec.cutout * p, x.device)
        size = torch.where(fires, self.spec.cutout_size, 0.0)  # [N]
        center = torch.rand([n, 2], device=x.device)  # [N, xy], fractions of the image size
        return x * cutout_mask(h, w, center, size).to(x.dtype)

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W], float, about [-1, 1]; returns the same shape and dtype."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"AugmentPipe expects float images [N, C, H, W], got {got}")
        p = float(self.p)
        if p <= 0:
            return images  # exact identity, no random draws
        work_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        x = self._geometric(images.to(work_dtype), p)
        x = self._color(x, p)
        if self.spec.imgfilter > 0:
            x = apply_filter_bank(x, self._filter_gains(x.shape[0], p, x.device), self.filter_bank)
        if self.spec.noise > 0:
            x = self._noise(x, p)
        if self.spec.cutout > 0:
            x = self._cutout(x, p)
        return x.to(images.dtype)
