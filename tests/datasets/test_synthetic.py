import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from styleray.datasets.synthetic import (
    BACKGROUNDS,
    BG_COLORS,
    FRAMINGS,
    SyntheticSpec,
    _render,
    make_clean_training_set,
    make_sample_dataset,
    make_spec,
    render_figure,
)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grows a boolean mask by one pixel in all 8 directions."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def _open(path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
    return image


def test_render_is_deterministic_and_varies_with_index_and_seed():
    image, mask, meta = render_figure(3, size=64, seed=7)
    again, mask_again, meta_again = render_figure(3, size=64, seed=7)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert mask.dtype == bool and mask.shape == (64, 64)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(again))
    np.testing.assert_array_equal(mask, mask_again)
    assert meta == meta_again
    assert json.loads(json.dumps(meta)) == meta  # plain JSON types only
    assert not np.array_equal(np.asarray(image), np.asarray(render_figure(4, size=64, seed=7)[0]))
    assert not np.array_equal(np.asarray(image), np.asarray(render_figure(3, size=64, seed=8)[0]))
    assert make_spec(3, 7) == make_spec(3, 7) and isinstance(make_spec(3, 7), SyntheticSpec)


def test_metadata_names_palette_pose_and_choices():
    _, _, meta = render_figure(5, size=48, seed=1, background="stripes", framing="full-body")
    assert meta["background"] == "stripes" and meta["framing"] == "full-body"
    assert meta["index"] == 5 and meta["seed"] == 1
    assert {"skin", "suit", "accent", "cape", "mask", "emblem"} <= set(meta["palette"])
    assert isinstance(meta["pose"], str)


def test_mask_is_exact_coverage_of_the_figure():
    """Render one figure on two very different solid backgrounds: pixels that agree are fully covered by the
    figure (so inside the mask), pixels that show the pure background are outside it."""
    spec = make_spec(6, 0, background="solid", framing="full-body")
    img_a, mask_a = _render(dataclasses.replace(spec, bg_colors=("paper", "sky")), 64, 64)
    img_b, mask_b = _render(dataclasses.replace(spec, bg_colors=("slate", "sky")), 64, 64)
    np.testing.assert_array_equal(mask_a, mask_b)
    full = (img_a == img_b).all(axis=-1)
    assert mask_a[full].all()
    empty = (img_a == BG_COLORS["paper"]).all(axis=-1) & (img_b == BG_COLORS["slate"]).all(axis=-1)
    assert not mask_a[empty].any()
    assert (full | empty | _dilate(mask_a) & _dilate(~mask_a)).all()  # the rest is a one-pixel edge


@pytest.mark.parametrize("framing", FRAMINGS)
def test_compositing_on_white_keeps_the_figure_and_solid_border_is_background(framing):
    for index in range(4):
        image, mask, meta = render_figure(index, size=64, background="solid", framing=framing)
        pixels = np.asarray(image)
        on_white = np.where(mask[..., None], pixels, 255).astype(np.uint8)
        np.testing.assert_array_equal(on_white[mask], pixels[mask])
        assert (on_white[~mask] == 255).all()
        bg = np.asarray(meta["background_colors"][0], dtype=np.uint8)
        assert (pixels[~_dilate(mask)] == bg).all()  # away from the edge: the exact background colour
        rows = [pixels[0], pixels[:, 0], pixels[:, -1]] + ([pixels[-1]] if framing == "full-body" else [])
        for row in rows:
            assert (row == bg).all()


def test_every_background_and_framing_occurs_and_manifest_matches_files(tmp_path):
    out = make_sample_dataset(tmp_path / "raw", n=16, size=48, seed=3, jpeg_fraction=0.5)
    assert out == tmp_path / "raw"
    records = json.loads((out / "manifest.json").read_text())
    assert len(records) == 16
    assert {r["background"] for r in records} == set(BACKGROUNDS)
    assert {r["framing"] for r in records} == set(FRAMINGS)
    assert {r["format"] for r in records} == {"png", "jpeg"}
    assert len({(r["width"], r["height"]) for r in records}) > 1  # not every canvas is square
    for r in records:
        image = _open(out / r["file"])
        assert image.format == ("JPEG" if r["file"].endswith(".jpg") else "PNG") == r["format"].upper()
        assert image.mode == "RGB" and image.size == (r["width"], r["height"]) and max(image.size) == 48
        mask = _open(out / r["mask"])
        assert mask.mode == "L" and mask.size == image.size
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        assert abs((values == 255).mean() - r["mask_fraction"]) < 1e-5
        if r["format"] == "png" and r["width"] == r["height"]:  # the file is exactly render_figure's image
            expected, expected_mask, _ = render_figure(r["index"], size=48, seed=3)
            np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
            np.testing.assert_array_equal(values == 255, expected_mask)
    assert not list(out.rglob(".*tmp*"))  # atomic writes leave no temporary files


def test_sample_dataset_is_byte_identical_and_masks_optional(tmp_path):
    a = make_sample_dataset(tmp_path / "a", n=6, size=32, seed=1)
    b = make_sample_dataset(tmp_path / "b", n=6, size=32, seed=1)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    make_sample_dataset(a, n=6, size=32, seed=1)  # overwriting works and gives the same bytes
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    c = make_sample_dataset(tmp_path / "c", n=3, size=32, masks=False, backgrounds=("gradient",),
                            framings=("full-body",))
    records = json.loads((c / "manifest.json").read_text())
    assert not (c / "masks").exists() and all(r["mask"] is None for r in records)
    assert {(r["background"], r["framing"]) for r in records} == {("gradient", "full-body")}


def test_clean_training_set_is_square_white_and_labelled(tmp_path):
    out = make_clean_training_set(tmp_path / "clean", n=6, resolution=32, seed=2)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == list(FRAMINGS)
    assert len(meta["labels"]) == 6
    assert {label for _, label in meta["labels"]} == {0, 1}
    for name, label in meta["labels"]:
        assert isinstance(label, int) and 0 <= label < len(FRAMINGS)
        image = _open(out / name)
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
        pixels = np.asarray(image)
        assert tuple(pixels[0, 0]) == (255, 255, 255)
        assert (pixels != 255).any(axis=-1).mean() > 0.1  # a figure is there
    assert sorted(p.name for p in out.glob("*.png")) == sorted(name for name, _ in meta["labels"])


def test_figure_covers_a_sane_fraction_and_keeps_off_the_border():
    aspects = (1.0, 4 / 3, 3 / 4)
    for index in range(50):
        _, mask, meta = render_figure(index, size=48, seed=11, aspect=aspects[index % 3])
        assert 0.12 <= mask.mean() <= 0.6, (index, mask.mean())
        assert not (mask[0].any() or mask[:, 0].any() or mask[:, -1].any()), index
        if meta["framing"] == "full-body":
            assert not mask[-1].any(), index
        else:  # cut at the waist: the bottom edge crosses the figure, but at most about half of it
            assert 0 < mask[-1].mean() <= 0.55, (index, mask[-1].mean())


@pytest.mark.parametrize(
    "call",
    [
        lambda: render_figure(0, background="plaid"),
        lambda: render_figure(0, framing="head-shot"),
        lambda: render_figure(-1),
        lambda: render_figure(0, size=8),
        lambda: make_sample_dataset("/nonexistent-never-written", n=0),
        lambda: make_sample_dataset("/nonexistent-never-written", jpeg_fraction=2.0),
        lambda: make_clean_training_set("/nonexistent-never-written", resolution=4),
    ],
)
def test_bad_arguments_raise_clear_errors(call):
    with pytest.raises(ValueError):
        call()
