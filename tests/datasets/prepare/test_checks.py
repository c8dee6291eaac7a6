import io

import numpy as np
import pytest
from PIL import Image

from styleray.datasets.prepare import checks
from styleray.datasets.prepare.clustering import image_features, kmeans
from styleray.datasets.prepare.square import clean_alpha, square_on_white
from styleray.datasets.synthetic import render_figure


def test_framing_rule_matches_the_synthetic_truth():
    for i in range(16):
        for aspect in (1.0, 4 / 3, 3 / 4):
            _, mask, meta = render_figure(i, size=96, seed=2, aspect=aspect)
            assert checks.classify_framing(mask) == meta["framing"], (i, aspect)


def test_frame_touch_and_foreground():
    mask = np.zeros((50, 50), bool)
    mask[10:40, 10:40] = True
    assert checks.frame_touch(mask) == 0 and checks.foreground_fraction(mask) == pytest.approx(0.36)
    mask[:, :] = True
    assert checks.frame_touch(mask) == 1.0


def test_cartoon_score_separates_flat_fills_from_photographic_texture():
    image, mask, _ = render_figure(0, size=128, background="solid")
    cartoon = checks.cartoon_score(np.asarray(image), mask)
    rng = np.random.default_rng(0)
    field = Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).resize((128, 128), Image.BICUBIC)
    photo = np.clip(np.asarray(field, float) + rng.normal(0, 8, (128, 128, 3)), 0, 255).astype(np.uint8)
    assert cartoon > 0.6
    assert checks.cartoon_score(photo, np.ones((128, 128), bool)) < 0.1


def test_phash_finds_recompressed_copies_but_not_other_figures():
    images = [render_figure(i, size=128, seed=4, background=("solid", "gradient")[i % 2])[0] for i in range(16)]
    hashes = [checks.phash(np.asarray(im)) for im in images]
    buf = io.BytesIO()
    images[11].resize((109, 109)).save(buf, format="JPEG", quality=75)  # a copy: smaller and re-encoded
    hashes.append(checks.phash(np.asarray(Image.open(buf).convert("RGB"))))
    originals = checks.near_duplicates(hashes, 20)
    assert originals[:16] == [None] * 16
    assert originals[16] == 11
    assert checks.hamming(hashes[16], hashes[11]) <= 20
    assert checks.near_duplicates(hashes, -1) == [None] * 17


def test_square_output_is_exact_white_cornered_and_flush_when_cut():
    image, mask, meta = render_figure(0, size=96, aspect=3 / 4, background="solid", framing="upper-body")
    rgb = np.asarray(image)
    out, alpha = square_on_white(rgb, clean_alpha(mask.astype(np.float32), mask), mask, 64, 0.05)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and alpha.shape == (64, 64)
    for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert (out[y, x] == 255).all(), (y, x)
    # cut at the waist: the figure stays on the bottom edge
    assert (alpha[-1] > 0.5).any() and not (alpha[0] > 0.5).any()
    with pytest.raises(ValueError):
        square_on_white(rgb, mask.astype(np.float32), np.zeros_like(mask), 64, 0.05)


def test_kmeans_is_deterministic_and_separates_obvious_groups():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.05, (30, 4)), rng.normal(3, 0.05, (20, 4)), rng.normal(-3, 0.05, (10, 4))])
    labels = kmeans(x.astype(np.float32), 3, seed=1)
    assert labels.tolist() == kmeans(x.astype(np.float32), 3, seed=1).tolist()
    assert labels[:30].tolist() == [0] * 30 and labels[30:50].tolist() == [1] * 20 and labels[50:].tolist() == [2] * 10
    with pytest.raises(ValueError, match="--clusters"):
        kmeans(x, 0)


def test_features_have_fixed_length():
    image, mask, _ = render_figure(1, size=64, background="solid")
    f = image_features(np.asarray(image), mask.astype(np.float32))
    assert f.shape == (128,) and np.isfinite(f).all()
    assert np.linalg.norm(f) == pytest.approx(1.0, abs=1e-4)
