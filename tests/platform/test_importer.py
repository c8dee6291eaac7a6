"""`styleray import`: an NVIDIA pickle (tests/nvidia_fixture.py) becomes a normal run folder that generate,
metrics and the checkpoint loader (serve's) use like any other; bad input is a one-line error, nothing written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import nvidia_fixture as nf
from styleray import cli
from styleray.config import ModelConfig
from styleray.models import sampling
from styleray.platform import checkpoint as ckpt_lib
from styleray.platform.importer import import_network

CFG = ModelConfig(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16, mbstd_group=2)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An NVIDIA-structured snapshot on disk and the styleray networks it was made from."""
    G, D, G_ema = nf.random_networks(CFG)
    path = tmp_path_factory.mktemp("pkl") / "network-snapshot-000200.pkl"
    path.write_bytes(nf.dump(nf.snapshot(G, D, G_ema, augment_p=0.3)))
    return str(path), G_ema


@pytest.fixture(scope="module")
def imported(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "imported")
    return import_network(source[0], out), out


def test_the_imported_run_generates_the_source_images(source, imported):
    report, out = imported
    G, ckpt = ckpt_lib.load_generator(out)
    seeds = [0, 1, 2, 3]
    for psi in (1.0, 0.7):
        np.testing.assert_array_equal(sampling.generate_images(G, seeds, truncation_psi=psi),
                                      sampling.generate_images(source[1].eval(), seeds, truncation_psi=psi))
    assert ckpt.kimg == 0.0 and ckpt.uri == report["checkpoint"]
    assert ckpt.state["augment_pipe"]["p"].item() == pytest.approx(0.3)
    assert ckpt.state["counters"]["cur_nimg"] == 0
    assert ModelConfig(**ckpt.state["model_cfg"]) == CFG


def test_the_run_folder_says_what_was_imported(source, imported):
    report, out = imported
    written = json.loads(open(os.path.join(out, "import.json"), encoding="utf-8").read())
    assert written["source"] == source[0] and len(written["sha256"]) == 64
    assert written["parameters"] == {"G": sum(p.numel() for p in source[1].parameters()), "D": report["parameters"]["D"]}
    assert written["model"]["resolution"] == 16 and written["training_set"]["xflip"] is True
    assert json.loads(open(os.path.join(out, "config.json"), encoding="utf-8").read())["preset"] == "imported"
    assert os.path.exists(os.path.join(report["checkpoint"], "grid.png"))


def test_generate_and_metrics_work_on_an_imported_run(imported, tiny_data, tmp_path, capsys):
    _, out = imported
    assert cli.main(["generate", "--checkpoint", out, "--seeds", "0-3", "--out", str(tmp_path / "g.png")]) == 0
    assert os.path.getsize(tmp_path / "g.png") > 0
    assert cli.main(["metrics", "--checkpoint", out, "--data", tiny_data, "--metrics", "fid", "--num-gen", "16",
                     "--extractor", "pixels-8x8", "--no-cache"]) == 0
    assert "fid" in capsys.readouterr().out


def test_the_cli_prints_the_configuration_and_the_parameter_counts(source, tmp_path, capsys):
    assert cli.main(["import", source[0], "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    assert "16 px" in text and "mapping 2 layers" in text and "minibatch-std group 2" in text
    assert f"G {sum(p.numel() for p in source[1].parameters()):,}" in text and "augment p: 0.3" in text


@pytest.mark.parametrize("data, message", [
    (nf.tf_era_pickle(), "TensorFlow-era pickle"),
    (b"\x80\x04not really", "truncated or corrupt pickle"),
    (b"GIF89a", "is not a pickle"),
])
def test_bad_files_exit_2_with_one_line_and_write_nothing(data, message, tmp_path, capsys):
    path = tmp_path / "bad.pkl"
    path.write_bytes(data)
    with pytest.raises(SystemExit) as e:
        cli.main(["import", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_pickle_without_g_ema_is_refused(tmp_path):
    snap = nf.snapshot(*nf.random_networks(CFG))
    del snap["G_ema"]
    path = tmp_path / "no-ema.pkl"
    path.write_bytes(nf.dump(snap))
    with pytest.raises(ValueError, match="has no G_ema network"):
        import_network(str(path), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_existing_runs_missing_files_and_unwritable_folders_are_refused(source, imported, tmp_path):
    _, out = imported
    before = sorted(os.listdir(ckpt_lib.checkpoints_dir(out)))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        import_network(source[0], out)
    assert sorted(os.listdir(ckpt_lib.checkpoints_dir(out))) == before
    with pytest.raises(ValueError, match="does not exist"):
        import_network(str(tmp_path / "missing.pkl"), str(tmp_path / "run"))
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(ValueError, match="is not writable"):
        import_network(source[0], str(tmp_path / "file" / "run"))
