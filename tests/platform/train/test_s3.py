"""Issue tests 4 and 5: a moto S3 server on 127.0.0.1 as storage (and as the data source); checkpoints land
in the bucket; the newest one is corrupted, and a second run (`--resume latest` to a longer --kimg) resumes
from the bucket's previous one. Ray's storage, Ray Data and the workers find the endpoint and the credentials
in their own environment (nothing is passed to them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from styleray import storage
from styleray.platform.train import ray_train

pytestmark = pytest.mark.slow

BUCKET = "styleray-test"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="module")
def s3_env(moto):
    """The bucket, and a private Ray cluster started with the S3 settings in its environment, as a cluster's
    nodes have them (their instance role, or the environment `ray start` ran in): styleray passes no
    credentials to its workers (storage.py's credential policy)."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": moto, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        fs, _ = storage.filesystem(f"s3://{BUCKET}")
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield fs
        finally:
            ray.shutdown()  # the next module starts a cluster without these variables


def test_s3_checkpoints_land_in_the_bucket_and_resume_skips_a_corrupt_newest_one(s3_env, tiny_data, tiny_run):
    fs = s3_env
    fs.put(tiny_data, f"{BUCKET}/data", recursive=True)
    data, out = f"s3://{BUCKET}/data", f"s3://{BUCKET}/runs/r1"
    ckpts = f"{BUCKET}/runs/r1/checkpoints"

    first = ray_train.fit(tiny_run(data, out, workers=2, kimg=0.064, snap=1), resume=None)
    assert first["kimg"] == pytest.approx(0.064)
    assert first["checkpoint"] == f"{out}/checkpoints/ckpt-000000000064"
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(ckpts, detail=False)] == ["ckpt-000000000032", "ckpt-000000000064"]
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{ckpts}/ckpt-000000000064", detail=False)}
    assert names == {"state.pt", "config.json", "grid.png", "meta.json"}
    assert fs.exists(f"{BUCKET}/runs/r1/checkpoint_manager_snapshot.json")  # Ray Train's own state, same folder
    assert json.loads(fs.cat_file(f"{BUCKET}/runs/r1/best.json"))["checkpoint"] == "ckpt-000000000064"

    # Issue test 5: the newest checkpoint is corrupted in storage (its SHA-256 no longer matches)
    blob = bytearray(fs.cat_file(f"{ckpts}/ckpt-000000000064/state.pt"))
    blob[len(blob) // 2 : len(blob) // 2 + 8] = b"corrupt!"
    fs.pipe_file(f"{ckpts}/ckpt-000000000064/state.pt", bytes(blob))

    second = ray_train.fit(tiny_run(data, out, workers=2, kimg=0.096, snap=1), resume="latest")
    assert second["resumed_kimg"] == pytest.approx(0.032)  # the corrupt 0.064 one was skipped
    assert second["kimg"] == pytest.approx(0.096)
    records = [json.loads(line) for line in fs.cat_file(f"{BUCKET}/runs/r1/metrics.jsonl").decode().splitlines()]
    assert [(r["tick"], r["resumed_kimg"]) for r in records] == [(1, 0.0), (2, 0.0), (2, 0.032), (3, 0.032)]
    meta = json.loads(fs.cat_file(f"{ckpts}/ckpt-000000000096/meta.json"))
    assert meta["tick"] == 3 and meta["stable"] is True  # counters continued from the restored checkpoint
