"""``styleray train --no-ray``: the training loop in this process, on one device, over a local image folder.

The same loop as each Ray Train worker runs (``loop.run_training``), fed by an in-memory sampler instead of a
Ray Dataset shard; for notebooks, debugging and machines without Ray.
"""

from __future__ import annotations

import logging
from typing import Any

from styleray.config import RunSpec

log = logging.getLogger(__name__)


def fit_local(
    run: RunSpec,
    data,  # styleray.datasets.read.folder.ImageFolder, decoded (labels dropped unless run.model.c_dim)
    *,
    resume: str | None = "latest",
    metrics=None,  # train.metrics.MetricsPlan (--metrics), made by train.metrics.prepare
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``run`` in this process; returns the loop's summary (kimg, checkpoint, last record, ...)."""
    from styleray.datasets.read.folder import BatchSampler
    from styleray.platform.train.loop import LoopHooks, run_training
    from styleray.platform.train.ray_train import check_resume

    if run.out is None:
        raise ValueError("--out is required: the run folder for checkpoints and metrics")
    sampler = BatchSampler(data, run.train.batch_per_worker, seed=run.train.seed, mirror=run.train.mirror)
    log.info("training %s at %dpx on %d images -> %s", run.preset, run.model.resolution, len(data.images), run.out)
    hooks = LoopHooks(progress=progress)
    if metrics is not None:
        from styleray.platform.train.metrics import TickEvaluator

        hooks.evaluate, hooks.evaluate_every = TickEvaluator(metrics, run.device), metrics.options.every
    return run_training(run, sampler, resume=check_resume(resume, run.out), hooks=hooks)
