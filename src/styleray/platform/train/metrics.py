"""FID/KID during training (``styleray train --metrics fid,kid --metrics-every T``).

    driver (before any training)                      every rank, every T ticks (and at the end)
    build the extractor: a missing Inception file     its share of num_gen seeds -> G_ema images -> features,
      fails here, with the file and the fix           all_gather over the process group (gloo/NCCL; a single
    the dataset's reference statistics, cached          process needs none) -> FID, KID, diversity on every
      next to a local dataset (metrics package)         rank -> added to the tick record (metrics.jsonl,
    a MetricsPlan: options + extractor spec + stats     ray.train.report) -> best.json by FID

The extractor is the one ``styleray metrics`` uses: ``--extractor`` (a registered name, ``inception-v3`` by
default) with ``--inception PATH`` / ``$STYLERAY_INCEPTION`` / the cache folder for its weights. The plan
carries the extractor's registry entry itself, so an extractor registered in the driver process (a test's, an
experiment's) is rebuilt in the Ray workers too. The weights path is resolved on the driver; on a cluster it
must name the same file on every node.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from styleray import storage

log = logging.getLogger(__name__)

STATS_DIR = ".styleray-stats"  # the cached reference statistics, inside a local dataset folder
DEFAULT_NUM_GEN = 1000  # generated images per evaluation during training (50k is the papers' final FID)


@dataclass(frozen=True)
class MetricsOptions:
    """What to measure during training and how often."""

    metrics: tuple[str, ...] = ("fid",)  # "fid", "kid" (the diversity ratio comes with either)
    every: int = 1  # evaluate every this many ticks (and at the last tick)
    num_gen: int = DEFAULT_NUM_GEN  # generated images per evaluation, split across the workers
    extractor: str = "inception-v3"  # registered extractor name (styleray.models.metrics.EXTRACTORS)
    weights: str | None = None  # extractor weights (--inception); None: the extractor's own lookup
    batch: int = 32  # images per generator/extractor call
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"--metrics-every {self.every} must be >= 1 (ticks)")
        if self.num_gen < 2:
            raise ValueError(f"--metrics-num-gen {self.num_gen} must be >= 2")
        if self.batch < 1:
            raise ValueError(f"metrics batch {self.batch} must be >= 1")


@dataclass(eq=False)
class MetricsPlan:
    """Everything a rank needs to evaluate: picklable (sent to the Ray workers)."""

    options: MetricsOptions
    spec: Any  # styleray.models.metrics.ExtractorSpec
    weights: str | None  # resolved weights path (None: the extractor needs none)
    real: Any  # styleray.models.metrics.FeatureStats of the dataset (or a Ray ObjectRef to it, see ray_train)
    info: dict[str, Any] = field(default_factory=dict)  # extractor, num_real, cache: for the log
    labels: Any = None  # the dataset's classes (int array) for a conditional G: generated classes follow them


@dataclass(frozen=True)
class FolderStatsCache:
    """A dataset's reference statistics kept next to it, in ``DATA/.styleray-stats/`` (hidden: the dataset
    reader skips it), written with the storage layer's atomic write."""

    root: str

    def _path(self, key: str) -> str:
        return storage.join(self.root, STATS_DIR, key)

    def read(self, key: str) -> bytes | None:
        path = self._path(key)
        return storage.read_bytes(path) if storage.exists(path) else None

    def write(self, key: str, data: bytes) -> None:
        storage.write_bytes(self._path(key), data)


def options_from_settings(settings) -> MetricsOptions | None:
    """MetricsOptions of a run's TrainSettings (None without --metrics), checked before anything is read or
    trained: ValueError for an unknown metric or extractor, or missing weights."""
    from styleray.models import metrics

    if not settings.metrics:
        return None
    options = MetricsOptions(
        metrics=metrics.parse_metrics(settings.metrics),
        every=settings.metrics_every,
        num_gen=settings.metrics_num_gen,
        extractor=settings.extractor or metrics.DEFAULT_EXTRACTOR,
        weights=settings.inception,
    )
    metrics.get_extractor_spec(options.extractor)  # an unknown --extractor fails here
    resolve_weights(options.extractor, options.weights)  # so does a missing Inception file
    return options


