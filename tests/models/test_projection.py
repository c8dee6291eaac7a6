"""The latent search (W, W+), pivotal tuning and the distances, on a tiny 16 px generator.

Stated thresholds (16 px cpu-tiny generator, random initialisation, pixel-msssim distance, 400 steps): a
target the generator made from a known latent is recovered with PSNR >= 25 dB in W+ for each of three seeds,
>= 25 dB on average over them in W, and at least 5 dB closer than the search's starting image. W+ beats W on
targets outside W (style-mixed images and sample figures) at 200 steps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from projection_helpers import figure, tiny_generator, write_random_vgg16

from styleray.models import sampling
from styleray.models.projection import choose, distances, pivotal, search, vgg16
from styleray.models.projection.distances import PixelMSSSIM, ms_ssim, psnr
from styleray.models.projection.search import ProjectionConfig, project
from styleray.models.weights import MissingWeightsError


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One thread, as in each Ray worker here: on 2 shared cores, two threads per op wait on each other (a
    projection step took 25 times as long under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def G():
    return tiny_generator(16)


def generated(G, seeds) -> list[torch.Tensor]:
    ws = sampling.seeds_to_ws(G, seeds)
    return [G.synthesis(ws[i : i + 1], noise_mode="const")[0] for i in range(len(seeds))]


# -- the schedule and the regulariser ---------------------------------------------------------------------


def test_schedule_ramps_like_the_reference():
    cfg = ProjectionConfig(steps=1000)
    lr = [search.schedule(s, cfg)[0] for s in range(1000)]
    assert lr[0] == 0 and lr[25] == pytest.approx(0.5) and lr[50:750] == [1.0] * 700
    assert lr[875] == pytest.approx(0.5) and 0 < lr[999] < 1e-3 and lr[900] > lr[950] > lr[990]
    noise = [search.schedule(s, cfg)[1] for s in range(1000)]
    assert noise[0] == cfg.w_noise and noise[375] == pytest.approx(cfg.w_noise / 4) and noise[750:] == [0.0] * 250


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "--steps 0"), ({"steps": 200_000}, "--steps"), ({"space": "z"}, "--space 'z'"),
    ({"lr_rampup": 0}, "lr_rampup"), ({"w_avg_samples": 1}, "w_avg_samples"),
])
def test_config_errors_name_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProjectionConfig(**kwargs)
    with pytest.raises(ValueError, match="--pti-steps 0"):
        pivotal.PivotalConfig(steps=0)


def test_noise_regularisation_is_small_for_white_noise_and_large_for_smooth_maps():
    gen = torch.Generator().manual_seed(0)
    white = [torch.randn(32, 32, generator=gen), torch.randn(8, 8, generator=gen)]
    smooth = [torch.nn.functional.interpolate(torch.randn(1, 1, 4, 4, generator=gen), size=32, mode="bilinear")[0, 0]]
    smooth = [(m - m.mean()) / m.std() for m in smooth]
    assert float(search.noise_regularization(white)) < 0.05
    assert float(search.noise_regularization(smooth)) > 10 * float(search.noise_regularization(white[:1]))


# -- distances --------------------------------------------------------------------------------------------


def test_psnr_and_ms_ssim():
    a = torch.zeros(1, 3, 16, 16)
    b = a + 2 * 10 / 255  # every pixel 10 levels apart: MSE 100
    assert float(psnr(b, a)[0]) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-3)
    assert math.isinf(float(psnr(a, a)[0]))
    assert distances.psnr_uint8(np.full(4, 10, np.uint8), np.zeros(4, np.uint8)) == pytest.approx(28.1308, abs=1e-3)
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 32, 32, generator=gen)
    assert torch.allclose(ms_ssim(img, img), torch.ones(2))
    noisy = [(img + s * torch.randn(img.shape, generator=gen)).clamp(0, 1) for s in (0.05, 0.2)]
    assert 1 > float(ms_ssim(noisy[0], img).mean()) > float(ms_ssim(noisy[1], img).mean())
    assert [distances.msssim_scales(s) for s in (8, 16, 32, 256, 1024)] == [1, 2, 3, 5, 5]
    with pytest.raises(ValueError, match="at least 8 px"):
        distances.msssim_scales(4)


def test_pixel_msssim_has_finite_gradients_and_orders_images():
    d = PixelMSSSIM()
    target = torch.rand(1, 3, 16, 16) * 2 - 1
    near = (target + 0.05 * torch.randn_like(target)).requires_grad_(True)
    far = torch.rand(1, 3, 16, 16) * 2 - 1
    dn = d(near, target)
    dn.sum().backward()
    assert torch.isfinite(near.grad).all() and float(near.grad.abs().sum()) > 0
    assert float(d(target, target)[0]) == pytest.approx(0, abs=1e-6)
    assert float(dn[0].detach()) < float(d(far, target)[0])


def test_vgg16_weights_load_from_a_torchvision_file_and_give_an_lpips_like_distance(tmp_path):
    path = write_random_vgg16(str(tmp_path / vgg16.VGG16_FILE))
    net = vgg16.load_vgg16(path)
    d = vgg16.VGG16Distance(net)
    a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(d(a, a)[0]) == pytest.approx(0, abs=1e-6)
    assert float(d(a, b)[0]) > 0 and len(d.embed(a)) == 5
    assert float(d(a, b)[0]) == pytest.approx(float(d(b, a)[0]), rel=1e-5)
    big = torch.rand(1, 3, 512, 512) * 2 - 1  # larger than 256: area-downsampled first
    assert d.embed(big)[0].shape[-1] == vgg16.MAX_SIDE


def test_vgg16_file_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(vgg16.VGG16_WEIGHTS.env, raising=False)
    with pytest.raises(MissingWeightsError) as e:
        vgg16.load_vgg16()
    for part in (vgg16.VGG16_FILE, vgg16.VGG16_WEIGHTS.url, "--vgg16", "STYLERAY_VGG16", str(tmp_path / "cache")):
        assert part in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth: not a loadable state_dict"):
        vgg16.load_vgg16(str(junk))
    torch.save({"features.0.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: is not torchvision's VGG16"):
        vgg16.load_vgg16(str(tmp_path / "other.pth"))


def test_auto_distance_uses_vgg16_when_found_else_says_why_it_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(vgg16.VGG16_WEIGHTS.env, raising=False)
    d, note = choose.build_distance("auto")
    assert d.name == "pixel-msssim" and "pixel MSE + (1 - multi-scale SSIM)" in note and vgg16.VGG16_FILE in note
    with pytest.raises(MissingWeightsError):
        choose.build_distance("vgg16")
    with pytest.raises(MissingWeightsError, match="nope.pth"):  # an explicit path that is missing: an error
        choose.build_distance("auto", str(tmp_path / "nope.pth"))
    (tmp_path / "cache" / "styleray").mkdir(parents=True)
    write_random_vgg16(str(tmp_path / "cache" / "styleray" / vgg16.VGG16_FILE))
    d, note = choose.build_distance("auto")
    assert d.name == "vgg16" and "weights" in note
    with pytest.raises(ValueError, match="--distance 'lpips'"):
        choose.build_distance("lpips")


# -- the search -------------------------------------------------------------------------------------------


def test_short_projection_improves_is_deterministic_and_reproduces_its_image(G):
    target = generated(G, [7])[0]
    cfg = ProjectionConfig(steps=30, space="w+", w_avg_samples=1000, seed=3)
    seen = []
    p = project(G, target, cfg, PixelMSSSIM(), callback=lambda pr: seen.append(pr.step))
    assert seen == list(range(1, 31)) and len(p.history) == 30
    assert p.ws.shape == (G.num_ws, G.w_dim) and p.image.shape == (3, 16, 16) and p.space == "w+"
    assert p.history[-1][1] < p.history[0][1] and p.psnr > p.history[0][2]
    again = project(G, target, cfg, PixelMSSSIM())
    assert torch.equal(again.ws, p.ws) and again.psnr == p.psnr
    assert not torch.equal(project(G, target, ProjectionConfig(**{**cfg.__dict__, "seed": 4}), PixelMSSSIM()).ws, p.ws)
    # The projection's noise maps in a copy of G give back its image; G itself is untouched.
    replay = search.with_noise(G, p.noise).synthesis(p.ws[None], noise_mode="const")[0]
    torch.testing.assert_close(replay, p.image)
    assert not torch.equal(search.noise_buffers(G)[next(iter(p.noise))], next(iter(p.noise.values())))


def test_w_space_gives_one_w_for_every_layer_and_conditional_generators_work():
    Gc = tiny_generator(16, c_dim=2)
    target = figure(1, 16)
    p = project(Gc, target, ProjectionConfig(steps=5, space="w", class_idx=1, w_avg_samples=500), PixelMSSSIM())
    assert torch.equal(p.ws, p.ws[:1].expand_as(p.ws))
    with pytest.raises(ValueError, match=r"target must be \[3, 16, 16\]"):
        project(Gc, figure(1, 32), ProjectionConfig(steps=1), PixelMSSSIM())


@pytest.mark.slow
def test_a_known_latent_is_recovered(G):
    """The thresholds stated in the module docstring."""
    targets = generated(G, [1, 2, 3])
    results = {space: [project(G, t, ProjectionConfig(steps=400, space=space), PixelMSSSIM()) for t in ts]
               for space, ts in (("w+", targets), ("w", targets[:2]))}
    w_avg, _ = search.w_statistics(G, ProjectionConfig(), torch.device("cpu"))
    start = G.synthesis(w_avg[:, None].expand(1, G.num_ws, -1), noise_mode="const")
    for t, p in zip(targets, results["w+"]):
        assert p.psnr >= 25.0, p.psnr
        assert p.psnr >= float(psnr(start, t[None])[0]) + 5
    assert np.mean([p.psnr for p in results["w"]]) >= 25.0, [p.psnr for p in results["w"]]


@pytest.mark.slow
def test_w_plus_reconstructs_better_than_w(G):
    ws = sampling.seeds_to_ws(G, [1, 2])
    mixed_w = ws[0:1].clone()
    mixed_w[:, G.num_ws // 2 :] = ws[1:2, G.num_ws // 2 :]  # coarse layers from one seed, fine from another: not in W
    mixed = G.synthesis(mixed_w, noise_mode="const")[0]
    for target in (mixed, figure(0, 16)):
        w, wp = (project(G, target, ProjectionConfig(steps=200, space=s), PixelMSSSIM()) for s in ("w", "w+"))
        assert wp.psnr > w.psnr and wp.distance < w.distance, (w.psnr, wp.psnr)


@pytest.mark.slow
def test_pivotal_tuning_brings_the_reconstruction_closer(G):
    target = figure(0, 16)
    p = project(G, target, ProjectionConfig(steps=100, space="w+"), PixelMSSSIM())
    tuned = pivotal.pivotal_tuning(G, p, target, pivotal.PivotalConfig(steps=100), PixelMSSSIM())
    assert tuned.psnr >= p.psnr + 3, (p.psnr, tuned.psnr)
    assert len(tuned.history) == 100
    torch.testing.assert_close(tuned.G.synthesis(p.ws[None], noise_mode="const")[0], tuned.image)
    assert torch.equal(tuned.G.mapping.layers[0].weight, G.mapping.layers[0].weight)  # mapping untouched
    assert not torch.equal(tuned.G.synthesis.blocks[-1].torgb.weight, G.synthesis.blocks[-1].torgb.weight)
