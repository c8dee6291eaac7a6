"""Generator and discriminator: reference parameter parity, shapes, fast paths against reference paths."""

import math

import pytest
import torch
import torch.nn.functional as F

from styleray.config import ModelConfig, resolve_preset
from styleray.models import layers
from styleray.models.networks import Discriminator, Generator, MinibatchStd, count_parameters


def tiny(resolution=16, **kw) -> ModelConfig:
    return ModelConfig(
        resolution=resolution, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16,
        mbstd_group=2, **kw,
    )


# The figures printed by NVIDIA's stylegan2-ada-pytorch for the same configurations.
@pytest.mark.parametrize(
    "preset, g_params, d_params",
    [("auto", 28_700_647, 28_982_849), ("paper512", 30_276_583, 28_982_849)],
)
def test_parameter_counts_match_reference_at_512(preset, g_params, d_params):
    model, train = resolve_preset(preset, resolution=512, workers=8)
    with torch.device("meta"):
        G, D = Generator(model), Discriminator(model)
    assert count_parameters(G) == g_params
    assert count_parameters(D) == d_params
    if preset == "auto":
        assert (train.batch, train.batch_per_worker, train.lr_g, model.mbstd_group) == (64, 8, 0.0025, 4)
        assert train.ada_target == 0.6


def test_num_ws_and_channels_follow_the_reference_layout():
    model, _ = resolve_preset("paper256", resolution=256)
    with torch.device("meta"):
        G = Generator(model)
    assert G.num_ws == 14  # 7 blocks: 1 + 6 * 2 convs, plus the last ToRGB
    assert [b.conv1.weight.shape[0] for b in G.synthesis.blocks] == [512, 512, 512, 512, 256, 128, 64]  # 16384 // res, capped at 512


@pytest.mark.parametrize("c_dim", [0, 3])
def test_shapes_and_value_range(c_dim):
    cfg = tiny(c_dim=c_dim)
    G, D = Generator(cfg), Discriminator(cfg)
    z = torch.randn(4, cfg.z_dim)
    c = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float() if c_dim else None
    img = G(z, c)
    assert img.shape == (4, 3, 16, 16) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    logits = D(img, c)
    assert logits.shape == (4, 1)
    # Conditioning changes the output (projection discriminator, class embedding in G).
    if c_dim:
        c2 = F.one_hot(torch.tensor([1, 2, 0, 1]), 3).float()
        assert not torch.allclose(G(z, c2, noise_mode="const"), G(z, c, noise_mode="const"))
        assert not torch.allclose(D(img, c2), logits)


def test_fused_modconv_matches_reference_path():
    torch.manual_seed(0)
    cfg = tiny(resolution=32)
    G = Generator(cfg).eval()
    z = torch.randn(3, cfg.z_dim)
    G.set_fused_modconv(False)
    a = G(z, noise_mode="const")
    G.set_fused_modconv(True)
    b = G(z, noise_mode="const")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_demodulation_normalises_output_variance():
    torch.manual_seed(0)
    x = torch.randn(8, 32, 16, 16)
    w = torch.randn(24, 32, 3, 3)
    styles = torch.rand(8, 32) * 3 + 0.1
    y = layers.modulated_conv2d(x, w, styles)
    # Unit-variance input through demodulated weights -> about unit variance per output map (interior).
    std = y[:, :, 2:-2, 2:-2].std(dim=[2, 3])
    assert 0.7 < std.mean().item() < 1.3
    y2 = layers.modulated_conv2d(x, w, styles * 10)  # style scale cancels out
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-4)


def test_fir_resampling_preserves_constants_and_sizes():
    f = layers.make_fir_filter()
    x = torch.ones(1, 2, 8, 8)
    up = layers.upsample2d(x, f)
    down = layers.downsample2d(x, f)
    assert up.shape == (1, 2, 16, 16) and down.shape == (1, 2, 4, 4)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.ones_like(up[..., 2:-2, 2:-2]))
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.ones_like(down[..., 1:-1, 1:-1]))
    conv = layers.Conv2dLayer(2, 3, 3, down=True)
    assert conv(torch.randn(2, 2, 8, 8)).shape == (2, 3, 4, 4)


def test_equalized_lr_runtime_scaling():
    fc = layers.FullyConnectedLayer(64, 32, lr_multiplier=0.01)
    assert fc.weight.std().item() == pytest.approx(100, rel=0.1)  # stored / lr_multiplier
    y = fc(torch.randn(256, 64))
    assert y.std().item() == pytest.approx(1.0, rel=0.15)  # unit variance at run time


def test_minibatch_std_groups_like_reference():
    x = torch.zeros(4, 2, 4, 4)
    x[0] = 1.0  # group size 2: samples {0, 2} and {1, 3}
    y = MinibatchStd(group_size=2)(x)
    assert y.shape == (4, 3, 4, 4)
    assert y[0, 2].mean() == pytest.approx(0.5, abs=1e-3) and y[2, 2].mean() == pytest.approx(0.5, abs=1e-3)
    assert y[1, 2].mean() == pytest.approx(math.sqrt(1e-8), abs=1e-3)
    with pytest.raises(ValueError, match="divisible"):
        MinibatchStd(group_size=4)(torch.zeros(6, 2, 4, 4))


def test_truncation_pulls_toward_w_avg():
    cfg = tiny()
    G = Generator(cfg)
    G.mapping.w_avg.copy_(torch.randn(cfg.w_dim))
    z = torch.randn(2, cfg.z_dim)
    w1 = G.mapping(z, None)
    w0 = G.mapping(z, None, truncation_psi=0.0)
    torch.testing.assert_close(w0, G.mapping.w_avg.expand_as(w0))
    wc = G.mapping(z, None, truncation_psi=0.0, truncation_cutoff=2)
    torch.testing.assert_close(wc[:, 2:], w1[:, 2:])


def test_noise_modes():
    cfg = tiny()
    G = Generator(cfg)
    for m in G.modules():
        if hasattr(m, "strength"):
            torch.nn.init.constant_(m.strength, 0.5)
    z = torch.randn(2, cfg.z_dim)
    const1, const2 = G(z, noise_mode="const"), G(z, noise_mode="const")
    torch.testing.assert_close(const1, const2)
    assert not torch.allclose(G(z, noise_mode="random"), G(z, noise_mode="random"))
    assert not torch.allclose(G(z, noise_mode="none"), const1)
    with pytest.raises(ValueError, match="noise_mode"):
        G(z, noise_mode="loud")


def test_reduced_precision_blocks_are_chosen_like_reference():
    model, _ = resolve_preset("paper512", resolution=512)
    with torch.device("meta"):
        G, D = Generator(model), Discriminator(model)
    # num_fp16_res=4 at 512: the 64..512 blocks (G) and 64..512 blocks (D) run reduced precision on CUDA.
    assert [b.resolution for b in G.synthesis.blocks if b.use_reduced_precision] == [64, 128, 256, 512]
    assert sum(b.use_reduced_precision for b in D.blocks) == 4


def test_bad_inputs_name_the_problem():
    cfg = tiny()
    G, D = Generator(cfg), Discriminator(cfg)
    with pytest.raises(ValueError, match=r"z must be \[N, 16\]"):
        G(torch.randn(2, 7))
    with pytest.raises(ValueError, match="images must be"):
        D(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="ws must be"):
        G.synthesis(torch.randn(2, 3, 16))
