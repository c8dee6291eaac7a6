"""Metrics: Fréchet distance and KID against closed forms, cached dataset statistics, the missing-weights
error, 2-rank feature gathering, and `styleray metrics` end to end. A tiny extractor stands in for Inception."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from PIL import Image

from styleray import cli
from styleray.config import ModelConfig, resolve_preset
from styleray.datasets.reader import list_image_files, load_image_folder
from styleray.models import metrics
from styleray.models.metrics import inception
from styleray.models.networks import Generator

TINY = "test-tiny"


class TinyExtractor(nn.Module):
    """uint8 [N, C, H, W] -> [N, 16]; deterministic weights; counts its calls."""

    calls = 0

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 4, 16)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, images):
        TinyExtractor.calls += 1
        x = images.float() / 127.5 - 1
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = torch.tanh(self.conv(x))
        x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # [N, 32]
        return self.fc(x)


@pytest.fixture(autouse=True)
def tiny_extractor():
    metrics.register_extractor(metrics.ExtractorSpec(TINY, lambda weights: TinyExtractor(), 16), replace=True)
    yield metrics.build_extractor(TINY)
    metrics.EXTRACTORS.pop(TINY, None)


def tiny_generator(c_dim=0):
    torch.manual_seed(0)
    cfg = ModelConfig(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16, c_dim=c_dim)
    G = Generator(cfg).eval()
    for m in G.modules():  # visible noise, so that noise seeding matters
        if hasattr(m, "strength"):
            nn.init.constant_(m.strength, 0.3)
    return G


def write_dataset(root, n=10, res=16, seed=0):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, [res, res, 3], dtype=np.uint8)).save(os.path.join(root, f"{i:06d}.png"))
    return str(root)


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
        metrics.register_extractor(metrics.ExtractorSpec(TINY, lambda w: TinyExtractor(), 16))


# ---------------------------------------------------------------------------------------------------------
# Dataset statistics and their cache
# ---------------------------------------------------------------------------------------------------------


def test_dataset_stats_are_cached_and_the_key_follows_the_files(tmp_path, tiny_extractor):
    root = write_dataset(tmp_path / "data", n=9)
    loads = []

    def stats():
        files = list_image_files(root)

        def load():
            loads.append(1)
            return load_image_folder(root, resolution=16).images

        return metrics.dataset_stats(root, tiny_extractor, files=files, load_images=load, resolution=16, batch_size=4)

    TinyExtractor.calls = 0
    first = stats()
    assert first.num == 9 and first.features.shape == (9, 16) and len(loads) == 1 and TinyExtractor.calls == 3
    second = stats()
    assert len(loads) == 1 and TinyExtractor.calls == 3  # from the cache: nothing loaded, nothing extracted
    np.testing.assert_array_equal(first.features, second.features)
    np.testing.assert_array_equal(first.sigma, second.sigma)
    cache = tmp_path / "data" / ".styleray-stats"
    assert [p.name for p in cache.iterdir()] == [os.path.basename(
        metrics.stats_cache_path(root, list_image_files(root), TINY, 16))]  # no temporary files left
    assert list_image_files(root) == [f"{i:06d}.png" for i in range(9)]  # the cache is invisible to the reader

    Image.fromarray(np.zeros([16, 16, 3], np.uint8)).save(tmp_path / "data" / "000003.png")  # a changed file
    st = os.stat(tmp_path / "data" / "000003.png")
    os.utime(tmp_path / "data" / "000003.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    third = stats()
    assert len(loads) == 2 and not np.array_equal(third.features[3], first.features[3])
    write_dataset(tmp_path / "more", n=1)
    os.rename(tmp_path / "more" / "000000.png", tmp_path / "data" / "000099.png")  # an added file
    assert stats().num == 10 and len(loads) == 3
    assert len(list(cache.iterdir())) == 3
    # A different resolution or extractor is another key.
    assert metrics.stats_cache_path(root, list_image_files(root), TINY, 32) != metrics.stats_cache_path(
        root, list_image_files(root), TINY, 16
    )


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
        ex = metrics.Extractor(TINY, TinyExtractor().eval(), 16)
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


# ---------------------------------------------------------------------------------------------------------
# styleray metrics
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from styleray.models.training import StyleGAN2Trainer
    from styleray.platform.checkpoint import save_checkpoint

    model, train = resolve_preset("cpu-tiny", resolution=16, train_overrides={"batch": 4})
    tr = StyleGAN2Trainer(model, train)
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(str(d), tr.state_dict(), config={}, meta={"cur_nimg": 0, "kimg": 0.0, "tick": 0})
    return str(d)


def test_cli_metrics_end_to_end(checkpoint, tmp_path, capsys):
    data = write_dataset(tmp_path / "data", n=10)
    argv = ["metrics", "--checkpoint", checkpoint, "--data", data, "--extractor", TINY, "--num-gen", "12",
            "--batch", "4", "--kid-subsets", "5", "--kid-subset-size", "8", "--device", "cpu"]
    assert cli.main(argv + ["--json", str(tmp_path / "m.json")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == json.loads((tmp_path / "m.json").read_text())
    assert out["extractor"] == TINY and out["num_gen"] == 12 and out["num_real"] == 10
    assert out["fid"] > 0 and np.isfinite(out["kid"]) and out["diversity_ratio"] > 0
    assert len(os.listdir(tmp_path / "data" / ".styleray-stats")) == 1

    TinyExtractor.calls = 0
    assert cli.main(argv + ["--metrics", "fid"]) == 0  # dataset statistics from the cache
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert TinyExtractor.calls == 3 and "kid" not in again  # 12 generated images in batches of 4, no data
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-9)


def test_cli_metrics_errors_exit_2_with_the_fix(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(inception.INCEPTION_ENV, raising=False)
    data = write_dataset(tmp_path / "data", n=2)
    cases = [
        ([], metrics.INCEPTION_FILE),  # the default extractor, without its weights
        (["--extractor", TINY, "--metrics", "fid,is"], "choose from fid, kid"),
        (["--extractor", "nope"], "is not registered"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(["metrics", "--checkpoint", checkpoint, "--data", data, "--num-gen", "4", *extra])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    big = write_dataset(tmp_path / "big", n=2, res=32)
    with pytest.raises(SystemExit):
        cli.main(["metrics", "--checkpoint", checkpoint, "--data", big, "--extractor", TINY, "--num-gen", "4"])
    assert "prepare the data with --resolution 16" in capsys.readouterr().err
