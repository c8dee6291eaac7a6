"""Fast paths against their plain reference paths (layers.reference_paths()), on CPU: values, gradients and
the second derivatives that R1 and path-length regularisation take, from one op up to every phase of a
training step."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from styleray.config import ModelConfig, TrainConfig
from styleray.models import layers
from styleray.models.phases import (
    DiscriminatorMain,
    DiscriminatorR1,
    GeneratorMain,
    GeneratorPathLength,
    Phase,
    Round,
)
from styleray.models.training import StyleGAN2Trainer

# conv2d configurations the networks use: 3x3 same, valid stride-2 (D down), transposed stride-2 (G up),
# depthwise FIR filter / down / up, grouped (fused modulated conv), 1x1.
CONV_CASES = {
    "3x3": dict(x=(2, 2, 4, 4), w=(3, 2, 3, 3), padding=1),
    "3x3-stride2-odd": dict(x=(2, 2, 5, 5), w=(3, 2, 3, 3), stride=2),
    "3x3-stride2-even": dict(x=(2, 2, 6, 6), w=(3, 2, 3, 3), stride=2),
    "3x3-transposed": dict(x=(2, 2, 3, 3), w=(2, 3, 3, 3), stride=2, transpose=True),
    "fir-depthwise": dict(x=(2, 3, 5, 5), w=(3, 1, 4, 4), padding=2, groups=3),
    "fir-down": dict(x=(2, 3, 6, 6), w=(3, 1, 4, 4), stride=2, padding=1, groups=3),
    "fir-up": dict(x=(2, 3, 3, 3), w=(3, 1, 4, 4), stride=2, padding=1, groups=3, transpose=True),
    "grouped": dict(x=(1, 4, 4, 4), w=(6, 2, 3, 3), padding=1, groups=2),
    "grouped-transposed": dict(x=(1, 4, 3, 3), w=(4, 3, 3, 3), stride=2, groups=2, transpose=True),
    "1x1": dict(x=(2, 3, 3, 3), w=(2, 3, 1, 1)),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_plain_conv_to_second_order(case):
    kw = dict(CONV_CASES[case])
    torch.manual_seed(0)
    x = torch.randn(kw.pop("x"), dtype=torch.float64, requires_grad=True)
    w = torch.randn(kw.pop("w"), dtype=torch.float64, requires_grad=True)

    def f(x, w):
        return layers.conv2d(x, w, **kw)

    assert gradcheck(f, (x, w), fast_mode=True)
    assert gradgradcheck(f, (x, w), fast_mode=True)
    y = f(x, w)
    with layers.reference_paths():
        y_ref = f(x, w)
    torch.testing.assert_close(y, y_ref)

    def r1_like(x, w):  # d/d(x, w) of |dy/dx . v|^2, the shape of R1's second derivative
        y = layers.conv2d(x, w, **kw)
        (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w))

    fast = r1_like(x, w)
    with layers.reference_paths():
        ref = r1_like(x, w)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b)


def test_demodulation_coefficients_match_materialised_weights():
    torch.manual_seed(0)
    weight, styles = torch.randn(24, 16, 3, 3), torch.rand(5, 16) * 3 + 0.1
    fast = layers.demodulation_coefficients(weight, styles)
    with layers.reference_paths():
        ref = layers.demodulation_coefficients(weight, styles)
    assert fast.shape == (5, 24)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("up", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv2d_fast_matches_reference(up, fused, demodulate):
    torch.manual_seed(1)
    n, i, o = 3, 8, 6
    x = torch.randn(n, i, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(o, i, 3, 3, dtype=torch.float64, requires_grad=True)
    styles = (torch.rand(n, i, dtype=torch.float64) + 0.5).requires_grad_(True)
    noise = torch.randn(n, 1, 10 if up else 5, 10 if up else 5, dtype=torch.float64) * 0.1
    f = layers.make_fir_filter().double()

    def run():
        y = layers.modulated_conv2d(x, weight, styles, noise=noise, up=up, demodulate=demodulate, fused=fused,
                                    resample_filter=f)
        # First derivative with a graph, then its gradient: what R1 / path-length regularisation do.
        (gx,) = torch.autograd.grad((y * torch.cos(y)).sum(), x, create_graph=True)
        grads = torch.autograd.grad(y.square().sum() + gx.square().sum(), (x, weight, styles))
        return (y.detach(), *grads)

    fast = run()
    with layers.reference_paths():
        ref = run()
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b)


def test_fused_and_scale_conv_scale_paths_agree_in_gradients():
    torch.manual_seed(2)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    weight = torch.randn(8, 8, 3, 3, requires_grad=True)
    styles = (torch.rand(4, 8) + 0.5).requires_grad_(True)
    f = layers.make_fir_filter()
    out = []
    for fused in (False, True):
        y = layers.modulated_conv2d(x, weight, styles, up=True, fused=fused, resample_filter=f)
        out.append((y, *torch.autograd.grad(y.square().sum(), (x, weight, styles))))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "activation, gain, clamp", [("lrelu", 2**0.5, 0.5), ("lrelu", 1.0, None), ("linear", 0.7, 1.0)]
)
def test_bias_act_fast_matches_reference(activation, gain, clamp):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 4, 4, requires_grad=True)
    b = torch.randn(5, requires_grad=True)

    def run():
        y = layers.bias_act(x, b, activation, gain=gain, clamp=clamp)
        return (y, *torch.autograd.grad((y * torch.arange(y.numel()).reshape(y.shape)).sum(), (x, b)))

    fast = run()
    with layers.reference_paths():
        ref = run()
    for a, c in zip(fast, ref):
        torch.testing.assert_close(a, c)


def test_reference_paths_is_scoped():
    assert layers.fast_paths_enabled()
    with layers.reference_paths():
        assert not layers.fast_paths_enabled()
        with layers.reference_paths(False):
            assert layers.fast_paths_enabled()
        assert not layers.fast_paths_enabled()
    assert layers.fast_paths_enabled()


# -- every phase of the training step ---------------------------------------------------------------------


def tiny_cfgs():
    model = ModelConfig(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16,
                        mbstd_group=2)
    train = TrainConfig(batch=4, r1_gamma=1.0, r1_interval=4, pl_interval=2, augment="fixed", augment_p=0.5)
    return model, train


def phase_grads(trainer: StyleGAN2Trainer, phase: Phase, real: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of one phase on one round (no optimizer step), from a fixed RNG state."""
    return phase_grads_and_stats(trainer, phase, real)[0]


