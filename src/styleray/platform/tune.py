"""Ray Tune sweeps over the Ray Train trainer (``styleray tune``).

    driver (run_sweep)                                 each trial (a Tune class Trainable, 0.01 CPU)
    space.yaml -> param space; the objective:          train flags = the sweep's base settings + this
      FID/KID, or a proxy named as such                  trial's hyperparameters (the names of train flags)
    the dataset's reference statistics, once           ray_train.fit(): a (multi-)worker Ray Train run in
    Tuner(scheduler: ASHA | PBT | FIFO,                  OUT/trials/<trial id>/ with its own checkpoints,
          search: grid/random | optuna)                  FID/KID every --metrics-every ticks
    a progress line per trial report                   a Ray Train callback forwards each report; step()
    OUT/results.csv, results.md, best_config.yaml        returns the measured ones to Tune; cleanup() aborts
                                                         the Ray Train run of a stopped trial (ASHA, PBT)

The objective is stated wherever results are: ``fid``/``kid`` (Inception-v3, the standard), ``fid@NAME``
(another registered extractor), or the proxy ``pixel-fid``/``pixel-kid`` (Fréchet distance / KID of 8x8 RGB
thumbnails, see ``models/metrics/pixels.py``). ``--metric auto`` takes FID when the Inception weights are
found and otherwise the proxy, saying so and why; ``--metric fid`` without the weights is an error.

PBT: a trial's Tune checkpoint is a small pointer to its newest measured styleray checkpoint (Tune copies the
pointer, not the networks). When PBT makes a trial exploit a better one, Tune restarts it with the better
trial's pointer and perturbed hyperparameters; the trial then copies the better trial's checkpoint into its
own run folder (its own are set aside in ``superseded-N/``), records the copy in ``exploits.jsonl`` and
resumes training from it.

The trial itself (the Trainable, the PBT exploit) is in ``tune_trial.py``. An interrupted sweep continues
with ``--resume`` (Tuner.restore): unfinished trials resume from the newest checkpoint in their run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from styleray.platform import storage
from styleray.platform.tune_space import SearchSpace, load_space

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
    from styleray.platform.train_metrics import resolve_weights

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
    """A sweep: what to search, how, and the fixed settings every trial trains with."""

    data: str
    out: str
    space_file: str
    trials: int = 8  # samples (random, optuna) or grid repeats; every grid combination runs once per sample
    scheduler: str = "asha"
    search: str = "random"
    metric: str = "auto"
    workers_per_trial: int = 1
    cpus_per_worker: float | None = None  # None: ray_train's default (0.9 on CPU)
    gpus: bool = False
    max_concurrent: int | None = None  # None: as many trials as the cluster can place at once
    base_flags: tuple[str, ...] = ()  # fixed train flags of every trial (--preset, --kimg, --train-config ...)
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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["base_flags"] = list(self.base_flags)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepConfig":
        return cls(**dict(d, base_flags=tuple(d.get("base_flags", ()))))


# ---------------------------------------------------------------------------------------------------------
# Train flags of a trial
# ---------------------------------------------------------------------------------------------------------


def hp_flags(hp: dict[str, Any]) -> list[str]:
    """Train flags of a trial's hyperparameters: {"lr_g": 0.002, "mirror": True} -> ["--lr-g", "0.002", "--mirror"]."""
    flags: list[str] = []
    for key, value in hp.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        else:
            flags += [flag, repr(value) if isinstance(value, float) else str(value)]
    return flags


def train_args(sweep: SweepConfig, hp: dict[str, Any], out: str):
    """The parsed `styleray train` namespace of a trial (the same parser and checks as the command)."""
    import contextlib
    import io

    from styleray import cli

    argv = [*sweep.base_flags, *hp_flags(hp), "--data", sweep.data, "--out", out, "--workers", str(sweep.workers_per_trial)]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return cli._subparser(cli.build_parser(), "train").parse_args(argv)
    except SystemExit:
        reason = err.getvalue().strip().splitlines()[-1:] or ["invalid"]
        raise ValueError(f"bad train settings for the trials ({reason[0]}): train {' '.join(argv)}") from None


def trial_run_config(sweep: SweepConfig, hp: dict[str, Any], out: str, data_info):
    from styleray import cli

    args = train_args(sweep, hp, out)
    return cli.build_run_config(args, data_info.resolution, data_info.channels, data_info.num_classes)


# ---------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------


def _progress_callback(objective: Objective):
    from ray.tune import Callback

    class Progress(Callback):
        """One log line per trial report, with the best value so far."""

        def __init__(self):
            self.best: float | None = None

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(objective.key)
            if value is None:
                return
            self.best = value if self.best is None else min(self.best, value)
            log.info("trial %s  tick %d  kimg %.3f  %s %.4f  (best %.4f)  %s",
                     trial.trial_id, int(result.get("tick", 0)), result.get("kimg", 0.0), objective.name, value,
                     self.best, " ".join(f"{k}={trial.config[k]:.4g}" if isinstance(trial.config[k], float)
                                         else f"{k}={trial.config[k]}" for k in sorted(trial.config)))

    return Progress()


def _scheduler(sweep: SweepConfig, space: SearchSpace, max_reports: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if sweep.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max(max_reports, 1),
                             grace_period=min(sweep.grace_period, max(max_reports, 1)), reduction_factor=2)
    if sweep.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=sweep.perturbation_interval,
            hyperparam_mutations=space.pbt_mutations(),
            quantile_fraction=0.5,
            resample_probability=0.25,
            synch=sweep.pbt_sync,
        )
    return FIFOScheduler()


