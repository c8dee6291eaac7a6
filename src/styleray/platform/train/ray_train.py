"""Ray Train: StyleGAN2-ADA on N workers, fault tolerant, resumable.

    driver (fit)                                       each worker (train_loop_per_worker)
    check --data, --out, --resume, cluster room   ->   restore: the run's newest loadable checkpoint (corrupt
    Ray Dataset of the prepared images                 ones skipped), else --resume
    TorchTrainer(ScalingConfig, FailureConfig,         loop over ticks (loop.run_training): its shard of the
      storage = the run folder, local or s3://)          dataset, gradients all-reduced over gloo/NCCL
    translate failures into messages a user can        every tick ray.train.report(metrics); every --snap
      act on                                             ticks rank 0 writes a checkpoint into the run folder
                                                         and reports it to Ray Train (no second copy)
    --metrics: the extractor and the dataset's         every --metrics-every ticks: FID/KID of G_ema, the
      statistics (train_metrics.prepare)                 images split over the ranks, features all-gathered

The run folder (``--out``) is Ray Train's experiment folder: ``storage_path`` is its parent and ``name`` its
base name, so styleray's checkpoints (``checkpoints/ckpt-*``, see ``checkpoint.py``) sit inside what Ray
Train manages and are registered with ``CheckpointUploadMode.NO_UPLOAD`` (``Result.checkpoint`` and the
dashboard show them). On a restart every worker resumes from the newest loadable checkpoint in the folder.

Waiting is bounded: a worker group that cannot be placed (``--workers`` beyond the cluster, or a lost node
with no replacement) fails after ``placement_timeout_s`` with a clear error instead of waiting forever.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any

from styleray.config import RunSpec
from styleray.platform import checkpoint as ckpt_lib
from styleray import storage

log = logging.getLogger(__name__)

DATASET_KEY = "train"
CPU_WORKER_CPUS = 0.9  # CPU training: leave a sliver of each core to Ray Data and Ray Train's own actors


class PlacementTimeout(RuntimeError):
    """The worker group could not be placed within the placement timeout."""


class TrainingFailed(RuntimeError):
    """Workers kept failing after --max-failures restarts."""


@dataclass(frozen=True)
class RayOptions:
    """How the run uses the Ray cluster (the training itself is in RunSpec)."""

    gpus: bool = False  # one GPU per worker, NCCL; False: CPU workers, gloo
    cpus_per_worker: float | None = None  # None: 1 with GPUs, CPU_WORKER_CPUS without
    max_failures: int = 3  # worker-group restarts from the last checkpoint before giving up; -1 = no limit
    placement_timeout_s: float = 300.0  # longest wait for room for the worker group (start or restart)
    autoscale: bool = False  # the cluster can grow: do not fail fast when its current nodes are too few
    cache_data: bool | None = None  # decode the dataset once into the object store (None: if small)
    threads: int | None = None  # torch threads per worker (None: the worker's whole CPUs, at least 1)

    def __post_init__(self) -> None:
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"--cpus-per-worker {self.cpus_per_worker} must be > 0")
        if self.max_failures < -1:
            raise ValueError(f"--max-failures {self.max_failures} must be >= 0 (or -1 for no limit)")
        if not self.placement_timeout_s > 0:
            raise ValueError(f"--placement-timeout {self.placement_timeout_s} must be > 0 seconds")

    @classmethod
    def from_settings(cls, settings) -> "RayOptions":
        """The cluster side of a run's TrainSettings."""
        return cls(gpus=settings.gpus, cpus_per_worker=settings.cpus_per_worker, max_failures=settings.max_failures,
                   placement_timeout_s=settings.placement_timeout, autoscale=settings.autoscale)

    def resources_per_worker(self) -> dict[str, float]:
        cpus = self.cpus_per_worker if self.cpus_per_worker is not None else (1.0 if self.gpus else CPU_WORKER_CPUS)
        return {"CPU": cpus, "GPU": 1.0} if self.gpus else {"CPU": cpus}

    def torch_threads(self) -> int:
        return self.threads or max(1, int(round(self.resources_per_worker()["CPU"])))


