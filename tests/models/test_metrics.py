"""Metrics: Fréchet distance and KID against closed forms, dataset statistics, the missing-weights error and
2-rank feature gathering. A tiny extractor stands in for Inception."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from styleray.config import ModelConfig
from styleray.datasets.read.folder import list_image_files, load_image_folder
from styleray.models import metrics
from styleray.models.metrics import inception
from styleray.models.networks import Generator
from metrics_helpers import TINY, register_tiny, tiny_extractor_spec, write_dataset

CALLS: list = []  # one item per call of the tiny extractor's network


@pytest.fixture(autouse=True)
def tiny_extractor():
    unregister = register_tiny(TINY, CALLS)
    yield metrics.build_extractor(TINY)
    unregister()


def tiny_generator(c_dim=0):
    torch.manual_seed(0)
    cfg = ModelConfig(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16, c_dim=c_dim)
    G = Generator(cfg).eval()
    for m in G.modules():  # visible noise, so that noise seeding matters
        if hasattr(m, "strength"):
            nn.init.constant_(m.strength, 0.3)
    return G




# ---------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------


def random_spd(rng, d):
    a = rng.standard_normal([d, d])
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert metrics.frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(2.0)  # 1 + 1 + 4 - 2*2


def test_frechet_distance_matches_float64_reference_on_full_covariances():
    rng = np.random.default_rng(1)
    d = 48
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    # Independent reference: the eigenvalues of the (non-symmetric) product, as a general matrix.
    lam = np.linalg.eigvals(s1 @ s2)
    assert np.abs(lam.imag).max() < 1e-9 and lam.real.min() > 0
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam.real).sum()
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(ref, rel=1e-10)
    # The same Gaussian, and float32 inputs (computed in float64 anyway).
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    assert metrics.frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu2, s2) == pytest.approx(ref, rel=1e-5)


def test_frechet_distance_matches_scipy_sqrtm_on_singular_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    f1, f2 = rng.standard_normal([20, 32]), rng.standard_normal([25, 32]) + 0.3  # fewer samples than dims
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    covmean = linalg.sqrtm(s1 @ s2)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))


# ---------------------------------------------------------------------------------------------------------
# KID and diversity
# ---------------------------------------------------------------------------------------------------------


def _kernel(a, b):
    return (a @ b.T / a.shape[1] + 1) ** 3


def test_kid_of_a_set_with_itself_is_about_zero():
    rng = np.random.default_rng(0)
    f = rng.standard_normal([400, 16])
    shifted = metrics.kernel_inception_distance(f, f + 0.5, num_subsets=10, max_subset_size=200)
    # Two independent samples of one distribution: 0 on average, small next to a real difference.
    same = metrics.kernel_inception_distance(f, rng.standard_normal([400, 16]), num_subsets=10, max_subset_size=200)
    assert abs(same) < 0.02 * shifted
    # The very same rows: slightly negative, O(1/m), since the cross term pairs each point with itself.
    itself = metrics.kernel_inception_distance(f, f, num_subsets=10, max_subset_size=200)
    k = _kernel(f, f)
    assert -0.05 * shifted < itself < 0
    whole = metrics.kernel_inception_distance(f, f, num_subsets=1, max_subset_size=400)
    m = len(f)
    assert whole == pytest.approx(2 * ((k.sum() - np.trace(k)) / (m * (m - 1)) - k.mean()), rel=1e-9)


@pytest.mark.parametrize("same", [True, False])
def test_mmd2_estimator_is_unbiased_on_discrete_distributions(same):
    """P, Q uniform on a few points: E[MMD²_u] equals the population MMD² exactly; the biased V-statistic
    (self-similarities included) misses it by O(1/m)."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal([3, 4])
    B = A if same else A + rng.standard_normal([3, 4]) * 0.4
    population = _kernel(A, A).mean() + _kernel(B, B).mean() - 2 * _kernel(A, B).mean()
    m, trials = 4, 3000
    xs, ys = A[rng.integers(3, size=[trials, m])], B[rng.integers(3, size=[trials, m])]
    unbiased = np.array([metrics.mmd2_unbiased(x, y) for x, y in zip(xs, ys)])
    biased = np.array([_kernel(x, x).mean() + _kernel(y, y).mean() - 2 * _kernel(x, y).mean() for x, y in zip(xs, ys)])
    se = unbiased.std() / np.sqrt(trials)
    assert abs(unbiased.mean() - population) < 4 * se
    assert abs(biased.mean() - population) > 10 * se  # the check has the power to tell them apart
    # KID with the subset size equal to the set sizes is the same U-statistic.
    assert metrics.kernel_inception_distance(ys[0], xs[0], num_subsets=2, max_subset_size=m) == pytest.approx(unbiased[0])


def test_mean_pairwise_distance_and_collapse_ratio():
    assert metrics.mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    pts = np.array([[0.0], [1.0], [3.0]])
    assert metrics.mean_pairwise_distance(pts) == pytest.approx((1 + 3 + 2) / 3)
    rng = np.random.default_rng(0)
    data = rng.standard_normal([300, 8])
    collapsed = data[:3][rng.integers(3, size=300)] + 0.01 * rng.standard_normal([300, 8])
    real = metrics.FeatureStats(data, TINY)
    out = metrics.compare_stats(real, metrics.FeatureStats(data[::-1].copy(), TINY), ("fid",))
    assert out["diversity_ratio"] == pytest.approx(1.0) and abs(out["fid"]) < 1e-9
    assert metrics.compare_stats(real, metrics.FeatureStats(collapsed, TINY), ("fid",))["diversity_ratio"] < 0.9


