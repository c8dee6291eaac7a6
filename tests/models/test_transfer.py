"""Starting from another model's weights: FreezeD keeps the first discriminator layers as they were, and an
unconditional source starts a conditional G that draws the source's images for every class."""

from __future__ import annotations

import pytest
import torch

import nvidia_fixture as nf
from styleray.config import ModelConfig, TrainConfig
from styleray.models.networks import Discriminator, Generator, count_parameters
from styleray.models.training import StyleGAN2Trainer
from styleray.models.transfer import (
    discriminator_layer_count,
    discriminator_layers,
    freeze_discriminator_layers,
    start_from,
)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128,
                                 channel_max=16, mbstd_group=2), **kw})


def test_freeze_d_counts_layers_from_the_image_like_the_reference():
    D = Discriminator(tiny(resolution=32))
    names = [n for n, _ in discriminator_layers(D)]
    assert len(names) == discriminator_layer_count(D.cfg) == 10  # fromrgb + 3 blocks x (conv0, conv1, skip)
    assert names[:5] == ["blocks.0.fromrgb", "blocks.0.conv0", "blocks.0.conv1", "blocks.0.skip", "blocks.1.conv0"]


def test_frozen_layers_become_buffers_and_the_network_computes_the_same():
    torch.manual_seed(0)
    D = Discriminator(tiny())
    img = torch.randn(4, 3, 16, 16)
    before, keys, params = D(img), list(D.state_dict()), count_parameters(D)
    frozen_numel = sum(p.numel() for _, layer in discriminator_layers(D)[:5] for p in layer.parameters())
    frozen = freeze_discriminator_layers(D, 5)
    assert frozen == ["blocks.0.fromrgb", "blocks.0.conv0", "blocks.0.conv1", "blocks.0.skip", "blocks.1.conv0"]
    assert torch.equal(D(img), before) and list(D.state_dict()) == keys
    trainable = {n for n, _ in D.named_parameters()}
    assert not any(n.startswith(tuple(frozen)) for n in trainable) and "blocks.1.conv1.weight" in trainable
    assert count_parameters(D) == params - frozen_numel
    with pytest.raises(ValueError, match="--freeze-d 8: .* has 7 layers .* use 0 to 7"):
        freeze_discriminator_layers(Discriminator(tiny()), 8)


def test_training_with_freeze_d_leaves_the_frozen_layers_untouched():
    cfg = tiny()
    tr = StyleGAN2Trainer(cfg, TrainConfig(batch=4, freeze_d=4))
    start = {k: v.clone() for k, v in tr.D.state_dict().items()}
    assert sum(p.numel() for g in tr.opt_D.param_groups for p in g["params"]) == count_parameters(tr.D)
    tr.step(torch.rand(4, 3, 16, 16) * 2 - 1)  # the first step runs every phase (D main and R1 included)
    after = tr.D.state_dict()
    for name, _ in discriminator_layers(tr.D)[:4]:
        assert torch.equal(after[f"{name}.weight"], start[f"{name}.weight"]), name
    assert not torch.equal(after["blocks.1.conv0.weight"], start["blocks.1.conv0.weight"])
    assert not torch.equal(after["b4.fc.weight"], start["b4.fc.weight"])


def _source(cfg: ModelConfig) -> dict:
    return dict(zip(("G", "D", "G_ema"), nf.random_networks(cfg, seed=1)))


def test_an_unconditional_source_starts_a_conditional_g_that_draws_the_source_for_every_class():
    src_cfg, cfg = tiny(), tiny(c_dim=3)
    source = _source(src_cfg)
    G, D, G_ema = Generator(cfg), Discriminator(cfg), Generator(cfg)
    notes = start_from(G, D, G_ema, {k: v.state_dict() for k, v in source.items()}, src_cfg)
    assert "new class embedding" in notes[0]
    z = torch.randn(3, 16)
    expected = source["G_ema"].eval()(z, None, noise_mode="const")
    for cls in range(3):
        c = torch.nn.functional.one_hot(torch.full([3], cls), 3).float()
        torch.testing.assert_close(G_ema.eval()(z, c, noise_mode="const"), expected, rtol=1e-5, atol=1e-5)
    shared = {k for k in source["D"].state_dict() if not k.startswith("b4.out")}
    assert all(torch.equal(D.state_dict()[k], source["D"].state_dict()[k]) for k in shared)
    assert D.state_dict()["b4.out.weight"].shape == (16, 16)  # the projection head: cmap_dim outputs


def test_a_source_with_other_classes_does_not_start_a_run():
    src_cfg, cfg = tiny(c_dim=2), tiny(c_dim=3)
    source = _source(src_cfg)
    with pytest.raises(ValueError, match="the source has 2 classes, this run 3"):
        start_from(Generator(cfg), Discriminator(cfg), Generator(cfg), {k: v.state_dict() for k, v in source.items()},
                   src_cfg)
