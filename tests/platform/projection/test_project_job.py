"""A folder and a bucket of targets as a Ray job on a real local cluster: one projection per actor, a bad image is
its own failed row, finished targets are skipped on a re-run, and the summary table lists them all."""

from __future__ import annotations

import json
import os

import pytest
from prep_helpers import png_claiming
from serve_helpers import make_checkpoint, start_moto

from styleray import cli, storage
from styleray.datasets.synthetic import render_figure
from styleray.platform.projection.job import run_folder, target_folder
from styleray.platform.projection.options import ProjectOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _targets(folder) -> None:
    os.makedirs(os.path.join(folder, "more"), exist_ok=True)
    for i, name in enumerate(["a.png", "b.jpg", "more/c.png"]):
        render_figure(i, size=48, seed=2, background="solid")[0].save(os.path.join(folder, name))
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(png_claiming(60000, 60000))  # a decompression bomb


@pytest.fixture(scope="module")
def s3_and_ray(tmp_path_factory):
    """moto's S3 server and a private 2-CPU Ray cluster started after the AWS variables are set, so that the
    actors find the endpoint and the test credentials in their environment (as on a real cluster)."""
    import ray

    endpoint, proc = start_moto(str(tmp_path_factory.mktemp("moto") / "moto.log"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(k, v)
        ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield endpoint
        finally:
            ray.shutdown()
            proc.terminate()
            proc.wait(timeout=10)


def test_target_folder_names_are_stable_and_distinct():
    assert target_folder("hero.png") == "hero_png" and target_folder("hero.jpg") == "hero_jpg"
    assert target_folder("more/c.v2.png") == "more/c.v2_png"


def test_folder_job_projects_each_target_once_and_resumes(s3_and_ray, tmp_path, capsys):
    run = make_checkpoint(str(tmp_path / "run"), seed=0, cur_nimg=1000, resolution=16, c_dim=0)
    _targets(tmp_path / "targets")
    out = tmp_path / "proj"
    argv = ["project", "--checkpoint", run, "--target", str(tmp_path / "targets"), "--out", str(out), "--steps", "6",
            "--distance", "pixel-msssim", "--workers", "2", "--no-progress"]
    assert cli.main(argv) == 1  # one target failed
    printed = capsys.readouterr().out
    assert "3 projected, 0 done before, 1 failed" in printed and "| more/c.png" in printed
    for name in ("a_png", "b_jpg", "more/c_png"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["steps"] == 6 and summary["psnr"] > 0 and (out / name / "progress.gif").exists()
    assert not (out / "broken_png" / "summary.json").exists()
    table = (out / "summary.md").read_text()
    assert "too-large" in table and table.count("\n") == 2 + 4
    mtime = (out / "a_png" / "summary.json").stat().st_mtime_ns

    result = run_folder(ProjectOptions(checkpoint=run, target=str(tmp_path / "targets"), out=str(out), steps=6,
                                       distance="pixel-msssim", progress=False))
    assert result["counts"] == {"projected": 0, "done before": 3, "failed": 1}  # only the bad one is tried again
    assert (out / "a_png" / "summary.json").stat().st_mtime_ns == mtime


def test_bucket_job(s3_and_ray, tmp_path):
    """Targets, the checkpoint and the outputs on S3 (moto's server)."""
    fs, _ = storage.filesystem("s3://proj")
    fs.mkdir("proj")
    _targets(tmp_path / "targets")
    os.remove(tmp_path / "targets" / "broken.png")
    fs.put(str(tmp_path / "targets"), "proj/targets", recursive=True)
    run = make_checkpoint("s3://proj/run", seed=0, cur_nimg=1000, resolution=16, c_dim=0)
    result = run_folder(ProjectOptions(checkpoint=run, target="s3://proj/targets", out="s3://proj/out", steps=4,
                                       distance="pixel-msssim", progress=False))
    assert result["counts"]["projected"] == 3, result["table"]
    assert storage.exists("s3://proj/out/more/c_png/projected_w.npz")
    assert "b.jpg" in storage.read_bytes("s3://proj/out/summary.md").decode()
