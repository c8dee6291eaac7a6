"""Tests for ADA: the augmentation pipeline (identity at p=0, per-op firing rates, geometry and color
invariants, exact pixel blitting, gradients incl. double backward for R1) and the p controller."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from styleray.models.ada import AdaController
from styleray.config import AUGMENT_PIPES
from styleray.models.augment import AugmentPipe, AugmentSpec
from styleray.models.augment_ops import (
    CDF97_DOWN,
    CDF97_UP,
    apply_filter_bank,
    blit,
    cutout_mask,
    octave_filter_bank,
    resample,
)

GEOMETRIC_OPS = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
COLOR_OPS = ("brightness", "contrast", "lumaflip", "hue", "saturation")
IMAGE_OPS = ("imgfilter", "noise", "cutout")
ALL_OPS = GEOMETRIC_OPS + COLOR_OPS + IMAGE_OPS


def only(op: str | None, p: float, **settings: float) -> AugmentPipe:
    """A pipe with just `op` enabled (None: all disabled), at probability p."""
    multipliers = {name: float(name == op) for name in ALL_OPS}
    pipe = AugmentPipe(**multipliers, **settings)
    pipe.p.fill_(p)
    return pipe


def bgc(p: float) -> AugmentPipe:
    pipe = AugmentPipe()
    pipe.p.fill_(p)
    return pipe


def matrices(*rows: list[list[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)  # [N, 3, 3]


def taps(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(CDF97_UP, dtype=dtype), torch.tensor(CDF97_DOWN, dtype=dtype)


# -- p = 0, shapes, dtypes ------------------------------------------------------------------------------------


def test_p_zero_is_exact_identity_and_draws_nothing() -> None:
    images = torch.randn(4, 3, 16, 16)
    state = torch.get_rng_state()
    out = bgc(0.0)(images)
    assert out is images
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_and_dtype_preserved(channels: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    images = (torch.rand(8, channels, 16, 24) * 2 - 1).to(dtype)
    out = bgc(1.0)(images)
    assert out.shape == images.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    assert not torch.equal(out, images)


def test_rejects_bad_input_with_clear_errors() -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        bgc(0.5)(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        bgc(0.5)(torch.randn(2, 4, 16, 16))
    with pytest.raises(ValueError, match="xflip=-1"):
        AugmentPipe(xflip=-1)
    with pytest.raises(ValueError, match=r"imgfilter_bands=\(1, -1, 1, 1\)\): each value must be"):
        AugmentPipe(imgfilter_bands=[1, -1, 1, 1])
    assert AugmentPipe(imgfilter_bands=[1, 1, 0, 1]).spec.imgfilter_bands == (1, 1, 0, 1)  # a list is kept as a tuple
    only("rotate", 1.0)(torch.randn(2, 4, 16, 16))  # geometry alone works for any channel count


def test_same_rng_state_same_augmentation() -> None:
    images = torch.randn(8, 3, 16, 16)
    pipe = bgc(0.5)
    torch.manual_seed(1)
    first = pipe(images)
    torch.manual_seed(1)
    assert torch.equal(pipe(images), first)
    assert not torch.equal(pipe(images), first)


# -- firing rates -----------------------------------------------------------------------------------------------

P = 0.3
# P(an image changes) = P * P(the drawn parameter is not the identity). xint on 16 px: each axis shift is
# round(U(-2, 2)), zero with probability 1/4, both zero with 1/16.
EXPECTED_RATE = {
    "xflip": P / 2,
    "rotate90": P * 3 / 4,
    "xint": P * 15 / 16,
    "lumaflip": P / 2,
    "imgfilter": 1 - (1 - P) ** 4,  # four octaves, each firing on its own
    **{op: P for op in ("scale", "rotate", "aniso", "xfrac", "brightness", "contrast", "hue", "saturation")},
    **{op: P for op in ("noise", "cutout")},
}


@pytest.mark.parametrize("op", ALL_OPS)
def test_each_op_fires_at_its_rate(op: str) -> None:
    torch.manual_seed(2)
    n = 1500
    channels = 3 if op in COLOR_OPS else 1
    images = torch.rand(n, channels, 16, 16) * 2 - 1
    out = only(op, P)(images)
    change = (out - images).flatten(1).abs().amax(dim=1)  # [N]
    if op in ("scale", "rotate", "aniso", "xfrac", "imgfilter"):
        # Images where the op did not fire are still resampled (filtered) with the batch: identity up to float32
        # rounding (~1e-5). A fired op changes an image by far more, except for a vanishing fraction of draws.
        changed = change > 3e-5
    else:
        changed = change > 0  # blitting and color matrices leave unfired images bit-identical
    rate = changed.double().mean().item()
    expected = EXPECTED_RATE[op]
    assert abs(rate - expected) < 4.5 * math.sqrt(expected * (1 - expected) / n), (op, rate, expected)


def test_xflip_at_p1_gives_exact_copies_or_exact_mirrors_half_each() -> None:
    torch.manual_seed(3)
    n = 2000
    images = torch.randn(n, 3, 8, 8)
    out = only("xflip", 1.0)(images)
    same = (out == images).flatten(1).all(dim=1)
    mirrored = (out == images.flip(3)).flatten(1).all(dim=1)
    assert (same ^ mirrored).all()
    assert abs(mirrored.double().mean().item() - 0.5) < 4.5 * math.sqrt(0.25 / n)


def test_rotate90_and_xint_are_exact_pixel_moves() -> None:
    torch.manual_seed(4)
    images = torch.randn(64, 1, 8, 8)
    out = only("rotate90", 1.0)(images)
    for image, result in zip(images, out):
        assert any(torch.equal(result, torch.rot90(image, k, dims=(1, 2))) for k in range(4))
    out = only("xint", 1.0)(images)
    assert not torch.equal(out, images)
    # Integer translation with reflection moves whole pixels: every output value exists in its input.
    for image, result in zip(images, out):
        assert torch.isin(result, image).all()


def test_one_channel_luma_flip_negates_about_half_and_hue_saturation_do_nothing() -> None:
    """A one-channel image is gray (r = g = b): a luma flip reflects it through 0, as the reference does."""
    images = torch.randn(400, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(4)
    out = only("lumaflip", 1.0)(images)
    negated = (out + images).flatten(1).abs().amax(dim=1) < 1e-5  # gain -1 up to float rounding
    same = (out == images).flatten(1).all(dim=1)
    assert bool((negated | same).all())
    assert abs(negated.double().mean().item() - 0.5) < 4.5 * math.sqrt(0.25 / 400)
    rgb = only("lumaflip", 1.0)  # the same draws on the image repeated in three channels: its channel mean
    torch.manual_seed(4)
    assert torch.allclose(rgb(images.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True), out, atol=1e-6)
    for op in ("hue", "saturation"):
        assert torch.equal(only(op, 1.0)(images), images)
    out = only("brightness", 1.0)(images)
    offset = (out - images).flatten(1)  # one offset per image
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-6)
    assert (offset[:, 0].abs() > 1e-4).float().mean() > 0.9


# -- geometry ---------------------------------------------------------------------------------------------------


def test_wavelet_filters_are_symmetric_biorthogonal_with_unit_dc_gain() -> None:
    up, down = taps()
    assert torch.equal(up, up.flip(0)) and torch.equal(down, down.flip(0))
    assert math.isclose(up.sum().item(), 2, abs_tol=1e-12) and math.isclose(down.sum().item(), 1, abs_tol=1e-12)
    full = torch.zeros(len(up) + len(down) + 8, dtype=torch.float64)
    for shift in range(-3, 4):  # sum_m down[m] up[m + 2 shift], both centered
        up_shifted = torch.zeros_like(full)
        down_placed = torch.zeros_like(full)
        center = len(full) // 2
        up_shifted[center - 3 - 2 * shift : center + 4 - 2 * shift] = up
        down_placed[center - 4 : center + 5] = down
        assert math.isclose((up_shifted * down_placed).sum().item(), float(shift == 0), abs_tol=1e-12)


IDENTITY = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
XFLIP = [[-1, 0, 0], [0, 1, 0], [0, 0, 1]]
ROT90 = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
SHIFT = [[1, 0, -2], [0, 1, 3], [0, 0, 1]]  # samples (x - 2, y + 3): content moves right 2, up 3
TURN = 2 * math.pi  # a full turn in floating point: cos 1, sin -2.4e-16
FULL_TURN = [[math.cos(TURN), -math.sin(TURN), 0], [math.sin(TURN), math.cos(TURN), 0], [0, 0, 1]]


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 3e-5)])
def test_resample_is_exact_for_pixel_aligned_transforms(dtype: torch.dtype, atol: float) -> None:
    torch.manual_seed(5)
    images = torch.randn(5, 2, 12, 12, dtype=dtype)
    inverse = matrices(IDENTITY, XFLIP, ROT90, SHIFT, FULL_TURN, dtype=dtype)
    out = resample(images, inverse, *taps())
    assert torch.allclose(out[0], images[0], atol=atol, rtol=0)
    assert torch.allclose(out[1], images[1].flip(2), atol=atol, rtol=0)
    assert torch.allclose(out[4], images[4], atol=atol, rtol=0)
    # rot90 and a shift agree with exact blitting, reflected border included.
    assert torch.allclose(out[2:4], blit(images[2:4], inverse[2:4]), atol=atol, rtol=0)
    assert torch.allclose(out[3, :, :-3, 2:], images[3, :, 3:, :-2], atol=atol, rtol=0)


def test_blit_matches_torch_flip_rot90_and_reflect_shift() -> None:
    images = torch.randn(3, 2, 6, 6)
    out = blit(images, matrices(XFLIP, ROT90, SHIFT))
    assert torch.equal(out[0], images[0].flip(2))
    assert any(torch.equal(out[1], torch.rot90(images[1], k, dims=(1, 2))) for k in (1, 3))
    # Shift: output (x, y) reads input (x - 2, y + 3), reflected at the border (no edge repeat).
    padded = F.pad(images[2:3], [2, 0, 0, 3], mode="reflect")[0]  # [C, 9, 8]
    assert torch.equal(out[2], padded[:, 3:, :6])


def gaussian_blob(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return torch.exp(-(coords[None, :] ** 2 + coords[:, None] ** 2) / (2 * sigma**2))[None, None]  # [1, 1, H, W]


def within(size: int, radius: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return (coords[None, :] ** 2 + coords[:, None] ** 2) < radius**2  # [H, W]


def test_resample_rotates_and_scales_around_the_image_center() -> None:
    """A centered Gaussian blob is rotation-invariant and scales to a blob of scaled sigma, up to interpolation
    error (~h^2 f'' / 8 for bilinear at h = 0.5 px): catches wrong centering or scaling that pixel-aligned
    tests cannot see. Compared inside a disc, because outside it the transform shows reflected content."""
    size = 24
    blob = gaussian_blob(size, 3.0)
    for angle in (0.1, 0.7, 2.0):
        rotation = [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
        out = resample(blob, matrices(rotation, dtype=torch.float64), *taps())[0, 0]
        assert (out - blob[0, 0])[within(size, 11)].abs().max() < 6e-3, angle
    magnified = resample(blob, matrices([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 1]], dtype=torch.float64), *taps())
    assert torch.allclose(magnified, gaussian_blob(size, 6.0), atol=6e-3)
    shrunk = resample(blob, matrices([[2, 0, 0], [0, 2, 0], [0, 0, 1]], dtype=torch.float64), *taps())[0, 0]
    assert (shrunk - gaussian_blob(size, 1.5)[0, 0])[within(size, 6)].abs().max() < 3e-2  # anti-aliasing blur


def test_resample_pads_enough_that_borders_match_a_larger_mirrored_canvas() -> None:
    """Transforming an image must equal transforming it on a larger reflect-padded canvas and cropping: the
    margin `resample` computes covers every pixel the interpolation reads (checked up to float64 rounding)."""
    torch.manual_seed(11)
    images = torch.randn(4, 1, 10, 10, dtype=torch.float64)
    angle = 0.3
    inverse = matrices(
        [[math.cos(angle), -math.sin(angle), 0.4], [math.sin(angle), math.cos(angle), -0.7], [0, 0, 1]],
        [[0.8, 0, 0], [0, 1.25, 0], [0, 0, 1]],
        [[1.1, 0.2, 0], [-0.1, 0.9, 0.3], [0, 0, 1]],
        [[1, 0, 0.5], [0, 1, 0.25], [0, 0, 1]],
        dtype=torch.float64,
    )
    out = resample(images, inverse, *taps())
    canvas = F.pad(images, [8, 8, 8, 8], mode="reflect")  # [4, 1, 26, 26], same center
    reference = resample(canvas, inverse, *taps())[:, :, 8:-8, 8:-8]
    assert torch.allclose(out, reference, atol=1e-10, rtol=0)


def cosine_image(size: int, kx: int, ky: int) -> torch.Tensor:
    """cos(pi kx u) cos(pi ky v), u and v from 0 at the first pixel center to 1 at the last: symmetric about
    both edges, so its reflection beyond the frame (what the pipe pads with) is the same smooth function."""
    u = torch.arange(size, dtype=torch.float64) / (size - 1)
    return (torch.cos(math.pi * kx * u)[None, :] * torch.cos(math.pi * ky * u)[:, None])[None, None]


def cosine_at(size: int, kx: int, ky: int, inverse: torch.Tensor) -> torch.Tensor:
    """The cosine image at the input positions ``inverse`` [N, 3, 3] maps every output pixel to: [N, 1, H, W]."""
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    source = inverse.double() @ torch.stack([xs.flatten(), ys.flatten(), torch.ones(size * size, dtype=torch.float64)])
    u, v = (source[:, :2] + (size - 1) / 2).unbind(dim=1)  # [N, H*W] each, in pixels from the first center
    return (torch.cos(math.pi * kx * u / (size - 1)) * torch.cos(math.pi * ky * v / (size - 1))).reshape(-1, 1, size, size)


def test_integer_and_general_geometry_compose_into_one_resampling_of_the_original() -> None:
    """xint with scale, aniso and xfrac: the pipe applies the composed matrix once to the reflect-padded original,
    i.e. its output is the continuous image at the composed positions (up to the filters' error, inside the
    frame and in the mirrored margins alike), and equals `resample` of the composed matrix."""
    size, n, p = 32, 64, 1.0
    pipe = AugmentPipe(**{op: float(op in ("xint", "scale", "aniso", "xfrac")) for op in ALL_OPS})
    pipe.p.fill_(p)
    images = cosine_image(size, 2, 1).float().expand(n, 3, size, size)
    torch.manual_seed(12)
    out = pipe(images)
    torch.manual_seed(12)  # the same draws, in the pipe's order: the blitting matrix, then the general one
    inverse = pipe._blit_inverse(n, size, size, p, images.device) @ pipe._general_inverse(n, size, size, p, images.device)
    assert (inverse[:, :2, 2] - inverse[:, :2, 2].round()).abs().amax() > 0.1  # fractional shifts were drawn
    torch.testing.assert_close(out, resample(images, inverse, pipe.up_taps, pipe.down_taps), atol=1e-6, rtol=0)
    expected = cosine_at(size, 2, 1, inverse).float()
    assert (out - expected).abs().amax() < 2e-2


# -- image-space filtering and corruptions ---------------------------------------------------------------------


def test_filter_bank_splits_into_symmetric_octaves_that_add_up_to_the_identity() -> None:
    bank = octave_filter_bank()  # [4, 43]
    assert bank.shape == (4, 43) and torch.equal(bank, bank.flip(1))
    identity = torch.zeros(43, dtype=torch.float64)
    identity[21] = 1
    torch.testing.assert_close(bank.sum(dim=0), identity, atol=1e-15, rtol=0)
    response = torch.fft.rfft(bank, n=256).abs()  # [bands, frequencies 0 .. pi]
    peaks = response.argmax(dim=1) / 128  # fraction of Nyquist
    assert peaks[0] == 0 and 0.1 < peaks[1] < 0.2 and 0.2 < peaks[2] < 0.45 and peaks[3] > 0.6, peaks.tolist()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)  # unit gains: the identity, at any image size
    torch.testing.assert_close(apply_filter_bank(images, torch.ones(2, 4), bank), images, atol=1e-12, rtol=0)


def test_filter_gains_scale_an_octave_and_keep_a_1_over_f_spectrum_power_per_octave() -> None:
    size = 64
    x = torch.arange(size, dtype=torch.float64)
    top = torch.cos(math.pi * 0.9 * x)[None, None, None, :].expand(1, 1, size, size)  # near Nyquist: band 3
    gains = torch.tensor([[1.0, 1.0, 1.0, 3.0]])
    out = apply_filter_bank(top, gains, octave_filter_bank())
    assert torch.allclose(out[..., 24:40], 3 * top[..., 24:40], atol=0.05)
    # One octave amplified: all four rescaled so that a 1/f spectrum (power 10:1:1:1) keeps its power.
    pipe = only("imgfilter", 1.0, imgfilter_bands=(0, 0, 0, 1))
    torch.manual_seed(13)
    drawn = pipe._filter_gains(4000, 1.0, torch.device("cpu"))  # [N, 4]
    power = (drawn.square() * torch.tensor([10, 1, 1, 1]) / 13).sum(dim=1)
    torch.testing.assert_close(power, torch.ones_like(power), atol=1e-5, rtol=0)
    assert torch.allclose(drawn[:, :3], drawn[:, :1].expand(-1, 3)) and drawn[:, 3].std() > 0.5


def test_noise_adds_gaussian_noise_of_a_half_normal_strength() -> None:
    torch.manual_seed(14)
    images = torch.rand(2000, 3, 16, 16) * 2 - 1
    out = only("noise", 1.0)(images)
    strength = (out - images).flatten(1).std(dim=1)  # per image: |N(0, 1)| * noise_std
    assert abs(strength.mean().item() - 0.1 * math.sqrt(2 / math.pi)) < 3e-3
    assert abs(strength.std().item() - 0.1 * math.sqrt(1 - 2 / math.pi)) < 3e-3


def test_cutout_zeroes_one_half_size_square_per_image() -> None:
    mask = cutout_mask(32, 32, torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.3, 0.6]]), torch.tensor([0.5, 0.5, 0.0]))
    assert mask.shape == (3, 1, 32, 32)
    assert torch.equal(mask[0, 0, 8:24, 8:24], torch.zeros(16, 16)) and mask[0].sum() == 32 * 32 - 16 * 16
    assert mask[1].sum() == 32 * 32 - 8 * 8 and torch.equal(mask[1, 0, 24:, :8], torch.zeros(8, 8))  # a corner
    assert torch.equal(mask[2], torch.ones(1, 32, 32))  # size 0: no cutout
    torch.manual_seed(15)
    images = torch.rand(8, 3, 32, 32) + 1  # never 0 before the cutout
    zeroed = (only("cutout", 1.0)(images) == 0).all(dim=1)  # [N, H, W]
    assert all(0 < z.sum() <= 16 * 16 for z in zeroed)


@pytest.mark.parametrize("name", list(AUGMENT_PIPES))
def test_named_pipes_turn_on_exactly_the_reference_ops(name: str) -> None:
    spec = AugmentPipe.named(name).spec
    assert {op for op in ALL_OPS if getattr(spec, op) > 0} == set(AUGMENT_PIPES[name])
    assert all(getattr(spec, op) in (0.0, 1.0) for op in ALL_OPS)
    with pytest.raises(ValueError, match="augment pipe 'bgx' is unknown; choose one of: blit"):
        AugmentSpec.named("bgx")


# -- color ------------------------------------------------------------------------------------------------------


def luma_and_chroma(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    luma = images.mean(dim=1, keepdim=True)  # [N, 1, H, W]
    return luma, images - luma


def test_color_ops_respect_the_luma_axis() -> None:
    torch.manual_seed(6)
    images = torch.rand(32, 3, 8, 8) * 2 - 1
    luma, chroma = luma_and_chroma(images)

    out_luma, out_chroma = luma_and_chroma(only("saturation", 1.0)(images))
    assert torch.allclose(out_luma, luma, atol=1e-5)  # luma kept, chroma scaled by one factor per image
    ratio = out_chroma.flatten(1).norm(dim=1) / chroma.flatten(1).norm(dim=1)
    assert torch.allclose(out_chroma, chroma * ratio[:, None, None, None], atol=1e-4)

    out_luma, out_chroma = luma_and_chroma(only("hue", 1.0)(images))
    assert torch.allclose(out_luma, luma, atol=1e-5)  # a rotation around the luma axis
    assert torch.allclose(out_chroma.norm(dim=1), chroma.norm(dim=1), atol=1e-5)

    out_luma, out_chroma = luma_and_chroma(only("lumaflip", 1.0)(images))
    assert torch.allclose(out_chroma, chroma, atol=1e-5)
    flipped = torch.isclose(out_luma, -luma, atol=1e-5).flatten(1).all(dim=1)
    kept = torch.isclose(out_luma, luma, atol=1e-5).flatten(1).all(dim=1)
    assert (flipped | kept).all() and flipped.any() and kept.any()

    out = only("contrast", 1.0)(images)
    gain = (out * images).flatten(1).sum(dim=1) / images.flatten(1).square().sum(dim=1)  # least squares
    assert torch.allclose(out, images * gain[:, None, None, None], rtol=1e-4, atol=1e-6)


# -- gradients --------------------------------------------------------------------------------------------------


def test_grid_sample_double_backward_is_native_on_this_torch() -> None:
    """AugmentPipe relies on F.grid_sample's built-in double backward (input side). If a torch upgrade breaks
    this, a custom autograd function (NVlabs' grid_sample_gradfix shape) is needed."""
    torch.manual_seed(7)
    images = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([[[0.9, 0.3, 0.05], [-0.2, 0.95, 0.1]]] * 2, dtype=torch.float64)
    grid = F.affine_grid(theta, [2, 2, 7, 5], align_corners=False)

    def sample(x: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    assert gradcheck(sample, (images,))
    assert gradgradcheck(sample, (images,))


class TinyD(torch.nn.Module):
    """A smooth (softplus) two-conv discriminator, so second derivatives are nonzero."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 1, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.softplus(self.conv1(x))).flatten(1).mean(dim=1)  # [N]


def test_r1_penalty_backpropagates_through_augmentation() -> None:
    torch.manual_seed(8)
    d = TinyD(3)
    reals = torch.randn(4, 3, 16, 16, requires_grad=True)
    logits = d(bgc(1.0)(reals))
    (r1_grads,) = torch.autograd.grad(logits.sum(), reals, create_graph=True)
    r1_grads.square().sum().backward()
    grad = d.conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert reals.grad is not None and torch.isfinite(reals.grad).all() and reals.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["bgc", "bgcfnc"])
def test_pipe_gradcheck_and_gradgradcheck_in_float64(name: str) -> None:
    """D(augment(x)) with every op on: first and second derivatives match finite differences. The random draws
    are pinned by reseeding inside the function, so every evaluation applies the same augmentation."""
    torch.manual_seed(9)
    d = TinyD(3).double()
    pipe = AugmentPipe.named(name)
    pipe.p.fill_(1.0)
    images = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)

    def discriminate(x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10)
            return d(pipe(x))

    assert not torch.equal(discriminate(images.detach()), d(images.detach()))  # something was augmented
    assert gradcheck(discriminate, (images,), fast_mode=True)
    assert gradgradcheck(discriminate, (images,), fast_mode=True)


# -- controller -------------------------------------------------------------------------------------------------


def logits_with_sign_mean(r_t: float, n: int = 100) -> torch.Tensor:
    positive = round((r_t + 1) / 2 * n)
    return torch.cat([torch.ones(positive), -torch.ones(n - positive)]) * 3.0


def run_controller(controller: AdaController, pipe: AugmentPipe, r_ts: list[float], start: int = 0) -> list:
    returned = []
    for batch_idx, r_t in enumerate(r_ts, start=start + 1):
        controller.accumulate(logits_with_sign_mean(r_t))
        returned.append(controller.step(batch_idx, pipe))
    return returned


def test_controller_steps_p_up_down_and_not_below_zero() -> None:
    pipe = bgc(0.0)
    controller = AdaController(batch_size=64, target=0.6, ada_kimg=500, interval=4)
    step = 64 * 4 / 500_000
    assert controller.adjustment == step

    returned = run_controller(controller, pipe, [0.8] * 8)  # overfitting: p goes up once per interval
    assert returned[:3] == [None] * 3 and returned[4:7] == [None] * 3
    assert math.isclose(returned[3], 0.8) and math.isclose(returned[7], 0.8)
    expected = torch.zeros([]) + step
    expected = expected + step
    assert torch.equal(pipe.p, expected)

    run_controller(controller, pipe, [0.2] * 4, start=8)  # below target: p goes down
    assert torch.equal(pipe.p, (expected - step).clamp_min(0))
    run_controller(controller, pipe, [0.2] * 12, start=12)  # never below zero
    assert pipe.p.item() == 0.0
    assert controller.last_r_t == pytest.approx(0.2)


def test_controller_averages_over_the_interval_and_resets() -> None:
    pipe = bgc(0.0)
    controller = AdaController(batch_size=8, target=0.6, interval=2)
    controller.accumulate(logits_with_sign_mean(1.0))
    assert controller.step(1, pipe) is None
    controller.accumulate(logits_with_sign_mean(0.0))
    assert controller.step(2, pipe) == pytest.approx(0.5)  # mean of 1.0 and 0.0: below target, p stays 0
    assert pipe.p.item() == 0.0
    assert controller.stats_tensor().tolist() == [0.0, 0.0]
    assert controller.step(4, pipe) is None  # nothing accumulated


def test_controller_all_reduce_hook_sums_worker_stats() -> None:
    pipe = bgc(0.0)
    controller = AdaController(batch_size=8, target=0.6, interval=1)
    other_worker = torch.tensor([100.0, 100.0], dtype=torch.float64)  # all positive on another worker

    def all_reduce(stats: torch.Tensor) -> None:
        stats += other_worker

    controller.accumulate(logits_with_sign_mean(0.0))  # sum 0, count 100 here
    assert controller.step(1, pipe, all_reduce=all_reduce) == pytest.approx(0.5)
    assert controller.stats_tensor().dtype == torch.float64


def test_controller_state_dict_resumes_exactly_mid_interval() -> None:
    r_ts = [0.9, 0.1, 0.7, 0.4, 0.8, 0.65, 0.3, 0.9, 0.9, 0.6, 0.95, 0.99]
    pipe_a = bgc(0.0)
    controller_a = AdaController(batch_size=16, interval=4, ada_kimg=1)
    run_controller(controller_a, pipe_a, r_ts)

    pipe_b = bgc(0.0)
    controller_b = AdaController(batch_size=16, interval=4, ada_kimg=1)
    run_controller(controller_b, pipe_b, r_ts[:6])  # "checkpoint" after step 6, mid-interval
    state, pipe_state = controller_b.state_dict(), pipe_b.state_dict()
    assert set(pipe_state) == {"p"}

    pipe_c = bgc(0.0)
    pipe_c.load_state_dict(pipe_state)
    controller_c = AdaController(batch_size=16, interval=4, ada_kimg=1)
    controller_c.load_state_dict(state)
    run_controller(controller_c, pipe_c, r_ts[6:], start=6)
    assert pipe_a.p.item() > 0
    assert torch.equal(pipe_c.p, pipe_a.p)
    assert controller_c.state_dict() == controller_a.state_dict()


def test_controller_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="interval=0"):
        AdaController(batch_size=8, interval=0)
    with pytest.raises(ValueError, match="target=1.5"):
        AdaController(batch_size=8, target=1.5)
