"""`styleray project` on one image: every output, the PSNR it prints, the pivotal-tuning run that generate loads,
the VGG16 distance from a weights file made here, and bad inputs as one-line errors (exit 2)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from projection_helpers import write_random_vgg16
from serve_helpers import make_checkpoint

from styleray import cli
from styleray.datasets.synthetic import render_figure
from styleray.models.projection import search
from styleray.models.projection.distances import psnr_uint8
from styleray.platform.checkpoint import load_generator
from styleray.platform.projection import outputs

OUTPUTS = ("target.png", "reconstruction.png", "side_by_side.png", "progress.gif", "curve.png", "projected_w.npz",
           "summary.json")


@pytest.fixture(scope="module")
def run16(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("run16")), seed=0, cur_nimg=1000, resolution=16, c_dim=0)


@pytest.fixture(scope="module")
def hero(tmp_path_factory) -> str:
    """A raw picture: a figure on a gradient background, not square."""
    path = tmp_path_factory.mktemp("raw") / "hero.jpg"
    render_figure(2, size=100, seed=1, background="gradient", aspect=0.8)[0].save(path, quality=95)
    return str(path)


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
def test_one_image_writes_every_output_and_a_tuned_run_generate_loads(run16, hero, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["project", "--checkpoint", run16, "--target", hero, "--out", str(out), "--steps", "12",
                     "--space", "w+", "--pti-steps", "4", "--distance", "pixel-msssim", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for name in OUTPUTS + ("reconstruction_pti.png",):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    target, recon = read_png(out / "target.png"), read_png(out / "reconstruction.png")
    assert target.shape == (16, 16, 3) and summary["framing"] == "prepare" and summary["space"] == "w+"
    assert summary["psnr"] == pytest.approx(psnr_uint8(recon, target), abs=1e-3)
    assert f"PSNR {summary['psnr']:.2f} dB, pixel-msssim distance" in printed
    assert Image.open(out / "progress.gif").n_frames >= 8
    assert Image.open(out / "curve.png").size == (720, 480)

    # The latent and its noise maps give back reconstruction.png exactly.
    G, _ = load_generator(run16)
    npz = np.load(out / "projected_w.npz")
    assert npz["w"].shape == (1, G.num_ws, G.w_dim) and json.loads(str(npz["meta"]))["psnr"] == summary["psnr"]
    w, meta = outputs.read_latent((out / "projected_w.npz").read_bytes(), G.num_ws, G.w_dim)
    noise = {k[len("noise."):]: torch.from_numpy(npz[k]) for k in npz.files if k.startswith("noise.")}
    replay = search.with_noise(G, noise).synthesis(w[None], noise_mode="const")[0]
    np.testing.assert_array_equal(outputs.to_uint8(replay), recon)

    # The pivotal-tuning run: generate loads it unchanged, and its image of w is reconstruction_pti.png.
    tuned, ckpt = load_generator(str(out / "pti"))
    assert ckpt.meta["pivotal_tuning"]["pti_steps"] == 4 and summary["pti_run"] == ckpt.uri
    np.testing.assert_array_equal(outputs.to_uint8(tuned.synthesis(w[None], noise_mode="const")[0]),
                                  read_png(out / "reconstruction_pti.png"))
    assert cli.main(["generate", "--checkpoint", str(out / "pti"), "--seeds", "0-3", "--out", str(tmp_path / "g.png")]) == 0
    assert read_png(tmp_path / "g.png").shape == (32, 32, 3)
    assert os.path.getsize(os.path.join(ckpt.uri, "state.pt")) < 0.5 * os.path.getsize(
        os.path.join(load_generator(run16)[1].uri, "state.pt"))  # G_ema only: smaller than a training checkpoint


@pytest.mark.slow
def test_vgg16_distance_from_a_weights_file(run16, hero, tmp_path, monkeypatch):
    weights = write_random_vgg16(str(tmp_path / "vgg16-397923af.pth"))
    monkeypatch.setenv("STYLERAY_VGG16", weights)
    out = tmp_path / "out"
    assert cli.main(["project", "--checkpoint", run16, "--target", hero, "--out", str(out), "--steps", "3",
                     "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distance"] == "vgg16" and weights in summary["distance_note"]


BAD = [
    (["--target", "{tmp}/nope.png"], "no such file"),
    (["--target", "{tmp}/text.png"], "unreadable"),
    (["--target", "{tmp}/bomb.png"], "too-large"),
    (["--target", "{tmp}/empty.png"], "unreadable: empty file"),
    (["--steps", "0"], "--steps 0 must be within"),
    (["--pti-steps", "-1"], "--pti-steps -1"),
    (["--distance", "vgg16", "--vgg16", "{tmp}/missing.pth"], "missing.pth"),
    (["--checkpoint", "{tmp}"], "neither a checkpoint folder"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_a_one_line_error(run16, hero, tmp_path, capsys, extra, message):
    from prep_helpers import png_claiming

    (tmp_path / "text.png").write_text("not a picture\n" * 10)
    (tmp_path / "bomb.png").write_bytes(png_claiming(60000, 60000))
    (tmp_path / "empty.png").write_bytes(b"")
    args = {"--checkpoint": run16, "--target": hero, "--out": str(tmp_path / "out"), "--steps": "2"}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["project", "--no-progress"] + [x for kv in args.items() for x in kv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("styleray project: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_saved_latent_of_another_resolution_is_refused(run16, hero, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["project", "--checkpoint", run16, "--target", hero, "--out", str(out), "--steps", "2",
                     "--distance", "pixel-msssim", "--no-progress"]) == 0
    G32, _ = load_generator(make_checkpoint(str(tmp_path / "run32"), seed=0, cur_nimg=1000, resolution=32, c_dim=0))
    with pytest.raises(ValueError, match=r"does not fit this generator, which takes \[8, 64\].*project the image again"):
        outputs.read_latent((out / "projected_w.npz").read_bytes(), G32.num_ws, G32.w_dim)
    with pytest.raises(ValueError, match="not a projected latent"):
        outputs.read_latent(b"junk", G32.num_ws, G32.w_dim)


def test_generate_morphs_between_projected_images(run16, hero, tmp_path):
    """`styleray generate --latents`: a morph from one real image to another (and on to a seed), and a grid."""
    outs = []
    for i, framing in enumerate(["prepare", "resize"]):
        outs.append(tmp_path / f"p{i}")
        assert cli.main(["project", "--checkpoint", run16, "--target", hero, "--out", str(outs[-1]), "--steps", "3",
                         "--frame", framing, "--distance", "pixel-msssim", "--no-progress"]) == 0
    latents = ",".join(str(o / "projected_w.npz") for o in outs)
    gif = tmp_path / "m.gif"
    assert cli.main(["generate", "--checkpoint", run16, "--latents", latents, "--seeds", "5", "--steps", "3",
                     "--out", str(gif)]) == 0
    im = Image.open(gif)
    assert im.n_frames == 7  # 3 latents, 3 steps between each, plus the last
    G, _ = load_generator(run16)
    w0, _ = outputs.read_latent((outs[0] / "projected_w.npz").read_bytes(), G.num_ws, G.w_dim)
    first = outputs.to_uint8(G.synthesis(w0[None], noise_mode="const")[0])
    assert np.abs(np.asarray(im.convert("RGB")).astype(int) - first.astype(int)).mean() < 8  # GIF palette
    assert cli.main(["generate", "--checkpoint", run16, "--latents", latents, "--out", str(tmp_path / "g.png")]) == 0
    assert read_png(tmp_path / "g.png").shape == (16, 32, 3)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--checkpoint", run16, "--latents", str(tmp_path / "none.npz"), "--out", str(gif)])
