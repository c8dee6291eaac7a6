"""``prepare_dataset`` on Ray Data (a private 2-CPU Ray for the module)."""

import json
import os

import numpy as np
from PIL import Image

from styleray.datasets.prepare import PrepareConfig, prepare_dataset
from styleray.datasets.read.folder import load_image_folder

RES = 64


def _config(source, out, **kw) -> PrepareConfig:
    base = dict(resolution=RES, min_size=32, workers=2, progress=False, remover="classic")
    return PrepareConfig(source=str(source), out=str(out), **{**base, **kw})


def _by_source(report) -> dict:
    return {f["source"]: f for f in report.files}


def _check_outputs(out) -> list[str]:
    names = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    for name in names:
        with Image.open(out / name) as im:
            assert im.mode == "RGB" and im.size == (RES, RES), name
            a = np.asarray(im)
        for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert (a[y, x] >= 250).all(), (name, y, x, a[y, x])
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    return names


def test_synthetic_end_to_end(ray_local, sample_raw, tmp_path):
    out = tmp_path / "data"
    report = prepare_dataset(_config(sample_raw / "images", out))
    manifest = {r["file"].split("/", 1)[1]: r for r in json.loads((sample_raw / "manifest.json").read_text())}
    assert report.engine == "ray" and report.remover == "classic"
    assert report.listed == 16 and report.accepted == 16, report.rejections
    names = _check_outputs(out)
    assert len(names) == 16
    # the labels the trainer reads are the framings of the figures
    data = load_image_folder(str(out))
    assert data.images.shape == (16, RES, RES, 3) and data.class_names == ["upper-body", "full-body"]
    files = _by_source(report)
    for name, label in json.loads((out / "dataset.json").read_text())["labels"]:
        src = next(s for s, f in files.items() if f.get("file") == name)
        assert ["upper-body", "full-body"][label] == manifest[src]["framing"] == files[src]["framing"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["accepted"] == 16 and saved["timings"]["pipeline_s"] > 0
    with Image.open(out / ".prepare" / "contact_sheet.png") as sheet:
        assert sheet.width > 400


def test_awkward_files_every_good_one_out_every_bad_one_reported(ray_local, awkward_folder, tmp_path):
    src, expected = awkward_folder
    out = tmp_path / "data"
    report = prepare_dataset(_config(src, out))
    files = _by_source(report)
    assert set(files) == set(expected)
    assert report.ignored == 1  # notes.txt
    for name, reason in expected.items():
        if reason is None:
            assert files[name]["status"] == "accepted", files[name]
        else:
            assert files[name]["status"] == "rejected" and files[name]["reason"] == reason, files[name]
            assert files[name]["detail"]
    assert files["good/rgba.png"]["mask_source"] == "alpha"
    assert report.rejections == {"too-large": 1, "too-small": 1, "unreadable": 3}
    assert len(_check_outputs(out)) == sum(r is None for r in expected.values())
    load_image_folder(str(out))  # the trainer can read it


def test_rerun_skips_done_work_and_relabels_without_recomputing(ray_local, sample_raw, tmp_path):
    out = tmp_path / "data"
    first = prepare_dataset(_config(sample_raw / "images", out))
    stamps = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.endswith(".png")}
    again = prepare_dataset(_config(sample_raw / "images", out))
    assert again.cached == again.listed == first.listed and again.processed == 0
    assert {n: os.stat(out / n).st_mtime_ns for n in stamps} == stamps

    upper = prepare_dataset(_config(sample_raw / "images", out, framing="upper-body"))
    assert upper.processed == 0 and upper.filtered == upper.framing["full-body"] > 0
    data = load_image_folder(str(out))
    assert len(data.files) == upper.accepted == upper.framing["upper-body"]
    assert set(data.labels.tolist()) == {0}

    clustered = prepare_dataset(_config(sample_raw / "images", out, clusters=3))
    assert clustered.processed == 0 and clustered.classes == ["cluster-0", "cluster-1", "cluster-2"]
    data = load_image_folder(str(out))
    assert len(data.files) == 16 and data.num_classes == 3 and sorted(set(data.labels.tolist())) == [0, 1, 2]
    assert sorted(clustered.class_counts, reverse=True) == clustered.class_counts


def test_rembg_custom_onnx_model_runs_in_the_actor_pool(ray_local, sample_raw, tiny_onnx, tmp_path):
    out = tmp_path / "data"
    report = prepare_dataset(_config(sample_raw / "images", out, remover="rembg", rembg_model=str(tiny_onnx)))
    assert report.remover == "rembg:custom:tiny-seg.onnx"
    processed = [f for f in report.files if f.get("mask_source")]
    assert len(processed) == 16 and {f["mask_source"] for f in processed} == {"rembg"}
    assert report.accepted >= 4, report.rejections  # a fixed-weight toy net: solid backgrounds come out
    _check_outputs(out)


def test_one_task_per_block_of_at_most_batch_size(ray_local, sample_raw, tmp_path):
    """16 images in batches of 3: 6 tasks, none larger than 3 (Ray Data must not bundle two blocks per task)."""
    from styleray.datasets.prepare.pipeline import Job, build_dataset
    from styleray.datasets.prepare.sources import Store, list_sources

    cfg = _config(sample_raw / "images", tmp_path / "data")
    Store(cfg.out_location).ensure()
    job = Job(source=cfg.source_location, out=cfg.out_location, resolution=RES, margin=cfg.margin,
              min_size=cfg.min_size, max_pixels=cfg.max_pixels, work_size=1024, remover="classic", rembg_model=None)
    sources = [rel for rel, _ in list_sources(cfg.source_location).files]
    ds = build_dataset(job, sources, workers=2, batch_size=3)
    blocks = [len(b["record"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    assert sum(blocks) == 16 and len(blocks) == 6 and max(blocks) <= 3, blocks
