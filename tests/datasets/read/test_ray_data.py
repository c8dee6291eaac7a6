"""The Ray Data side of training ingest: PNG folder or Parquet, cached or streaming, the same rows and labels;
endless shard batches with x-flips and one-hot labels; bad datasets named by --data."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from styleray.datasets.read import ray_data

pytestmark = pytest.mark.slow


def _rows(ds) -> list[tuple[str, int]]:
    """(image digest, label) of every row, sorted: order-free comparison of two datasets."""
    out = []
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        for img, label in zip(batch["image"], batch["label"]):
            assert img.dtype == np.uint8 and img.shape == (16, 16, 3)
            out.append((hashlib.sha256(img.tobytes()).hexdigest(), int(label)))
    return sorted(out)


@pytest.fixture(scope="module")
def parquet_sets(tiny_data, tmp_path_factory):
    """The tiny dataset twice as Parquet: PNG bytes + `label`, and uint8 tensors + `file` (labels from
    dataset.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = json.loads(open(os.path.join(tiny_data, "dataset.json")).read())
    files, labels = zip(*meta["labels"])
    raw = [open(os.path.join(tiny_data, f), "rb").read() for f in files]
    root = tmp_path_factory.mktemp("parquet")
    (root / "bytes").mkdir()
    for part in range(2):  # two files, to exercise a folder of them
        sl = slice(part * 32, (part + 1) * 32)
        pq.write_table(pa.table({"image": raw[sl], "label": list(labels[sl])}), root / "bytes" / f"part{part}.parquet")
    (root / "tensors").mkdir()
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).reshape(-1).tolist() for b in raw]
    table = pa.table({"image": pa.array(arrays, pa.list_(pa.uint8())), "file": list(files)})
    pq.write_table(table, root / "tensors" / "all.parquet")
    (root / "tensors" / "dataset.json").write_text(json.dumps(meta))
    return str(root / "bytes"), str(root / "tensors")


def test_png_and_parquet_cached_and_streaming_give_the_same_rows(ray_local, tiny_data, parquet_sets):
    png = ray_data.inspect_dataset(tiny_data)
    assert (png.kind, png.num_images, png.resolution, png.num_classes) == ("images", 64, 16, 2)
    expected = _rows(ray_data.build_dataset(png, use_labels=True, cache=True))
    assert len(expected) == 64 and {label for _, label in expected} == {0, 1}
    assert _rows(ray_data.build_dataset(png, use_labels=True, cache=False, read_cpus=0.5)) == expected

    by_bytes = ray_data.inspect_dataset(parquet_sets[0])
    assert (by_bytes.kind, by_bytes.num_images, by_bytes.num_classes) == ("parquet", 64, 2)
    assert _rows(ray_data.build_dataset(by_bytes, use_labels=True, cache=True)) == expected
    assert _rows(ray_data.build_dataset(by_bytes, use_labels=True, cache=False, read_cpus=0.5)) == expected

    by_file = ray_data.inspect_dataset(parquet_sets[1])  # labels matched through the `file` column
    assert (by_file.kind, by_file.num_images, by_file.resolution, by_file.num_classes) == ("parquet", 64, 16, 2)
    assert _rows(ray_data.build_dataset(by_file, use_labels=True, cache=True)) == expected
    assert _rows(ray_data.build_dataset(by_file, use_labels=True, cache=False, read_cpus=0.5)) == expected


def test_shard_batches_are_endless_flipped_and_one_hot(ray_local, tiny_data):
    info = ray_data.inspect_dataset(tiny_data)
    ds = ray_data.build_dataset(info, use_labels=True, cache=True)
    plain = ray_data.ShardBatches(ds.iterator(), 8, num_classes=2, seed=1)
    seen = [plain.next() for _ in range(20)]  # 160 rows: 2.5 epochs of 64
    assert plain.epoch == 2
    imgs, labels = seen[0]
    assert imgs.shape == (8, 16, 16, 3) and imgs.dtype == np.uint8
    assert labels.shape == (8, 2) and labels.dtype == np.float32 and (labels.sum(axis=1) == 1).all()

    originals = {hashlib.sha256(i.tobytes()).hexdigest() for b, _ in seen for i in b}
    mirrored = ray_data.ShardBatches(ds.iterator(), 8, mirror=True, seed=1)
    flips = kept = 0
    for _ in range(16):
        batch, none = mirrored.next()
        assert none is None  # unconditional: no labels
        for img in batch:
            if hashlib.sha256(img.tobytes()).hexdigest() in originals:
                kept += 1
            else:
                assert hashlib.sha256(img[:, ::-1].tobytes()).hexdigest() in originals
                flips += 1
    assert flips > 20 and kept > 20


def test_bad_datasets_name_the_flag(tmp_path, tiny_data):
    Image.new("RGB", (16, 12), "white").save(tmp_path / "wide.png")
    with pytest.raises(ValueError, match="not square"):
        ray_data.inspect_dataset(str(tmp_path))
    (tmp_path / "wide.png").unlink()
    with pytest.raises(ValueError, match=r"--data .* holds no images"):
        ray_data.inspect_dataset(str(tmp_path))
    Image.new("RGB", (16, 16), "white").save(tmp_path / "a.png")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["b.png", 0]]}))
    with pytest.raises(ValueError, match="dataset.json has no label for a.png"):
        ray_data.inspect_dataset(str(tmp_path))
    info = ray_data.inspect_dataset(tiny_data)
    unlabelled = info.__class__(**{**info.__dict__, "labels": None, "class_names": None})
    with pytest.raises(ValueError, match="--cond"):
        ray_data.build_dataset(unlabelled, use_labels=True)
