"""Tests for ADA: the augmentation pipeline (identity at p=0, per-op firing rates, geometry and color
invariants, exact pixel blitting, gradients incl. double backward for R1) and the p controller."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from styleray.models.augment import (
    CDF97_DOWN,
    CDF97_UP,
    AdaController,
    AugmentPipe,
    blit,
    resample,
)

GEOMETRIC_OPS = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
COLOR_OPS = ("brightness", "contrast", "lumaflip", "hue", "saturation")
ALL_OPS = GEOMETRIC_OPS + COLOR_OPS


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
    **{op: P for op in ("scale", "rotate", "aniso", "xfrac", "brightness", "contrast", "hue", "saturation")},
}


@pytest.mark.parametrize("op", ALL_OPS)
def test_each_op_fires_at_its_rate(op: str) -> None:
    torch.manual_seed(2)
    n = 1500
    channels = 3 if op in COLOR_OPS else 1
    images = torch.rand(n, channels, 16, 16) * 2 - 1
    out = only(op, P)(images)
    change = (out - images).flatten(1).abs().amax(dim=1)  # [N]
    if op in ("scale", "rotate", "aniso", "xfrac"):
        # Images where the op did not fire are still resampled with the batch: identity up to float32 rounding
        # (~1e-5). A fired op changes an image by far more, except for a vanishing fraction of draws.
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


def test_one_channel_gets_only_brightness_and_contrast() -> None:
    images = torch.randn(16, 1, 8, 8)
    for op in ("lumaflip", "hue", "saturation"):
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


def test_pipe_gradcheck_and_gradgradcheck_in_float64() -> None:
    """D(augment(x)) with every op on: first and second derivatives match finite differences. The random draws
    are pinned by reseeding inside the function, so every evaluation applies the same augmentation."""
    torch.manual_seed(9)
    d = TinyD(3).double()
    pipe = bgc(1.0)
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