# ---------------------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------------------


def connect(num_cpus: int | None = None, include_dashboard: bool | None = None) -> str:
    """Attach to the cluster named by RAY_ADDRESS (as under ``ray job submit``), else start a private local
    one. Returns a line saying which. No-op when Ray is already initialised (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        return "using the already initialised Ray cluster"
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address.startswith(("http://", "https://")):
        raise ValueError(
            f"RAY_ADDRESS={address} is a Jobs API (dashboard) address: submit the run with "
            f"`ray job submit --address {address} -- styleray train ...`, or point RAY_ADDRESS at the "
            "cluster itself (auto, or HOST:6379)"
        )
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"attached to the Ray cluster at {address}"
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=include_dashboard,
        dashboard_host="127.0.0.1",
    )
    return "started a local Ray cluster"


def placeable_workers(resources: dict[str, float]) -> tuple[int, list[dict[str, float]]]:
    """How many workers of ``resources`` the live nodes can hold (by their totals), and those totals."""
    import ray

    totals = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    count = 0
    for res in totals:
        count += min(math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in resources.items() if v > 0)
    return count, totals


def check_capacity(workers: int, options: RayOptions) -> None:
    """Fail fast when the cluster can never place the worker group (unless it can grow)."""
    resources = options.resources_per_worker()
    fits, totals = placeable_workers(resources)
    if fits >= workers or options.autoscale:
        return
    nodes = "; ".join(
        ", ".join(f"{k} {v:g}" for k, v in sorted(t.items()) if k in ("CPU", "GPU")) or "no CPU/GPU" for t in totals
    )
    need = " + ".join(f"{k} {v:g}" for k, v in resources.items())
    hint = f"use --workers {fits}" if fits > 0 else "add nodes"
    if "GPU" not in resources:
        cpus = sum(t.get("CPU", 0.0) for t in totals)
        hint += f", or --cpus-per-worker {math.floor(cpus / workers * 0.9 * 100) / 100:g}"
    raise ValueError(
        f"--workers {workers} needs {workers} x ({need}) but the cluster can place {fits} "
        f"(nodes: {nodes or 'none'}): {hint}; on a cluster that autoscales, pass --autoscale"
    )


# ---------------------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------------------


def _resume_source(config: dict[str, Any], run_dir: str) -> ckpt_lib.Checkpoint | str | None:
    """The run folder's newest loadable checkpoint (corrupt or partial ones skipped), else --resume.

    Every checkpoint Ray Train has registered lies in the run folder, so the folder's newest loadable one is
    Ray's last registered checkpoint or a newer complete one (rank 0 had written it when a worker died
    before the report that would have registered it): resuming from it loses the least work."""
    import ray.train

    latest = ckpt_lib.load_latest(run_dir)
    registered = ray.train.get_checkpoint()
    if registered is not None and latest is not None and posixpath.basename(registered.path.rstrip("/")) != latest.name:
        log.info("Ray Train registered %s; resuming from %s", registered.path, latest.name)
    return latest if latest is not None else config["resume"]


def _maybe_fail(spec: dict[str, Any] | None, rank: int, kimg: float) -> None:
    """Fault injection for tests and benchmarks: rank ``spec["rank"]`` dies once, at the first tick at or past
    ``spec["after_kimg"]``; the marker file (holding the time of death) makes it happen only once."""
    if not spec or rank != spec["rank"] or kimg < spec["after_kimg"] or os.path.exists(spec["marker"]):
        return
    with open(spec["marker"], "w", encoding="utf-8") as f:
        f.write(repr(time.time()))
    log.warning("fault injection: rank %d exits at %.3f kimg", rank, kimg)
    os._exit(1)


# Tick statistics exported as Ray metrics (the dashboard's Metrics view, Prometheus), tagged by run name.
DASHBOARD_METRICS = ("kimg", "sec_per_kimg", "img_per_sec", "loss_G", "loss_D", "r1_penalty", "pl_penalty",
                     "augment_p", "r_t", "memory_mb", "rollbacks", "fid", "kid", "diversity_ratio")


def _dashboard_gauges(run_name: str):
    """A function that sets one gauge per DASHBOARD_METRICS key from a tick record."""
    from ray.util.metrics import Gauge

    gauges = {k: Gauge(f"styleray_{k}", description=f"styleray tick statistic {k}", tag_keys=("run",))
              for k in DASHBOARD_METRICS}

    def update(record: dict[str, Any]) -> None:
        for k, gauge in gauges.items():
            value = record.get(k)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags={"run": run_name})

    return update


def _reporter(config: dict[str, Any], rank: int):
    """The loop's report hook: ray.train.report every tick (a barrier on every rank), with rank 0's
    checkpoint registered in place (NO_UPLOAD: it already lies in the run folder)."""
    import ray.train
    from ray.train import Checkpoint
    from ray.train.v2.api.report_config import CheckpointUploadMode

    ctx = ray.train.get_context().get_storage()
    gauges = _dashboard_gauges(ctx.experiment_dir_name) if rank == 0 else None

    def report(record: dict[str, Any], uri: str | None) -> None:
        _maybe_fail(config.get("inject_failure"), rank, record["kimg"])
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float, str, bool)) or v is None}
        if gauges is not None:
            gauges(record)
            log.info(
                "tick %d  kimg %.3f  %.1f s/kimg  %.1f img/s  G %.3f  D %.3f  p %.3f%s",
                record["tick"], record["kimg"], record["sec_per_kimg"], record["img_per_sec"],
                record.get("loss_G", float("nan")), record.get("loss_D", float("nan")),
                record.get("augment_p", 0.0), "  UNSTABLE" if record.get("unstable") else "",
            )
        if uri is None:
            ray.train.report(metrics)
            return
        path = posixpath.join(ctx.experiment_fs_path, ckpt_lib.CHECKPOINTS_DIR, posixpath.basename(uri))
        ray.train.report(
            metrics,
            checkpoint=Checkpoint(path=path, filesystem=ctx.storage_filesystem),
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )

    return report


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: build -> restore -> ticks (report/checkpoint). Returns rank 0's summary."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from styleray.datasets.read.ray_data import ShardBatches
    from styleray.platform.train.loop import LoopHooks, run_training
    from styleray.platform.train.stability import TrainingDiverged

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    storage.apply_env(config["storage_env"])
    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device() if config["gpus"] else torch.device("cpu")
    run = RunSpec.from_dict(config["run"])
    run = dataclasses.replace(run, device=str(device))

    resume = _resume_source(config, run.out)
    start_nimg = resume.meta.get("cur_nimg", 0) if isinstance(resume, ckpt_lib.Checkpoint) else 0
    batches = ShardBatches(
        ray.train.get_dataset_shard(DATASET_KEY),
        run.train.batch_per_worker,
        num_classes=run.model.c_dim,
        mirror=run.train.mirror,
        seed=[run.train.seed, rank, int(start_nimg)],
    )
    hooks = LoopHooks(is_chief=rank == 0, report=_reporter(config, rank), progress=False)
    if config.get("metrics") is not None:  # --metrics: FID/KID every few ticks, images split over the ranks
        from styleray.platform.train.metrics import TickEvaluator

        plan = config["metrics"]
        hooks.evaluate = TickEvaluator(plan, device, real=ray.get(config["metrics_real"]))
        hooks.evaluate_every = plan.options.every
    try:
        summary = run_training(run, batches, resume=resume, hooks=hooks)
    except TrainingDiverged as e:
        # Every rank reaches this at the same tick (the verdict comes from rank-averaged statistics), so
        # returning is collective-safe, and Ray Train does not retry a divergence that would only repeat.
        return {"status": "diverged", "message": str(e)}
    summary.pop("trainer")
    summary["status"] = "finished"
    summary["epochs"] = batches.epoch
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in summary.items()}


# ---------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------


def _storage_location(out: str) -> tuple[Any, str, str]:
    """(pyarrow filesystem, storage_path, name) with storage_path/name = the run folder."""
    fs, path = storage.pyarrow_filesystem(out)
    parent, name = posixpath.split(path.rstrip("/")) if storage.is_remote(out) else os.path.split(path)
    if not name or not parent:
        raise ValueError(f"--out {out}: give a run folder below the bucket or root, e.g. s3://bucket/runs/r1")
    return fs, parent, name


def check_resume(resume: str | None, run_dir: str) -> str | None:
    """Validate --resume on the driver: 'latest', None, or a loadable checkpoint/run path (returned as the
    checkpoint's URI). A path must not be combined with a run folder that already has its own checkpoints."""
    if resume in (None, "latest"):
        if resume is None and ckpt_lib.list_checkpoints(run_dir):
            raise ValueError(
                f"--resume none, but --out {run_dir} already holds checkpoints: use --resume latest to continue "
                "that run, or a new --out"
            )
        return resume
    try:
        ck = ckpt_lib.resolve(storage.absolute(resume))
    except ckpt_lib.CheckpointError as e:
        raise ValueError(f"--resume {resume}: {e}") from e
    if ckpt_lib.list_checkpoints(run_dir) and not ck.uri.startswith(storage.absolute(run_dir)):
        raise ValueError(
            f"--resume {resume}, but --out {run_dir} already holds checkpoints of another run: "
            "use a new --out (or --resume latest to continue the run in --out)"
        )
    return ck.uri


TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


def retire_stale_train_snapshot(run_dir: str) -> None:
    """Set Ray Train's snapshot aside when it names checkpoints that are gone (pruned by --keep, or set aside
    by a sweep's PBT exploit): Ray Train refuses to start in such a folder, and styleray resumes from its own
    checkpoints anyway (the run folder's newest loadable one)."""
    path = storage.join(run_dir, TRAIN_SNAPSHOT)
    if not storage.exists(path):
        return
    try:
        names = [r["checkpoint_dir_name"] for r in json.loads(storage.read_bytes(path))["checkpoint_results"]]
    except (ValueError, KeyError, TypeError) as e:
        missing = [f"unreadable ({e})"]
    else:
        missing = [n for n in names if not storage.exists(storage.join(run_dir, n))]
    if missing:
        storage.write_bytes(storage.join(run_dir, TRAIN_SNAPSHOT + ".stale"), storage.read_bytes(path))
        storage.remove(path)
        log.info("set Ray Train's snapshot aside (%s no longer there); resuming from the run's own checkpoints",
                 ", ".join(missing[:3]))


def fit(
    run: RunSpec,
    *,
    data=None,  # styleray.datasets.read.ray_data.DatasetInfo of run.data (None: inspected here)
    resume: str | None = "latest",
    options: RayOptions | None = None,
    inject_failure: dict[str, Any] | None = None,  # {"rank", "after_kimg", "marker"}: see _maybe_fail
    metrics=None,  # train_metrics.MetricsPlan (--metrics), made on the driver by train_metrics.prepare
    callbacks: list | None = None,  # Ray Train UserCallbacks (the sweeps forward reports to Ray Tune)
) -> dict[str, Any]:
    """Train ``run`` with Ray Train; returns rank 0's summary (kimg, checkpoint, last record, ...)."""
    import ray.train
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError  # no public name in Ray 2.60

    from styleray.platform.train.stability import TrainingDiverged

    options = options or RayOptions()
    run, data, resume = _check_run(run, data, resume)
    log.info(connect())
    check_capacity(run.train.workers, options)
    trainer = _trainer(run, data, resume, options, inject_failure, metrics, callbacks)
    log.info("training %s at %dpx on %d images with %d workers x %s -> %s", run.preset, run.model.resolution,
             data.num_images, run.train.workers, options.resources_per_worker(), run.out)
    try:
        result = trainer.fit()
    except ray.train.ControllerError as e:
        if isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
            raise PlacementTimeout(
                f"no room for {run.train.workers} workers x {options.resources_per_worker()} within "
                f"--placement-timeout {options.placement_timeout_s:g}s (a node was lost, or the cluster is busy); "
                f"add nodes or rerun with fewer --workers: --resume latest continues from the last checkpoint "
                f"in {run.out}"
            ) from e
        raise
    except ray.train.TrainingFailedError as e:
        raise _worker_failure(e, options, run.out) from e
    summary = dict(result.return_value or {})
    if summary.get("status") == "diverged":
        raise TrainingDiverged(summary["message"])
    return summary


def _check_run(run: RunSpec, data, resume: str | None):
    """On the driver, before Ray: absolute paths, a writable run folder, a valid --resume, enough images."""
    from styleray.datasets.read import ray_data

    if run.out is None or run.data is None:
        raise ValueError("--data and --out are required")
    run = dataclasses.replace(run, out=storage.absolute(run.out), data=storage.absolute(run.data))
    _storage_location(run.out)  # a run folder below the bucket or root
    storage.check_writable(run.out, "--out")
    resume = check_resume(resume, run.out)
    retire_stale_train_snapshot(run.out)
    if data is None:
        data = ray_data.inspect_dataset(run.data, storage.pyarrow_filesystem(run.data)[0])
    if data.num_images < run.train.batch:
        raise ValueError(
            f"--data {run.data} holds {data.num_images} images, fewer than one batch (--batch {run.train.batch})"
        )
    return run, data, resume


def _trainer(run: RunSpec, data, resume, options: RayOptions, inject_failure, metrics, callbacks):
    """The TorchTrainer: the run folder as Ray Train's storage, the dataset, the worker group, the failure
    policy, and the worker function's config."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from styleray.datasets.read import ray_data

    fs, storage_path, name = _storage_location(run.out)
    resources = options.resources_per_worker()
    spare_cpus = ray.cluster_resources().get("CPU", 0.0) - run.train.workers * resources["CPU"]
    ray.data.DataContext.get_current().enable_progress_bars = False  # the tick lines say how training goes
    dataset = ray_data.build_dataset(data, use_labels=run.model.c_dim > 0, cache=options.cache_data,
                                     read_cpus=min(max(spare_cpus / 2, 0.05), 1.0))
    # The controller reads this when it places the worker group: each placement waits at most this long.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(options.placement_timeout_s)
    config = {
        "run": run.to_dict(),
        "resume": resume,
        "gpus": options.gpus,
        "threads": options.torch_threads(),
        "storage_env": storage.forwarded_env(),  # where S3 is; never credentials (storage.py)
        "inject_failure": inject_failure,
        # the plan travels without its (possibly large) dataset statistics; those go by the object store
        "metrics": dataclasses.replace(metrics, real=None) if metrics is not None else None,
        "metrics_real": ray.put(metrics.real) if metrics is not None else None,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=run.train.workers, use_gpu=options.gpus,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            # controller_failure_limit=0: a placement that times out ends the run (no silent retry loop).
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures, controller_failure_limit=0),
            callbacks=list(callbacks or []),
        ),
        datasets={DATASET_KEY: dataset},
    )


def _worker_failure(e: Exception, options: RayOptions, run_dir: str) -> Exception:
    """A WorkerGroupError after the restarts are spent: surface a user error as such, else summarise."""
    failures = getattr(e, "worker_failures", {}) or {}
    for rank, err in sorted(failures.items()):
        cause = getattr(err, "cause", None) or err
        if isinstance(cause, ValueError):
            return ValueError(str(cause))
    first = next(iter(failures.values()), e)
    return TrainingFailed(
        f"training failed after {options.max_failures} restart(s) (--max-failures): {first}; "
        f"--resume latest continues from the last checkpoint in {run_dir}"
    )
