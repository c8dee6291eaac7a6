"""A sweep's settings and objective, and the train settings of each of its trials (``styleray tune``).

Shared by the driver (``driver.py``), each trial (``trial.py``) and the results (``results.py``); saved as
``OUT/sweep.json`` so that ``--resume`` continues with exactly these.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from styleray import storage
from styleray.config import RunSpec
from styleray.settings import SettingsError, TrainSettings, from_argv

log = logging.getLogger(__name__)

SCHEDULERS = ("asha", "pbt", "none")
SEARCHES = ("grid", "random", "optuna")
METRIC_CHOICES = ("auto", "fid", "kid", "pixel-fid", "pixel-kid")
TUNE_DIR = "tune"  # Ray Tune's experiment folder inside --out
TRIALS_DIR = "trials"  # one styleray run folder per trial inside --out
SWEEP_FILE = "sweep.json"  # the sweep's settings and objective (read back by --resume)


class SweepError(RuntimeError):
    """The sweep ran but no trial produced a result."""


# ---------------------------------------------------------------------------------------------------------
# Settings and the objective
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """What the scheduler and the search minimise, and how it is measured."""

    name: str  # as reported: fid, kid, fid@NAME, pixel-fid, pixel-kid
    key: str  # the tick record's key: fid or kid
    extractor: str  # registered extractor
    weights: str | None  # resolved weights file (None: the extractor has none)
    proxy: bool  # True: not the standard FID/KID
    note: str  # one line for the log and the results: what it is and why it was chosen

    def describe(self) -> str:
        return f"{self.name} ({self.note})"


def resolve_objective(metric: str, extractor: str | None = None, inception: str | None = None) -> Objective:
    """The objective for --metric (auto, fid, kid, pixel-fid, pixel-kid); ValueError when unusable."""
    from styleray.models import metrics
    from styleray.platform.train.metrics import resolve_weights

    if metric not in METRIC_CHOICES:
        raise ValueError(f"--metric {metric!r} is unknown; choose one of {', '.join(METRIC_CHOICES)}")
    pixels = metrics.PIXELS_EXTRACTOR
    if metric.startswith("pixel-"):
        if extractor not in (None, pixels):
            raise ValueError(f"--metric {metric} measures with {pixels}; drop --extractor {extractor} or use --metric fid")
        return Objective(metric, metric.split("-")[1], pixels, None, True,
                         f"PROXY for {metric.split('-')[1].upper()}: {pixels} features, not Inception; "
                         "not comparable with published numbers")
    if metric == "auto":
        if extractor is None:
            try:
                weights = resolve_weights(metrics.DEFAULT_EXTRACTOR, inception)
            except metrics.MissingWeightsError:
                if inception:  # a file the user named is missing: that is an error, not a reason to switch
                    raise
                return Objective("pixel-fid", "fid", pixels, None, True,
                                 f"PROXY for FID chosen by --metric auto because the Inception-v3 weights are "
                                 f"missing ({metrics.INCEPTION_FILE}; see `styleray metrics --help`); "
                                 f"{pixels} features, not comparable with published FIDs")
            return Objective("fid", "fid", metrics.DEFAULT_EXTRACTOR, weights, False,
                             "FID with Inception-v3, chosen by --metric auto: the weights were found")
        metric = "fid"
    name = extractor or metrics.DEFAULT_EXTRACTOR
    metrics.get_extractor_spec(name)
    try:
        weights = resolve_weights(name, inception)
    except metrics.MissingWeightsError as e:
        raise ValueError(f"--metric {metric}: {e} (or sweep on the named proxy: --metric pixel-{metric})") from None
    if name == metrics.DEFAULT_EXTRACTOR:
        return Objective(metric, metric, name, weights, False, f"{metric.upper()} with Inception-v3")
    proxy = name == pixels
    label = f"pixel-{metric}" if proxy else f"{metric}@{name}"
    return Objective(label, metric, name, weights, True, f"{metric.upper()} over the {name} extractor's features")


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: what to search, how, and the fixed train settings every trial trains with."""

    out: str
    space_file: str
    base: dict[str, Any] = field(default_factory=dict)  # fixed train settings of every trial (data included)
    trials: int = 8  # samples (random, optuna) or grid repeats; every grid combination runs once per sample
    scheduler: str = "asha"
    search: str = "random"
    metric: str = "auto"
    workers_per_trial: int = 1
    cpus_per_worker: float | None = None  # None: ray_train's default (0.9 on CPU)
    gpus: bool = False
    max_concurrent: int | None = None  # None: as many trials as the cluster can place at once
    metrics_every: int = 1  # ticks between measurements (the scheduler sees measured ticks only)
    num_gen: int = 500  # generated images per measurement
    extractor: str | None = None
    inception: str | None = None
    perturbation_interval: int = 2  # PBT: measured reports between perturbations
    pbt_sync: bool = False  # PBT: perturb all trials together (the first ones to get there wait, paused)
    grace_period: int = 1  # ASHA: measured reports before a trial can be stopped
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler {self.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
        if self.search not in SEARCHES:
            raise ValueError(f"--search {self.search!r} is unknown; choose one of {', '.join(SEARCHES)}")
        if self.metric not in METRIC_CHOICES:
            raise ValueError(f"--metric {self.metric!r} is unknown; choose one of {', '.join(METRIC_CHOICES)}")
        if self.scheduler == "pbt" and self.search == "optuna":
            raise ValueError("--scheduler pbt changes hyperparameters during trials, which a model-based search "
                             "cannot learn from: use --search random (or grid) with pbt, or another --scheduler")
        for name in ("trials", "workers_per_trial", "metrics_every", "num_gen", "perturbation_interval", "grace_period"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.scheduler == "pbt" and self.trials < 2:
            raise ValueError(f"--scheduler pbt needs a population: --trials {self.trials} must be >= 2")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent {self.max_concurrent} must be >= 1")

    @property
    def data(self) -> str:
        return str(self.base.get("data", ""))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepConfig":
        d = dict(d)
        if "base_flags" in d:  # a sweep.json written before the typed settings: train flags and data
            flags, data = d.pop("base_flags"), d.pop("data")
            d["base"] = from_argv([*flags, "--data", data, "--out", d["out"]]).changed(portable_only=True)
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------
# Train settings of a trial
# ---------------------------------------------------------------------------------------------------------


def trial_settings(sweep: SweepConfig, hp: dict[str, Any], out: str) -> TrainSettings:
    """A trial's train settings: the sweep's fixed ones, its run folder and worker count, and its
    hyperparameters (``dataclasses.replace``: each value checked as the train command checks it)."""
    try:
        base = TrainSettings.from_mapping({**sweep.base, "out": out}, "the sweep's train settings")
        return dataclasses.replace(base, workers=sweep.workers_per_trial, **hp)
    except SettingsError as e:
        raise ValueError(f"bad train settings for the trials: {e}") from None


def trial_run_config(sweep: SweepConfig, hp: dict[str, Any], out: str, data_info) -> RunSpec:
    from styleray.platform.train.transfer import resolve_run

    settings = trial_settings(sweep, hp, out)
    return resolve_run(settings, data_info.resolution, data_info.channels, data_info.num_classes)


# ---------------------------------------------------------------------------------------------------------
# The driver


def write_sweep_file(sweep: SweepConfig, objective: Objective) -> None:
    doc = {"sweep": sweep.to_dict(), "objective": dataclasses.asdict(objective)}
    storage.write_bytes(storage.join(sweep.out, SWEEP_FILE), json.dumps(doc, indent=2).encode())


def read_sweep_file(out: str) -> tuple[SweepConfig, Objective]:
    path = storage.join(storage.absolute(out), SWEEP_FILE)
    if not storage.exists(path):
        raise ValueError(f"--resume: {out} holds no sweep ({SWEEP_FILE} is missing); start it without --resume")
    doc = json.loads(storage.read_bytes(path))
    return SweepConfig.from_dict(doc["sweep"]), Objective(**doc["objective"])
