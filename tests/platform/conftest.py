"""Shared fixtures for the platform tests: a tiny prepared dataset, tiny run configs, a private Ray cluster."""

from __future__ import annotations

import os

import pytest

from styleray.config import RunSpec, resolve_preset


@pytest.fixture(scope="session")
def tiny_run():
    """RunSpec factory: cpu-tiny at 16 px, batch 8, ticks of 32 images (4 steps with 2 workers)."""

    def make(data, out, *, workers: int = 2, kimg: float = 0.096, tick: float = 0.032, snap: int = 1,
             batch: int = 8, cond: bool = False, **train) -> RunSpec:
        model, cfg = resolve_preset(
            "cpu-tiny",
            resolution=16,
            workers=workers,
            c_dim=2 if cond else 0,
            train_overrides=dict(batch=batch, kimg=kimg, tick_kimg=tick, snap=snap, **train),
        )
        return RunSpec(model=model, train=cfg, preset="cpu-tiny", data=str(data), out=str(out))

    return make


def _is_private_local_cluster(ray) -> bool:
    return ray.is_initialized() and len(ray.nodes()) == 1 and ray.cluster_resources().get("CPU") == 2


@pytest.fixture(scope="module")
def ray_local():
    """A private 2-CPU Ray cluster (never one another process started), shared by the modules that use it
    one after another; a module that needs another cluster (node loss) shuts it down, and the next user
    starts a fresh one. Torn down at the end of the session."""
    import ray

    if not _is_private_local_cluster(ray):
        ray.shutdown()
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_the_end():
    yield
    import sys

    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="session", autouse=True)
def _quick_ray_train_polling():
    """Ray Train's controller polls its workers every 2 s by default; tests finish and recover sooner at
    0.5 s (the driver's value reaches the controller, which fit() starts)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    yield


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """In-process training uses one thread, like each Ray worker here: the 2 cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_process_group():
    """No test leaves a torch process group behind."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