def test_parse_metrics():
    assert metrics.parse_metrics("fid, KID,fid") == ("fid", "kid")
    with pytest.raises(ValueError, match="choose from fid, kid"):
        metrics.parse_metrics("fid,is")


# ---------------------------------------------------------------------------------------------------------
# Extractors and the Inception weights
# ---------------------------------------------------------------------------------------------------------


def test_missing_weights_error_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(inception.INCEPTION_ENV, raising=False)
    with pytest.raises(metrics.MissingWeightsError) as e:
        metrics.build_extractor("inception-v3")
    msg = str(e.value)
    for part in (metrics.INCEPTION_FILE, str(tmp_path / "cache" / "styleray"), metrics.INCEPTION_URL, "--inception",
                 metrics.INCEPTION_ENV):
        assert part in msg
    monkeypatch.setenv(inception.INCEPTION_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(metrics.MissingWeightsError, match=f"\\${metrics.INCEPTION_ENV}: .*elsewhere"):
        metrics.find_inception_weights()
    with pytest.raises(ValueError, match="--inception: .*nope.pth"):  # a ValueError too: the CLI exits 2
        metrics.find_inception_weights(str(tmp_path / "nope.pth"))


def test_fid_inception_architecture_and_loading(tmp_path, caplog):
    # torchvision's inception_v3 without the aux classifier has 23,834,568 parameters at 1000 classes.
    assert sum(p.numel() for p in inception.FIDInceptionV3(num_classes=1000).parameters()) == 23_834_568
    torch.manual_seed(0)
    state = {k: v for k, v in inception.FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / metrics.INCEPTION_FILE)  # a folder holding the file works too
    with caplog.at_level("WARNING"):
        ex = metrics.build_extractor("inception-v3", weights=str(tmp_path))
    assert "not be comparable" in caplog.text  # random weights: the published hash does not match
    feats = ex(torch.randint(0, 256, [1, 1, 16, 16], dtype=torch.uint8))
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match the FID Inception-v3"):
        metrics.load_fid_inception(str(tmp_path / "bad.pth"))


def test_unknown_extractor_lists_the_registered_ones():
    with pytest.raises(ValueError, match=f"choose one of inception-v3, pixels-8x8, {TINY}"):
        metrics.build_extractor("clip")
    with pytest.raises(ValueError, match="already registered"):
        metrics.register_extractor(tiny_extractor_spec(TINY))


# ---------------------------------------------------------------------------------------------------------
# Dataset statistics and their cache
# ---------------------------------------------------------------------------------------------------------


def test_dataset_stats_check_the_loaded_images(tmp_path, tiny_extractor):
    root = write_dataset(tmp_path / "data", n=3)
    with pytest.raises(ValueError, match="expected \\[3, 32, 32, 3\\]"):
        metrics.dataset_stats(root, tiny_extractor, files=list_image_files(root), resolution=32,
                              load_images=lambda: load_image_folder(root).images)


# ---------------------------------------------------------------------------------------------------------
# Generator features and ranks
# ---------------------------------------------------------------------------------------------------------


def test_generator_features_are_batch_invariant_and_seeded(tiny_extractor):
    G = tiny_generator()
    a = metrics.generator_features(G, tiny_extractor, 7, batch_size=3)
    b = metrics.generator_features(G, tiny_extractor, 7, batch_size=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (7, 16) and not np.allclose(a[0], a[1])
    tail = metrics.generator_features(G, tiny_extractor, 4, first_seed=3, batch_size=3)
    np.testing.assert_array_equal(a[3:], tail)  # an image depends on its seed, not on its batch


def test_gather_rows_with_uneven_shards():
    n, world = 7, 3
    full = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    locals_ = [full[slice(*metrics.shard_bounds(n, r, world))] for r in range(world)]
    assert [len(x) for x in locals_] == [2, 2, 3]

    def fake_all_gather(t):  # what every rank would contribute, padded to the same shape
        return [torch.cat([x, x.new_zeros([3 - len(x), 2])]) for x in locals_]

    for r in range(world):
        torch.testing.assert_close(metrics.gather_rows(locals_[r], n, r, world, fake_all_gather), full)
    with pytest.raises(ValueError, match="process group"):
        metrics.gather_rows(locals_[0], n, 0, world)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, out_dir, G_state, images):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        G = tiny_generator()
        G.load_state_dict(G_state)
        ex = metrics.Extractor(TINY, tiny_extractor_spec(TINY).build(None).eval(), 16)
        gen = metrics.generator_features(G, ex, 7, batch_size=2, rank=rank, world_size=world)
        data = metrics.extract_features(images, ex, batch_size=2, rank=rank, world_size=world)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), gen=gen, data=data)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_gather_what_one_process_computes(tmp_path, tiny_extractor):
    G = tiny_generator()
    images = np.random.default_rng(0).integers(0, 256, [5, 16, 16, 3], dtype=np.uint8)
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path), G.state_dict(), images), nprocs=2, join=True)
    gen = metrics.generator_features(G, tiny_extractor, 7, batch_size=2)
    data = metrics.extract_features(images, tiny_extractor, batch_size=2)
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_allclose(got["gen"], gen, rtol=1e-6, atol=1e-7)  # bit-equal here; thread counts differ
        np.testing.assert_allclose(got["data"], data, rtol=1e-6, atol=1e-7)
    real = metrics.FeatureStats(data, TINY)
    assert metrics.compare_stats(real, metrics.FeatureStats(got["gen"], TINY), ("fid",))["fid"] == pytest.approx(
        metrics.compare_stats(real, metrics.FeatureStats(gen, TINY), ("fid",))["fid"], rel=1e-6
    )
