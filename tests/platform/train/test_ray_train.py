"""Ray Train on a private 2-CPU local cluster: two gloo workers in sync, a worker's death, bad input.
Issue tests 1 and 2 live here; node loss (3), S3 with a corrupt newest checkpoint (4 and 5) and job
submission (6) have their own modules."""

from __future__ import annotations

import json
import os
import time

import pytest

from styleray.cli import main
from styleray.platform import checkpoint as ckpt_lib
from styleray.platform.train import ray_train

pytestmark = pytest.mark.slow

REPORTED = ("kimg", "sec_per_kimg", "img_per_sec", "loss_G", "loss_D", "r1_penalty", "pl_penalty", "augment_p",
            "r_t", "memory_mb")


def test_two_gloo_workers_train_report_and_stay_in_sync(ray_local, tiny_data, tiny_run, tmp_path, helpers):
    """Issue test 1: two workers, 3 ticks of 32 images (4 steps of 2 x 4), a checkpoint every tick."""
    run = tiny_run(tiny_data, tmp_path / "run", workers=2, kimg=0.096, snap=1)
    summary = ray_train.fit(run, resume=None)
    assert summary["status"] == "finished" and summary["kimg"] == pytest.approx(0.096)
    assert summary["checkpoint"] == os.path.join(run.out, "checkpoints", "ckpt-000000000096")
    records = helpers.metrics(run.out)
    assert [r["tick"] for r in records] == [1, 2, 3]
    assert [r["kimg"] for r in records] == pytest.approx([0.032, 0.064, 0.096])
    for key in REPORTED:
        assert any(key in r and r[key] == r[key] for r in records), key  # present and not NaN somewhere
    # DDP consistency: after every snapshot both ranks hold bit-identical G, D and G_ema weights
    for name in ("ckpt-000000000032", "ckpt-000000000064", "ckpt-000000000096"):
        ck = ckpt_lib.load_checkpoint(os.path.join(run.out, "checkpoints", name))
        assert len(ck.meta["replicas"]) == 2 and len(set(ck.meta["replicas"])) == 1
        assert ck.meta["stable"] is True
        assert os.path.getsize(os.path.join(ck.uri, "grid.png")) > 100
    assert len(ck.state["rng"]) == 2 and ck.state["counters"]["cur_nimg"] == 96
    assert sorted(os.listdir(os.path.join(run.out, "grids"))) == [f"ckpt-0000000000{n}.png" for n in (32, 64, 96)]
    # Ray Train registered the checkpoints in place (no copy) in the run folder it manages
    snapshot = json.loads(open(os.path.join(run.out, "checkpoint_manager_snapshot.json")).read())
    assert "ckpt-000000000096" in json.dumps(snapshot)
    assert sorted(n for n in os.listdir(run.out) if n.startswith("checkpoint_")) == ["checkpoint_manager_snapshot.json"]
    assert json.loads(open(os.path.join(run.out, "best.json")).read())["checkpoint"] == "ckpt-000000000096"


def test_worker_death_resumes_from_the_last_checkpoint(ray_local, tiny_data, tiny_run, tmp_path, helpers):
    """Issue test 2: rank 1 exits (os._exit) once after tick 3; checkpoints every 2 ticks."""
    out, marker = tmp_path / "run", tmp_path / "died"
    run = tiny_run(tiny_data, out, workers=2, kimg=0.128, snap=2)
    summary = ray_train.fit(
        run, resume=None, options=ray_train.RayOptions(max_failures=2),
        inject_failure={"rank": 1, "after_kimg": 0.096, "marker": str(marker)},
    )
    assert marker.exists()
    assert summary["resumed_kimg"] == pytest.approx(0.064)  # lost: one tick, less than one snapshot interval
    assert summary["kimg"] == pytest.approx(0.128)  # exactly the requested kimg: nothing counted twice
    ticks = [(r["tick"], r["resumed_kimg"]) for r in helpers.metrics(out)]
    assert ticks == [(1, 0.0), (2, 0.0), (3, 0.0), (3, 0.064), (4, 0.064)]
    final = ckpt_lib.load_checkpoint(str(out / "checkpoints" / "ckpt-000000000128"))
    assert final.state["counters"]["cur_nimg"] == 128 and len(set(final.meta["replicas"])) == 1


@pytest.mark.parametrize(
    "case, flags, message",
    [
        ("missing data", ["--data", "{tmp}/nope"], "--data {tmp}/nope does not exist"),
        ("empty data", ["--data", "{tmp}/empty"], "--data {tmp}/empty holds no images"),
        ("too many workers", ["--workers", "4"], "--workers 4 needs 4 x (CPU 0.9) but the cluster can place 2"),
        ("resume nothing", ["--resume", "{tmp}/nothing"], "--resume {tmp}/nothing:"),
        ("unreachable storage", ["--out", "s3://bucket/run"], "--out s3://bucket/run is not writable"),
    ],
)
def test_bad_input_fails_fast_naming_the_flag(
    case, flags, message, ray_local, tiny_data, tmp_path, capsys, monkeypatch, helpers
):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{helpers.port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    args = {"--data": tiny_data, "--out": str(tmp_path / "out"), "--workers": "1"}
    flags = [f.format(tmp=tmp_path) for f in flags]
    args.update(dict(zip(flags[::2], flags[1::2])))
    argv = ["train", "--preset", "cpu-tiny", "--batch", "8", "--kimg", "0.01", *sum(([k, v] for k, v in args.items()), [])]
    t0 = time.time()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert time.time() - t0 < 30, case


def test_gpu_workers_the_cluster_has_no_gpus_for_fail_fast(ray_local, tiny_data, tmp_path, capsys):
    argv = ["train", "--preset", "cpu-tiny", "--batch", "8", "--kimg", "0.01", "--data", tiny_data,
            "--out", str(tmp_path / "out"), "--workers", "2", "--gpus"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "--workers 2 needs 2 x (CPU 1 + GPU 1) but the cluster can place 0 (nodes: CPU 2): add nodes" in (
        capsys.readouterr().err)