def _searcher(sweep: SweepConfig, objective: Objective, concurrent: int):
    if sweep.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:  # pragma: no cover - optuna is a dependency
            raise ValueError(f"--search optuna needs the optuna package ({e})") from None
        return OptunaSearch(metric=objective.key, mode="min", seed=sweep.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrent)


def _max_concurrent(sweep: SweepConfig) -> int:
    """Trials the cluster can run at once (each holds workers_per_trial workers)."""
    import ray

    from styleray.platform.ray_train import RayOptions, placeable_workers

    per_worker = RayOptions(gpus=sweep.gpus, cpus_per_worker=sweep.cpus_per_worker).resources_per_worker()
    fits, _ = placeable_workers(per_worker)
    fit_trials = fits // sweep.workers_per_trial
    if fit_trials < 1:
        raise ValueError(
            f"--workers-per-trial {sweep.workers_per_trial} x {per_worker} does not fit the cluster "
            f"({ray.cluster_resources()}): lower --workers-per-trial or --cpus-per-worker"
        )
    return min(fit_trials, sweep.max_concurrent or fit_trials)


def _write_sweep_file(sweep: SweepConfig, objective: Objective) -> None:
    doc = {"sweep": sweep.to_dict(), "objective": dataclasses.asdict(objective)}
    storage.write_bytes(storage.join(sweep.out, SWEEP_FILE), json.dumps(doc, indent=2).encode())


def read_sweep_file(out: str) -> tuple[SweepConfig, Objective]:
    path = storage.join(storage.absolute(out), SWEEP_FILE)
    if not storage.exists(path):
        raise ValueError(f"--resume: {out} holds no sweep ({SWEEP_FILE} is missing); start it without --resume")
    doc = json.loads(storage.read_bytes(path))
    return SweepConfig.from_dict(doc["sweep"]), Objective(**doc["objective"])


def run_sweep(sweep: SweepConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or with resume, continue) a sweep; writes the results and returns their summary."""
    from ray import tune

    from styleray.datasets.ray_reader import inspect_dataset
    from styleray.platform import ray_train, train_metrics
    from styleray.platform.tune_results import write_results
    from styleray.platform.tune_trial import trainable_class

    out = storage.absolute(sweep.out)
    if resume:
        saved, objective = read_sweep_file(out)
        log.info("resuming the sweep in %s with its saved settings (%s)", out, SWEEP_FILE)
        sweep = saved
    else:
        sweep = dataclasses.replace(sweep, out=out, data=storage.absolute(sweep.data))
        if storage.exists(storage.join(out, SWEEP_FILE)):
            raise ValueError(f"--out {out} already holds a sweep: pass --resume to continue it, or give a new --out")
        objective = resolve_objective(sweep.metric, sweep.extractor, sweep.inception)
    space = load_space(sweep.space_file)
    space.check_search(sweep.search, sweep.scheduler)
    data_info = inspect_dataset(sweep.data, storage.pyarrow_filesystem(sweep.data)[0])
    probe = trial_run_config(sweep, {p.key: p.values[0] for p in space.params}, storage.join(out, TRIALS_DIR, "probe"),
                             data_info)  # the base settings are checked here, before any trial starts
    storage.check_writable(out, "--out")
    log.info("objective: %s", objective.describe())
    print(f"sweep objective: {objective.describe()}", flush=True)

    log.info(ray_train.connect())
    options = train_metrics.MetricsOptions(metrics=("fid", "kid"), every=sweep.metrics_every, num_gen=sweep.num_gen,
                                           extractor=objective.extractor, weights=objective.weights)
    plan = train_metrics.prepare(options, data_info, probe.model.resolution, probe.model.img_channels)
    if not resume:
        _write_sweep_file(sweep, objective)
    max_reports = math.ceil(math.ceil(probe.train.kimg / probe.train.tick_kimg - 1e-9) / sweep.metrics_every)
    trainable = tune.with_resources(
        tune.with_parameters(trainable_class(), sweep_dict=sweep.to_dict(),
                             objective_dict=dataclasses.asdict(objective), plan=plan, data_info=data_info),
        {"CPU": 0.01},
    )
    tune_path = storage.join(out, TUNE_DIR)
    concurrent = _max_concurrent(sweep)
    if resume:
        if not tune.Tuner.can_restore(tune_path):
            raise ValueError(f"--resume: {tune_path} holds no Tune state to restore; start the sweep without --resume")
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        log.info("%d trial(s) (%s search%s, %s scheduler), %d at a time, %d worker(s) each, objective %s",
                 space.num_trials(sweep.search, sweep.trials), sweep.search,
                 ": every combination once, --trials does not apply" if sweep.search == "grid" else "",
                 sweep.scheduler, concurrent, sweep.workers_per_trial, objective.name)
        tuner = tune.Tuner(
            trainable,
            param_space=space.tune_space(sweep.search),
            tune_config=tune.TuneConfig(
                metric=objective.key,
                mode="min",
                num_samples=1 if sweep.search == "grid" else sweep.trials,
                scheduler=_scheduler(sweep, space, max_reports),
                search_alg=_searcher(sweep, objective, concurrent),
                max_concurrent_trials=concurrent if sweep.search == "optuna" else None,  # (the generator limits itself)
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=out,
                callbacks=[_progress_callback(objective)],
                failure_config=tune.FailureConfig(max_failures=1),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                verbose=1,
            ),
        )
    grid_results = tuner.fit()
    summary = write_results(out, grid_results, sweep, objective, space)
    print(f"sweep objective: {objective.describe()}", flush=True)
    return summary
