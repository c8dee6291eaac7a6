"""The in-memory reader of a prepared folder (`train --no-ray`, metrics): what it reads, what it refuses, and
the batch sampler's epochs, flips and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from styleray.datasets.read.folder import BatchSampler, list_image_files, load_image_folder, read_labels


def _folder(root, n=6, size=8, labels=True):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full([size, size, 3], i * 10, np.uint8)).save(root / f"{i:03d}.png")
    if labels:
        (root / "dataset.json").write_text(json.dumps({"labels": [[f"{i:03d}.png", i % 2] for i in range(n)],
                                                       "classes": ["upper-body", "full-body"]}))
    return root


def test_it_reads_the_images_and_labels_and_skips_hidden_files(tmp_path):
    root = _folder(tmp_path / "d")
    (root / ".styleray-stats").mkdir()
    (root / ".styleray-stats" / "x.png").write_bytes(b"not listed")
    (root / ".tmp-123").write_bytes(b"being written")
    (root / "notes.txt").write_text("not an image")
    assert list_image_files(str(root)) == [f"{i:03d}.png" for i in range(6)]
    data = load_image_folder(str(root))
    assert data.images.shape == (6, 8, 8, 3) and data.resolution == 8 and data.channels == 3
    assert data.labels.tolist() == [0, 1, 0, 1, 0, 1] and data.num_classes == 2
    assert data.one_hot(np.array([1, 2])).tolist() == [[0, 1], [1, 0]]
    assert read_labels(str(root))[1] == ["upper-body", "full-body"]
    assert load_image_folder(str(root), use_labels=False).labels is None


@pytest.mark.parametrize("make, message", [
    (lambda r: None, "does not exist or is not a folder"),
    (lambda r: r.mkdir(), "holds no images"),
    (lambda r: _folder(r, labels=False) and Image.new("RGB", (8, 6)).save(r / "wide.png"), "not square"),
    (lambda r: _folder(r) and (r / "dataset.json").write_text("{oops"), "dataset.json is not valid JSON"),
])
def test_bad_folders_name_the_problem(tmp_path, make, message):
    root = tmp_path / "d"
    make(root)
    with pytest.raises(ValueError, match=message):
        load_image_folder(str(root))


def test_a_resolution_other_than_the_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="000.png is 8px but --resolution is 16; prepare the data at 16 or pass --resolution 8"):
        load_image_folder(str(_folder(tmp_path / "d")), resolution=16)


def test_the_sampler_covers_each_epoch_flips_and_resumes_exactly(tmp_path):
    data = load_image_folder(str(_folder(tmp_path / "d", n=6)))
    sampler = BatchSampler(data, 3, seed=1)
    epoch = np.concatenate([sampler.next()[0][:, 0, 0, 0] for _ in range(2)])
    assert sorted(epoch.tolist()) == [0, 10, 20, 30, 40, 50]  # every image once per epoch
    flipping = BatchSampler(data, 4, seed=2, mirror=True)
    for _ in range(3):
        imgs, labels = flipping.next()
        assert labels.shape == (4, 2)
        for img in imgs:  # each is an image of the set, flipped or not
            assert any(np.array_equal(img, ref) or np.array_equal(img, ref[:, ::-1]) for ref in data.images)
    state = json.loads(json.dumps(flipping.state_dict()))  # what a checkpoint stores
    ahead = [flipping.next()[0] for _ in range(4)]
    again = BatchSampler(data, 4, seed=99, mirror=True)
    again.load_state_dict(state)
    for expected in ahead:
        np.testing.assert_array_equal(again.next()[0], expected)
