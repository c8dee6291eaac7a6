"""``s3://`` in and out against a moto S3 server on 127.0.0.1, through the Ray Data pipeline."""

import io
import json
import os

import pytest
from PIL import Image

from styleray.datasets.prepare import PrepareConfig, prepare_dataset
from styleray.storage import s3_filesystem


@pytest.fixture(scope="module")
def ray_with_s3(moto_s3):
    """Ray started after the AWS_* variables point at moto, so that its workers inherit them."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield moto_s3
    ray.shutdown()


def _config(source, out, **kw) -> PrepareConfig:
    return PrepareConfig(source=source, out=out, resolution=64, min_size=32, workers=2, progress=False,
                         remover="classic", **kw)


def test_s3_in_and_out(ray_with_s3, sample_raw):
    fs = s3_filesystem()
    fs.mkdir("raw")
    fs.mkdir("prepared")
    names = sorted(os.listdir(sample_raw / "images"))[:6]
    for n in names:
        fs.put_file(str(sample_raw / "images" / n), f"raw/in/sub/{n}")
    fs.pipe_file("raw/in/broken.png", b"not a png")

    report = prepare_dataset(_config("s3://raw/in", "s3://prepared/out"))
    assert report.listed == 7 and report.accepted == 6 and report.rejections == {"unreadable": 1}
    fs.invalidate_cache()
    root = [p for p in fs.ls("prepared/out") if p.endswith(".png")]
    assert len(root) == 6
    for p in root:
        with Image.open(io.BytesIO(fs.cat_file(p))) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
    dataset = json.loads(fs.cat_file("prepared/out/dataset.json"))
    assert sorted(f for f, _ in dataset["labels"]) == sorted(p.rsplit("/", 1)[1] for p in root)
    assert json.loads(fs.cat_file("prepared/out/report.json"))["accepted"] == 6
    assert fs.exists("prepared/out/.prepare/contact_sheet.png")

    again = prepare_dataset(_config("s3://raw/in", "s3://prepared/out"))
    assert again.cached == 7 and again.processed == 0 and again.accepted == 6

    with pytest.raises(ValueError, match="bucket 'nowhere' does not exist"):
        prepare_dataset(_config("s3://raw/in", "s3://nowhere/out"))
