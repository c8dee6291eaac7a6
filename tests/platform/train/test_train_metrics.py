"""`styleray train --metrics`: FID/KID during training, best.json by FID. A small extractor built here stands
in for Inception; nothing is downloaded."""

from __future__ import annotations

import json
import os

import pytest

from styleray import cli
from styleray.models import metrics
from styleray.platform import checkpoint as ckpt_lib
from metrics_helpers import register_tiny

EXTRACTOR = "test-train-feats"


@pytest.fixture
def tiny_extractor():
    unregister = register_tiny(EXTRACTOR)
    yield EXTRACTOR
    unregister()


TRAIN = ["train", "--preset", "cpu-tiny", "--batch", "8", "--tick", "0.016", "--no-ray", "--no-progress",
         "--resume", "none", "--device", "cpu"]


def test_train_metrics_records_fid_and_picks_best_by_fid(tiny_data, tmp_path, tiny_extractor, helpers):
    """3 ticks, measured every 2 (tick 2) and at the end (tick 3); snapshots only where measured."""
    out = tmp_path / "run"
    code = cli.main([*TRAIN, "--data", tiny_data, "--out", str(out), "--kimg", "0.048", "--snap", "10",
                     "--metrics", "fid,kid", "--metrics-every", "2", "--metrics-num-gen", "24",
                     "--extractor", tiny_extractor])
    assert code == 0
    records = helpers.metrics(out)
    assert [r["tick"] for r in records] == [1, 2, 3]
    assert "fid" not in records[0]
    for r in records[1:]:
        assert r["fid"] > 0 and r["kid"] == r["kid"] and r["diversity_ratio"] > 0
        assert r["metrics_extractor"] == tiny_extractor and r["num_gen"] == 24
    assert [os.path.basename(u) for u in ckpt_lib.list_checkpoints(str(out))] == \
        ["ckpt-000000000032", "ckpt-000000000048"]  # measured ticks are kept: one of them is the best
    best = json.loads((out / "best.json").read_text())
    assert best["criterion"] == "fid"
    fids = {r["tick"]: r["fid"] for r in records[1:]}
    assert best["value"] == pytest.approx(min(fids.values()))
    assert best["tick"] == min(fids, key=fids.get)
    ck = ckpt_lib.load_checkpoint(best["uri"])
    assert ck.meta["metrics"]["fid"] == pytest.approx(best["value"])


def test_no_ray_metrics_use_the_images_already_in_memory(tiny_data, tmp_path, tiny_extractor, monkeypatch, helpers):
    """`train --no-ray` has the whole dataset decoded for training: a cold statistics cache must not make it
    decode the folder a second time (spied on; the real function runs)."""
    import shutil

    from styleray.datasets.read import ray_data

    data = tmp_path / "data"  # a fresh copy: its statistics cache is cold
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns(".*"))
    calls = []
    real_decode_all = ray_data.decode_all
    monkeypatch.setattr(ray_data, "decode_all", lambda *a, **k: calls.append(a) or real_decode_all(*a, **k))
    out = tmp_path / "run"
    assert cli.main([*TRAIN, "--data", str(data), "--out", str(out), "--kimg", "0.016", "--metrics", "fid",
                     "--metrics-num-gen", "16", "--extractor", tiny_extractor]) == 0
    assert calls == []
    cached = [p for p in data.rglob("*") if p.is_file() and tiny_extractor in p.name]
    assert cached, "the statistics were computed (and cached) in this run"
    fids = [r["fid"] for r in helpers.metrics(out) if "fid" in r]
    assert fids and all(f > 0 for f in fids)


def test_missing_inception_weights_fail_before_training(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main([*TRAIN, "--data", tiny_data, "--out", str(out), "--kimg", "0.016", "--metrics", "fid"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert metrics.INCEPTION_FILE in err and "--inception PATH" in err and metrics.INCEPTION_ENV in err
    assert not out.exists()  # nothing was trained or written


def test_bad_metrics_flags_name_the_flag(tiny_data, tmp_path, capsys):
    for flags, message in [
        (["--metrics", "fid,lpips"], "--metrics fid,lpips: choose from fid, kid"),
        (["--metrics", "fid", "--extractor", "nope"], "--extractor 'nope' is not registered"),
        (["--metrics", "fid", "--extractor", "pixels-8x8", "--metrics-every", "0"], "--metrics-every: '0': must be >= 1"),
    ]:
        with pytest.raises(SystemExit):
            cli.main([*TRAIN, "--data", tiny_data, "--out", str(tmp_path / "r"), *flags])
        assert message in capsys.readouterr().err
