"""``prepare`` without Ray (engine="local": the same per-image code in a loop), the CLI, and failure handling."""

import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
from PIL import Image

from styleray.datasets.prepare import pipeline
from styleray.datasets.prepare import PrepareConfig, prepare_dataset
from styleray.datasets.read.folder import load_image_folder
from styleray.datasets.prepare.sources import Store

RES = 64


def _config(source, out, **kw) -> PrepareConfig:
    base = dict(resolution=RES, min_size=32, engine="local", progress=False, remover="classic")
    return PrepareConfig(source=str(source), out=str(out), **{**base, **kw})


@pytest.mark.parametrize("kw, flag", [
    (dict(resolution=100), "--resolution 100 must be a power of two"),
    (dict(resolution=8), "--resolution 8"),
    (dict(remover="magic"), "--remover"),
    (dict(framing="head"), "--framing"),
    (dict(clusters=-1), "--clusters"),
    (dict(workers=0), "--workers"),
    (dict(min_confidence=1.5), "--min-confidence"),
    (dict(max_frame_touch=-0.1), "--max-frame-touch"),
    (dict(dup_distance=500), "--dup-distance"),
    (dict(out="out.zip"), "OUT out.zip: a zip cannot be an output"),
    (dict(source="ftp://x/y"), "SOURCE ftp://x/y"),
])
def test_config_errors_name_the_flag(kw, flag):
    args = dict(source="raw", out="data")
    args.update(kw)
    with pytest.raises(ValueError, match=flag.replace(".", r"\.")):
        PrepareConfig(**args)


def test_missing_rembg_model_stops_before_any_work(tmp_path, monkeypatch, sample_raw):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "models"))
    out = tmp_path / "data"
    with pytest.raises(FileNotFoundError) as err:
        prepare_dataset(_config(sample_raw / "images", out, remover="rembg", rembg_model="u2net"))
    msg = str(err.value)
    assert "u2net.onnx" in msg and str(tmp_path / "models") in msg and "never downloads" in msg
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_dataset(_config(sample_raw / "images", out, remover="rembg", rembg_model=str(tmp_path / "x.onnx")))
    # auto falls back to classic when the default model is absent
    report = prepare_dataset(_config(sample_raw / "images", out, remover="auto"))
    assert report.remover == "classic" and report.accepted == 16


def test_zip_source_and_duplicates(tmp_path, sample_raw):
    archive = tmp_path / "raw.zip"
    names = sorted(os.listdir(sample_raw / "images"))[:6]
    with zipfile.ZipFile(archive, "w") as zf:
        for n in names:
            zf.write(sample_raw / "images" / n, f"set/{n}")
        zf.write(sample_raw / "images" / names[0], "set/zz-exact-copy.png")  # same bytes
        copy = Image.open(sample_raw / "images" / names[1]).convert("RGB")
        buf = io.BytesIO()
        copy.save(buf, format="JPEG", quality=80)
        zf.writestr("set/zz-recompressed.jpg", buf.getvalue())
        zf.writestr("__MACOSX/._junk.png", b"junk")
    report = prepare_dataset(_config(archive, tmp_path / "data"))
    files = {f["source"]: f for f in report.files}
    assert report.listed == 8 and report.accepted == 6
    assert files["set/zz-exact-copy.png"]["reason"] == "near-duplicate"
    assert files["set/zz-recompressed.jpg"]["reason"] == "near-duplicate"
    assert names[1] in files["set/zz-recompressed.jpg"]["detail"]
    assert len(load_image_folder(str(tmp_path / "data")).files) == 6


def test_thresholds_change_without_reprocessing(tmp_path, sample_raw):
    out = tmp_path / "data"
    prepare_dataset(_config(sample_raw / "images", out))
    strict = prepare_dataset(_config(sample_raw / "images", out, min_cartoon=0.999))
    assert strict.processed == 0 and strict.accepted == 0 and strict.rejections == {"photographic": 16}
    assert not [n for n in os.listdir(out) if n.endswith(".png")]  # nothing unvetted at the root
    back = prepare_dataset(_config(sample_raw / "images", out))
    assert back.processed == 0 and back.accepted == 16
    assert len([n for n in os.listdir(out) if n.endswith(".png")]) == 16


