"""Background removers: rembg model lookup (never a download: a missing file is named, with where to put it),
the automatic choice, soft masks cleaned like the classic ones, and a real ONNX session on a tiny model."""

from __future__ import annotations

import os

import numpy as np
import pytest

from styleray.datasets.prepare.removers import (
    CUSTOM_SESSION,
    RembgSegmenter,
    default_remover,
    from_soft_alpha,
    resolve_rembg_model,
)


@pytest.fixture
def empty_rembg_home(tmp_path, monkeypatch):
    for var in ("U2NET_HOME", "REMBG_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_a_missing_model_is_named_with_where_to_put_it(empty_rembg_home):
    with pytest.raises(FileNotFoundError) as e:
        resolve_rembg_model("u2net")
    message = str(e.value)
    assert "u2net.onnx is not on this machine" in message and str(empty_rembg_home / "u2net_home") in message
    assert "never downloads" in message and "--remover classic" in message
    with pytest.raises(FileNotFoundError, match="no such file .*missing.onnx"):
        resolve_rembg_model(str(empty_rembg_home / "missing.onnx"))
    with pytest.raises(ValueError, match="'u3net' is not a supported rembg model name"):
        resolve_rembg_model("u3net")


def test_a_model_file_is_found_where_rembg_keeps_it(empty_rembg_home):
    home = empty_rembg_home / "u2net_home"
    home.mkdir()
    (home / "u2netp.onnx").write_bytes(b"onnx")
    model = resolve_rembg_model("u2netp")
    assert model.session == "u2netp" and model.path == str(home / "u2netp.onnx") and model.label == "u2netp"
    custom = resolve_rembg_model(str(home / "u2netp.onnx"))
    assert custom.session == CUSTOM_SESSION and custom.label == "custom:u2netp.onnx"


def test_auto_takes_classic_without_a_model_and_rembg_with_one(empty_rembg_home):
    assert default_remover() == ("classic", None)
    home = empty_rembg_home / "u2net_home"
    home.mkdir()
    (home / "u2net.onnx").write_bytes(b"onnx")
    remover, model = default_remover()
    assert remover == "rembg" and model.path == str(home / "u2net.onnx")


def test_a_soft_mask_is_cleaned_and_scored():
    alpha = np.zeros([40, 40], np.float32)
    alpha[8:32, 10:30] = 1.0  # the figure
    alpha[18:20, 18:20] = 0.0  # a small hole in it: filled
    alpha[1, 1] = 1.0  # a speck: dropped
    seg = from_soft_alpha(alpha)
    assert seg.mask[18, 18] and not seg.mask[1, 1] and seg.mask.sum() == 24 * 20
    assert seg.confidence == pytest.approx(1.0, abs=1e-3)  # nothing undecided
    undecided = from_soft_alpha(np.full([40, 40], 0.5, np.float32))
    assert undecided.confidence < 0.5


def test_a_real_onnx_session_segments_and_leaves_the_environment_alone(tiny_onnx, monkeypatch):
    monkeypatch.setenv("U2NET_HOME", "/somewhere/else")
    segmenter = RembgSegmenter(resolve_rembg_model(str(tiny_onnx)))
    assert os.environ["U2NET_HOME"] == "/somewhere/else"
    rgb = np.full([48, 64, 3], 255, np.uint8)
    rgb[10:40, 20:44] = (200, 30, 30)  # a red figure on white: the tiny net's border contrast finds it
    alpha = segmenter.alpha(rgb)
    assert alpha.shape == (48, 64) and alpha.dtype == np.float32
    assert alpha[25, 32] > 0.5 > alpha[2, 2]
