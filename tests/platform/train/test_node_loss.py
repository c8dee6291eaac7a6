"""Issue test 3: node loss on a ray.cluster_utils.Cluster (a CPU-less head and two 1-CPU worker nodes, so each
node holds exactly one training worker). Losing a node with a replacement resumes from the last checkpoint;
losing one with no capacity left fails after the bounded placement wait instead of hanging."""

from __future__ import annotations

import os
import threading
import time

import pytest

from styleray.platform.train import ray_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _fit_in_background(run, options):
    box: dict = {}

    def target():
        try:
            box["summary"] = ray_train.fit(run, resume=None, options=options)
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_for(path, thread, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert thread.is_alive(), "the run ended before the node could be removed"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_lost_node_is_replaced_and_the_run_completes_from_the_last_checkpoint(cluster, tiny_data, tiny_run, tmp_path):
    out = tmp_path / "run"
    run = tiny_run(tiny_data, out, workers=2, kimg=0.16, snap=1)
    thread, box = _fit_in_background(run, ray_train.RayOptions(max_failures=2, placement_timeout_s=120))
    _wait_for(out / "checkpoints" / "ckpt-000000000064" / "meta.json", thread)
    victim = list(cluster.worker_nodes)[-1]  # each worker node hosts one of the two training workers
    cluster.remove_node(victim, allow_graceful=False)
    cluster.add_node(num_cpus=1)  # a fresh node: room for the lost worker again
    thread.join(timeout=240)
    assert not thread.is_alive(), "the run did not finish after the node was replaced"
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    assert summary["resumed_kimg"] >= 0.064  # restored from a checkpoint, not from scratch
    assert summary["kimg"] == pytest.approx(0.16)


def test_lost_node_without_replacement_fails_after_the_placement_timeout(cluster, tiny_data, tiny_run, tmp_path):
    out = tmp_path / "run"
    run = tiny_run(tiny_data, out, workers=2, kimg=2.0, snap=1)
    thread, box = _fit_in_background(run, ray_train.RayOptions(max_failures=2, placement_timeout_s=5))
    _wait_for(out / "checkpoints" / "ckpt-000000000032" / "meta.json", thread)
    lost_at = time.time()
    cluster.remove_node(list(cluster.worker_nodes)[-1], allow_graceful=False)
    thread.join(timeout=180)
    assert not thread.is_alive(), "the run hung after losing a node with no capacity left"
    assert isinstance(box.get("error"), ray_train.PlacementTimeout), box
    assert "--placement-timeout 5s" in str(box["error"]) and "--resume latest" in str(box["error"])
    assert time.time() - lost_at < 150  # failure detection + restart + the 5 s wait, on a busy 2-core machine