def test_a_failed_write_rejects_one_image_and_a_rerun_heals_it(tmp_path, sample_raw, monkeypatch):
    out = tmp_path / "data"
    real_write = Store.write
    calls = {"n": 0}

    def flaky(self, rel, data):
        if rel.startswith(pipeline.CACHE_DIR) and calls["n"] == 0:
            calls["n"] += 1
            raise OSError("disk full (injected)")
        return real_write(self, rel, data)

    monkeypatch.setattr(Store, "write", flaky)
    report = prepare_dataset(_config(sample_raw / "images", out))
    assert report.rejections == {"error": 1} and report.accepted == 15
    assert "disk full" in next(f["detail"] for f in report.files if f["status"] == "rejected")
    monkeypatch.setattr(Store, "write", real_write)
    healed = prepare_dataset(_config(sample_raw / "images", out))
    assert healed.accepted == 16 and healed.processed == 1 and healed.cached == 15


def test_deleted_output_is_made_again(tmp_path, sample_raw):
    out = tmp_path / "data"
    prepare_dataset(_config(sample_raw / "images", out))
    victim = sorted(n for n in os.listdir(out) if n.endswith(".png"))[0]
    os.unlink(out / victim)
    report = prepare_dataset(_config(sample_raw / "images", out))
    assert report.accepted == 16 and (out / victim).exists()


def test_cli_prepare(tmp_path, sample_raw, capsys):
    from styleray.cli import main

    out = tmp_path / "data"
    rc = main(["prepare", str(sample_raw / "images"), str(out), "--resolution", "32", "--engine", "local",
               "--min-size", "32", "--remover", "classic", "--clusters", "2", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "prepared 16 of 16 images" in text and "cluster-0" in text
    data = load_image_folder(str(out))
    assert data.images.shape[1:] == (32, 32, 3) and data.num_classes == 2
    with pytest.raises(SystemExit) as exc:
        main(["prepare", str(sample_raw / "images"), str(out), "--resolution", "48"])
    assert exc.value.code == 2
    assert "--resolution 48 must be a power of two" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_leaves_no_half_images_and_resumes(tmp_path):
    from styleray.datasets.synthetic import make_sample_dataset

    raw = make_sample_dataset(tmp_path / "raw", 48, size=256, seed=9, backgrounds=("solid",), masks=False)
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "styleray.cli", "prepare", str(raw / "images"), str(out), "--engine", "local",
           "--resolution", "256", "--min-size", "32", "--remover", "classic", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / ".prepare" / "records"
    deadline = time.time() + 120
    while time.time() < deadline and (not records.exists() or len(os.listdir(records)) < 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "dataset.json").exists()
    for folder in (out, out / ".prepare" / "cache"):
        for name in os.listdir(folder):
            if name.endswith(".png"):
                with Image.open(folder / name) as im:
                    im.load()  # every visible image is whole
    report = prepare_dataset(_config(raw / "images", out, resolution=256))
    assert report.cached >= 8 and report.processed + report.cached == 48 and report.accepted == 48
    assert not [n for n in os.listdir(out / ".prepare" / "cache") if ".tmp-" in n]
    shutil.rmtree(out / ".prepare" / "cache", ignore_errors=True)


def test_auto_batch_size_amortises_tiny_images_and_spreads_big_ones():
    from styleray.datasets.prepare.run import auto_batch_size

    assert auto_batch_size([10_000] * 5000, 2, "classic") == 64  # tiny files: the cap
    assert auto_batch_size([400_000] * 5000, 2, "classic") == 2  # ~1 MiB per task
    assert auto_batch_size([10_000] * 40, 2, "classic") == 5  # every worker gets 4 batches
    assert auto_batch_size([10_000] * 3, 8, "classic") == 1
    assert auto_batch_size([10_000] * 5000, 2, "rembg") == 16  # the model dominates: a smaller cap
    assert auto_batch_size([10_000] * 40, 2, "rembg") == 5  # and every worker still gets 4 batches
