"""`styleray metrics` (platform/evaluate.py) end to end, and the dataset statistics it caches next to the data
(FolderStatsCache). A tiny extractor stands in for Inception; nothing is downloaded."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from styleray import cli
from styleray.config import resolve_preset
from styleray.datasets.read.folder import list_image_files, load_image_folder
from styleray.models import metrics
from styleray.platform.train.metrics import STATS_DIR, FolderStatsCache
from metrics_helpers import TINY, register_tiny, write_dataset

CALLS: list = []


@pytest.fixture(autouse=True)
def tiny_extractor():
    unregister = register_tiny(TINY, CALLS)
    yield metrics.build_extractor(TINY)
    unregister()




def test_dataset_stats_are_cached_next_to_the_data_and_the_key_follows_the_files(tmp_path, tiny_extractor):
    root = write_dataset(tmp_path / "data", n=9)
    loads = []

    def stats():
        files = list_image_files(root)

        def load():
            loads.append(1)
            return load_image_folder(root, resolution=16).images

        return metrics.dataset_stats(root, tiny_extractor, files=files, load_images=load, resolution=16, batch_size=4,
                                     cache=FolderStatsCache(root))

    CALLS.clear()
    first = stats()
    assert first.num == 9 and first.features.shape == (9, 16) and len(loads) == 1 and len(CALLS) == 3
    second = stats()
    assert len(loads) == 1 and len(CALLS) == 3  # from the cache: nothing loaded, nothing extracted
    np.testing.assert_array_equal(first.features, second.features)
    np.testing.assert_array_equal(first.sigma, second.sigma)
    cache = tmp_path / "data" / STATS_DIR
    assert [p.name for p in cache.iterdir()] == [
        metrics.stats_cache_key(root, list_image_files(root), TINY, 16)]  # no temporary files left
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
    assert metrics.stats_cache_key(root, list_image_files(root), TINY, 32) != metrics.stats_cache_key(
        root, list_image_files(root), TINY, 16)


def test_an_unreadable_cache_is_recomputed(tmp_path, tiny_extractor):
    root = write_dataset(tmp_path / "data", n=4)
    files = list_image_files(root)
    key = metrics.stats_cache_key(root, files, TINY, 16)
    FolderStatsCache(root).write(key, b"not an npz")
    stats = metrics.dataset_stats(root, tiny_extractor, files=files, resolution=16, cache=FolderStatsCache(root),
                                  load_images=lambda: load_image_folder(root, resolution=16).images)
    assert stats.num == 4 and metrics.FeatureStats.from_bytes(FolderStatsCache(root).read(key)).num == 4


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
    assert len(os.listdir(tmp_path / "data" / STATS_DIR)) == 1

    CALLS.clear()
    assert cli.main(argv + ["--metrics", "fid"]) == 0  # dataset statistics from the cache
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(CALLS) == 3 and "kid" not in again  # 12 generated images in batches of 4, no data
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-9)


def test_cli_metrics_errors_exit_2_with_the_fix(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
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