def phase_grads_and_stats(trainer, phase, real) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    module = trainer.G if phase.trains_generator else trainer.D
    module.zero_grad(set_to_none=True)
    pl_mean, w_avg = trainer.pl_mean.clone(), trainer.G.mapping.w_avg.clone()
    torch.manual_seed(123)
    real = real.contiguous(memory_format=trainer.memory_format)
    trainer.G.requires_grad_(phase.trains_generator)
    trainer.D.requires_grad_(not phase.trains_generator)
    z = torch.randn([real.shape[0], trainer.model_cfg.z_dim])
    stats = phase.accumulate(trainer, Round(real, None, z, None), gain=phase.interval)
    trainer.pl_mean.copy_(pl_mean)  # the next call starts from the same state
    trainer.G.mapping.w_avg.copy_(w_avg)
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()], stats


def assert_grads_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for ga, gb in zip(a, b):
        scale = max(gb.abs().max().item(), 1e-6)
        torch.testing.assert_close(ga / scale, gb / scale, atol=2e-4, rtol=0)


@pytest.mark.parametrize(
    "phase",
    [GeneratorMain(), GeneratorPathLength(2), DiscriminatorMain(), DiscriminatorR1(4)],
    ids=lambda phase: phase.name,
)
def test_every_phase_fast_matches_reference(phase):
    model, train = tiny_cfgs()
    trainer = StyleGAN2Trainer(model, train)
    real = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fast = phase_grads(trainer, phase, real)
    with layers.reference_paths():
        ref = phase_grads(trainer, phase, real)
    assert any(g.abs().max() > 0 for g in ref)
    assert_grads_close(fast, ref)


def test_channels_last_training_matches_nchw():
    """Same steps, same random draws, same weights (up to float rounding) with NHWC activations or NCHW."""
    model, train = tiny_cfgs()
    runs = {}
    for channels_last in (True, False):
        trainer = StyleGAN2Trainer(model, train, channels_last=channels_last)
        assert trainer.G.synthesis.blocks[1].conv1.weight.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        for i in range(4):  # steps 0 and 2 run both regularisers (intervals 4 and 2)
            trainer.step(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1)
        runs[channels_last] = trainer
    for net in ("G", "D", "G_ema"):
        for a, b in zip(getattr(runs[True], net).parameters(), getattr(runs[False], net).parameters()):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert float(runs[True].pl_mean) == pytest.approx(float(runs[False].pl_mean), rel=1e-4)


def test_fully_connected_lrelu_fast_matches_reference():
    torch.manual_seed(4)
    fc = layers.FullyConnectedLayer(12, 7, activation="lrelu", lr_multiplier=0.01)
    x = torch.randn(5, 12, requires_grad=True)

    def run():
        y = fc(x)
        return (y, *torch.autograd.grad(y.square().sum(), (x, fc.weight, fc.bias)))

    fast = run()
    with layers.reference_paths():
        ref = run()
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit deprecations raised inside inductor
def test_compiled_main_phases_match_eager():
    """torch.compile (main phases only) trains like eager: same noise (fallback_random), same weights."""
    model, train = tiny_cfgs()
    runs = []
    for compile in (True, False):
        trainer = StyleGAN2Trainer(model, train, compile=compile)
        for i in range(3):
            trainer.step(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1)
        runs.append(trainer)
    for a, b in zip(runs[0].G.parameters(), runs[1].G.parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for a, b in zip(runs[0].D.parameters(), runs[1].D.parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit deprecations raised inside inductor
def test_every_compiled_phase_matches_eager():
    """compile=True: every phase, R1 included (D and its input gradient as one compiled graph, input_grad.py),
    gives eager's statistics and gradients, within 2e-4 of the largest gradient of each tensor (float32
    reassociation in the compiled kernels), on one round of 4 images at 16 px with augmentation (p = 0.2)."""
    model, train = tiny_cfgs()
    compiled, eager = StyleGAN2Trainer(model, train, compile=True), StyleGAN2Trainer(model, train)
    real = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for phase in (GeneratorMain(), GeneratorPathLength(2), DiscriminatorMain(), DiscriminatorR1(4)):
        (got, got_stats), (want, want_stats) = (phase_grads_and_stats(t, phase, real) for t in (compiled, eager))
        assert any(g.abs().max() > 0 for g in want), phase.name
        assert_grads_close(got, want)
        assert got_stats.keys() == want_stats.keys()
        for key in want_stats:
            torch.testing.assert_close(got_stats[key], want_stats[key], rtol=1e-4, atol=1e-5, msg=key)
    assert compiled._D_input_grad is not None and compiled._D_input_grad._graphs  # R1 ran through the graph