def resolve_weights(extractor: str, weights: str | None) -> str | None:
    """The weights file the extractor will load, resolved here (MissingWeightsError, a ValueError, when the
    standard Inception file is absent). Other extractors get ``weights`` as given."""
    from styleray.models import metrics

    if extractor == metrics.DEFAULT_EXTRACTOR:
        return os.path.abspath(metrics.find_inception_weights(weights))
    return weights


def prepare(options: MetricsOptions, data, resolution: int, channels: int, device: str = "cpu",
            images=None) -> MetricsPlan:
    """On the driver, before training: build the extractor (fails fast without its weights) and compute the
    dataset's reference statistics (cached next to a local image folder). ``data`` is a DatasetInfo;
    ``images``: the dataset already decoded (uint8 [N, H, W, C] in ``data.files``' order, as ``train --no-ray``
    holds it), so that a cold statistics cache does not decode it a second time."""
    from styleray.datasets.read.ray_data import decode_all
    from styleray.models import metrics

    spec = metrics.get_extractor_spec(options.extractor)
    weights = resolve_weights(options.extractor, options.weights)
    extractor = metrics.build_extractor(options.extractor, weights, device)
    if data.resolution != resolution:
        raise ValueError(
            f"--metrics compares at the run's resolution {resolution}, but --data {data.uri} holds "
            f"{data.resolution}px images: prepare the data with --resolution {resolution}"
        )
    local_folder = data.kind == "images" and not storage.is_remote(data.uri)
    real = metrics.dataset_stats(
        data.uri if local_folder else "",
        extractor,
        files=list(data.files),
        load_images=(lambda: images) if images is not None else (lambda: decode_all(data, use_labels=False)[0]),
        resolution=resolution,
        channels=channels,
        cache=FolderStatsCache(data.uri) if local_folder else None,
        batch_size=options.batch,
    )
    info = {"extractor": extractor.name, "num_real": real.num, "metrics": ",".join(options.metrics)}
    log.info(
        "metrics %s every %d tick(s): %d generated images vs %d of the data, extractor %s",
        info["metrics"], options.every, options.num_gen, real.num, extractor.name,
    )
    labels = None
    if data.labels:  # image folders with dataset.json labels (Parquet: classes drawn uniformly)
        import numpy as np

        labels = np.array([data.labels[f] for f in data.files if f in data.labels], dtype=np.int64)
    return MetricsPlan(options, spec, weights, real, info, labels)


class TickEvaluator:
    """Called by the loop on every rank at the ticks it measures: G_ema -> {fid, kid, diversity_ratio, ...}.

    Collective inside a process group: every rank generates its shard and all ranks gather the features."""

    def __init__(self, plan: MetricsPlan, device, real=None):
        from styleray.models import metrics

        self.options = plan.options
        self.real = real if real is not None else plan.real
        self.labels = plan.labels
        metrics.register_extractor(plan.spec, replace=True)  # a worker process may not know it yet
        self.extractor = metrics.build_extractor(plan.spec.name, plan.weights, device)
        self.device = device

    def __call__(self, G) -> dict[str, Any]:
        import torch.distributed as dist

        from styleray.models import metrics

        grouped = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
        was_training = G.training
        G.eval()
        try:
            out = metrics.evaluate_generator(
                G, self.real, self.extractor, metrics=self.options.metrics, num_gen=self.options.num_gen,
                labels=self.labels, batch_size=self.options.batch, rank=rank, world_size=world,
                kid_subsets=self.options.kid_subsets, kid_subset_size=self.options.kid_subset_size,
                device=self.device,
            )
        finally:
            G.train(was_training)
        keep = ("fid", "kid", "diversity_ratio", "diversity_gen", "diversity_real", "num_gen", "seconds")
        record = {k: out[k] for k in keep if k in out}
        record["metrics_seconds"] = record.pop("seconds")
        record["metrics_extractor"] = out["extractor"]
        return record
