"""Sampling: seeds are reproducible in any batch, morphs hit their endpoints, style mixing composes ws."""

import numpy as np
import pytest
import torch

from styleray.config import ModelConfig
from styleray.models import sampling
from styleray.models.networks import Generator


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    cfg = ModelConfig(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16)
    g = Generator(cfg).eval()
    for m in g.modules():  # give noise a visible effect
        if hasattr(m, "strength"):
            torch.nn.init.constant_(m.strength, 0.3)
    g.mapping.w_avg.copy_(torch.randn(cfg.w_dim) * 0.5)
    return g


def test_seed_to_z_is_numpy_mt19937():
    z = sampling.seed_to_z(42, 8)
    np.testing.assert_array_equal(z.numpy(), np.random.RandomState(42).randn(8).astype(np.float32))
    with pytest.raises(ValueError, match="seed"):
        sampling.seed_to_z(-1, 8)
    with pytest.raises(ValueError, match="seed"):
        sampling.seed_to_z(2**32, 8)


@pytest.mark.parametrize("noise", ["const", "random", "none"])
def test_same_seed_same_image_in_any_batch(G, noise):
    seeds = [5, 7, 9, 11, 0, 1, 2, 3, 4, 6, 8]  # more than one chunk, seeds at different positions
    batch = sampling.generate_images(G, seeds, noise_mode=noise)
    alone = np.concatenate([sampling.generate_images(G, [s], noise_mode=noise) for s in seeds])
    assert batch.shape == (11, 16, 16, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch, alone)
    assert not np.array_equal(batch[0], batch[1])


def test_random_noise_depends_on_seed_only(G):
    a = sampling.generate_images(G, [3], noise_mode="random")
    const = sampling.generate_images(G, [3], noise_mode="const")
    assert not np.array_equal(a, const)
    np.testing.assert_array_equal(a, sampling.generate_images(G, [8, 3], noise_mode="random")[1:])


def test_truncation_zero_gives_the_average_image(G):
    imgs = sampling.generate_images(G, [1, 2, 3], truncation_psi=0.0)
    assert np.array_equal(imgs[0], imgs[1]) and np.array_equal(imgs[1], imgs[2])


@pytest.mark.parametrize("space", ["w", "z"])
def test_morph_frame_count_and_endpoints(G, space):
    seeds = [3, 17, 42]
    frames = sampling.morph(G, seeds, steps=5, space=space)
    assert frames.shape == (2 * 5 + 1, 16, 16, 3)
    ends = sampling.generate_images(G, [3, 42])
    np.testing.assert_array_equal(frames[0], ends[0])
    np.testing.assert_array_equal(frames[-1], ends[1])
    np.testing.assert_array_equal(frames[5], sampling.generate_images(G, [17])[0])
    looped = sampling.morph(G, seeds, steps=4, space=space, loop=True)
    assert looped.shape[0] == 3 * 4
    # Frames change gradually: consecutive frames are closer than the endpoints.
    d_step = np.abs(frames[1].astype(int) - frames[0]).mean()
    d_ends = np.abs(frames[-1].astype(int) - frames[0]).mean()
    assert d_step < d_ends


@pytest.mark.parametrize("space", ["w", "z"])
def test_morph_in_chunks_equals_the_whole(G, space):
    """A server synthesizes a morph's frames in CHUNK-row pieces, interleaved with other work: same bytes."""
    whole = sampling.morph(G, [3, 17, 42], steps=9, space=space, noise_mode="none")
    ws = sampling.morph_ws(G, [3, 17, 42], steps=9, space=space)
    parts = [sampling.synthesize(G, ws[i : i + sampling.CHUNK], noise_mode="none") for i in range(0, len(ws), sampling.CHUNK)]
    assert len(parts) == 3  # 19 frames: 8 + 8 + 3
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="noise_mode const or none"):
        sampling.morph(G, [1, 2], noise_mode="random")


def test_slerp_keeps_endpoints_and_interpolates_angle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.equal(sampling.slerp(a, b, 0.0), a) and torch.equal(sampling.slerp(a, b, 1.0), b)
    mid = sampling.slerp(a, b, 0.5)
    assert torch.atan2(mid[1], mid[0]).item() == pytest.approx(np.pi / 4, abs=1e-5)


def test_style_mix_grid(G):
    grid = sampling.style_mix(G, [1, 2], [3, 4, 5], layers=list(range(G.num_ws)))
    assert grid.shape == (3, 4, 16, 16, 3)
    assert (grid[0, 0] == 255).all()
    singles = sampling.generate_images(G, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(grid[0, 1:], singles[2:])
    np.testing.assert_array_equal(grid[1:, 0], singles[:2])
    # Taking every layer from the column seed reproduces the column seed.
    np.testing.assert_array_equal(grid[1, 2], singles[3])
    coarse = sampling.style_mix(G, [1], [3], layers=[0, 1])
    assert not np.array_equal(coarse[1, 1], singles[0]) and not np.array_equal(coarse[1, 1], singles[2])
    with pytest.raises(ValueError, match="out of range"):
        sampling.style_mix(G, [1], [2], layers=[99])
    with pytest.raises(ValueError, match="noise_mode const or none"):  # random noise is seeded per sample
        sampling.style_mix(G, [1], [2], noise_mode="random")


def test_class_validation(G):
    with pytest.raises(ValueError, match="unconditional"):
        sampling.generate_images(G, [1], class_idx=0)
    cfg = ModelConfig(resolution=8, z_dim=8, w_dim=8, mapping_layers=1, channel_base=64, channel_max=8, c_dim=3)
    Gc = Generator(cfg).eval()
    assert sampling.generate_images(Gc, [1], class_idx=2).shape == (1, 8, 8, 3)
    with pytest.raises(ValueError, match="out of range"):
        sampling.generate_images(Gc, [1], class_idx=3)
    with pytest.raises(ValueError, match="conditional"):
        sampling.generate_images(Gc, [1])


def test_image_grid_layout():
    imgs = np.stack([np.full((2, 2, 3), i, np.uint8) for i in range(5)])
    grid = sampling.image_grid(imgs, cols=3)
    assert grid.shape == (4, 6, 3)
    assert grid[0, 4, 0] == 2 and grid[2, 2, 0] == 4 and grid[3, 5, 0] == 255
