"""Ray Tune sweeps over the Ray Train trainer (``styleray tune``).

    driver (run_sweep)                                 each trial (a Tune function trainable, 0.01 CPU)
    space.yaml -> param space; the objective:          train flags = the sweep's base settings + this
      FID/KID, or a proxy named as such                  trial's hyperparameters (the names of train flags)
    the dataset's reference statistics, once           ray_train.fit(): a (multi-)worker Ray Train run in
    Tuner(scheduler: ASHA | PBT | FIFO,                  OUT/trials/<trial id>/ with its own checkpoints,
          search: grid/random | optuna)                  FID/KID every --metrics-every ticks
    a progress line per trial report                   a Ray Train callback forwards each report; this
    OUT/results.csv, results.md, best_config.yaml        trial reports it to Tune (PBT: with a checkpoint)

The objective is stated wherever results are: ``fid``/``kid`` (Inception-v3, the standard), ``fid@NAME``
(another registered extractor), or the proxy ``pixel-fid``/``pixel-kid`` (Fréchet distance / KID of 8x8 RGB
thumbnails, see ``models/metrics/pixels.py``). ``--metric auto`` takes FID when the Inception weights are
found and otherwise the proxy, saying so and why; ``--metric fid`` without the weights is an error.

PBT: a trial reports, with each measured tick, a small Tune checkpoint that points at its styleray checkpoint.
When PBT makes a trial exploit a better one, Tune restarts it with the better trial's pointer and perturbed
hyperparameters; the trial then copies the better trial's checkpoint into its own run folder (its own are
set aside), records the copy in ``exploits.jsonl`` and resumes training from it.

An interrupted sweep continues with ``--resume`` (Tuner.restore): unfinished trials resume from the newest
checkpoint in their run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from styleray.platform import checkpoint as ckpt_lib
from styleray.platform import storage
from styleray.platform.tune_space import SearchSpace, load_space

log = logging.getLogger(__name__)

SCHEDULERS = ("asha", "pbt", "none")
SEARCHES = ("grid", "random", "optuna")
METRIC_CHOICES = ("auto", "fid", "kid", "pixel-fid", "pixel-kid")
TUNE_DIR = "tune"  # Ray Tune's experiment folder inside --out
TRIALS_DIR = "trials"  # one styleray run folder per trial inside --out
SWEEP_FILE = "sweep.json"  # the sweep's settings and objective (read back by --resume)
POINTER_FILE = "styleray_checkpoint.json"  # inside the Tune checkpoints of PBT trials
EXPLOITS_FILE = "exploits.jsonl"  # in a trial's run folder: every checkpoint it copied from another trial


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
    from styleray import cli
    from styleray.config_file import expand_config

    parser = cli.build_parser()
    argv = ["train", *sweep.base_flags, *hp_flags(hp), "--data", sweep.data, "--out", out,
            "--workers", str(sweep.workers_per_trial)]
    argv = expand_config(argv, "train", cli._subparser(parser, "train"))
    try:
        return cli._subparser(parser, "train").parse_args(argv[1:])
    except SystemExit:
        raise ValueError(f"bad train settings for a trial: {' '.join(argv[1:])}") from None


def trial_run_config(sweep: SweepConfig, hp: dict[str, Any], out: str, data_info):
    from styleray import cli

    args = train_args(sweep, hp, out)
    return cli.build_run_config(args, data_info.resolution, data_info.channels, data_info.num_classes)


# ---------------------------------------------------------------------------------------------------------
# The trial
# ---------------------------------------------------------------------------------------------------------


def _forwarder_class():
    """A Ray Train UserCallback that puts every report (rank 0's metrics, the checkpoint path) on a queue."""
    from ray.train.v2.api.callback import UserCallback

    class ForwardReports(UserCallback):
        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            self.queue.put(("report", dict(metrics[0]), checkpoint.path if checkpoint else None))

    return ForwardReports


def _copy_checkpoint(src: str, dst: str) -> None:
    """Copy a checkpoint folder (flat: state.pt, config.json, grid.png, meta.json); meta.json last, so the
    copy only loads once it is whole."""
    names = sorted(storage.listdir(src), key=lambda n: n == "meta.json")
    if "meta.json" not in names:
        raise ckpt_lib.CheckpointError(f"{src}: no meta.json (not a whole checkpoint)")
    for name in names:
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))


def adopt_checkpoint(run_dir: str, pointer: dict[str, Any], trial_id: str, hp: dict[str, Any]) -> str:
    """PBT exploit: set this trial's checkpoints aside and copy in the one the pointer names (another
    trial's). Returns the copy's URI; appends the evidence to exploits.jsonl."""
    src = pointer["checkpoint"]
    try:
        ckpt_lib.load_checkpoint(src)
    except ckpt_lib.CheckpointError:
        newest = ckpt_lib.load_latest(pointer["run_dir"])
        if newest is None:
            raise
        log.warning("%s is gone (pruned); copying %s of trial %s instead", src, newest.name, pointer["trial_id"])
        src = newest.uri
    old = ckpt_lib.checkpoints_dir(run_dir)
    if storage.exists(old):
        n = sum(1 for name in storage.listdir(run_dir) if name.startswith("superseded-"))
        storage.rename_dir(old, storage.join(run_dir, f"superseded-{n + 1}"))
    storage.remove(storage.join(run_dir, ckpt_lib.BEST_FILE))
    dst = storage.join(ckpt_lib.checkpoints_dir(run_dir), src.rstrip("/").rsplit("/", 1)[-1])
    _copy_checkpoint(src, dst)
    record = {"time": time.time(), "trial_id": trial_id, "from_trial": pointer["trial_id"], "from_checkpoint": src,
              "checkpoint": dst, "kimg": pointer.get("kimg"), "hyperparameters": hp}
    storage.append_text(storage.join(run_dir, EXPLOITS_FILE), json.dumps(record) + "\n")
    log.info("trial %s exploits trial %s: resumes from its %s with %s", trial_id, pointer["trial_id"], dst, hp)
    return dst


def _pointer_checkpoint(trial_id: str, run_dir: str, ckpt_uri: str, kimg: float):
    """A small Tune checkpoint that names the styleray checkpoint (Tune copies this, not the networks)."""
    from ray import tune

    folder = tempfile.mkdtemp(prefix="styleray-pointer-")
    with open(os.path.join(folder, POINTER_FILE), "w", encoding="utf-8") as f:
        json.dump({"trial_id": trial_id, "run_dir": run_dir, "checkpoint": ckpt_uri, "kimg": kimg}, f)
    return tune.Checkpoint.from_directory(folder), folder


def _read_pointer(checkpoint) -> dict[str, Any] | None:
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, POINTER_FILE)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)


def _tune_metrics(record: dict[str, Any], objective: Objective, trial_id: str, run_dir: str) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update(objective=objective.name, styleray_trial=trial_id, run_dir=run_dir)
    return out


def trial_main(config: dict[str, Any], sweep_dict: dict[str, Any], objective_dict: dict[str, Any], plan, data_info) -> None:
    """One trial: train with this config's hyperparameters and report every measured tick to Tune."""
    import shutil

    from ray import tune
    from ray.util.queue import Queue

    from styleray.platform import ray_train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sweep, objective = SweepConfig.from_dict(sweep_dict), Objective(**objective_dict)
    trial_id = tune.get_context().get_trial_id()
    run_dir = storage.join(sweep.out, TRIALS_DIR, trial_id)
    hp = {k: config[k] for k in sorted(config)}
    run = trial_run_config(sweep, hp, run_dir, data_info)

    restored = tune.get_checkpoint()
    pointer = _read_pointer(restored) if restored is not None else None
    if pointer is not None and pointer["trial_id"] != trial_id:
        adopt_checkpoint(run_dir, pointer, trial_id, hp)

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}
    options = ray_train.RayOptions(gpus=sweep.gpus, cpus_per_worker=sweep.cpus_per_worker, max_failures=1)

    def train() -> None:
        try:
            outcome["summary"] = ray_train.fit(
                run, data=data_info, resume="latest", options=options, metrics=plan,
                callbacks=[_forwarder_class()(queue)],
            )
        except BaseException as e:  # noqa: BLE001 - handed to the trial's thread, which raises it
            outcome["error"] = e
        finally:
            queue.put(("done", None, None))

    thread = threading.Thread(target=train, name="styleray-trial-fit", daemon=True)
    thread.start()
    while True:
        kind, record, ckpt_path = queue.get()
        if kind == "done":
            break
        if record.get(objective.key) is None:
            continue  # an unmeasured tick: schedulers compare measured ones only
        metrics = _tune_metrics(record, objective, trial_id, run_dir)
        if sweep.scheduler == "pbt" and ckpt_path is not None:
            uri = storage.join(ckpt_lib.checkpoints_dir(run_dir), ckpt_path.rstrip("/").rsplit("/", 1)[-1])
            checkpoint, folder = _pointer_checkpoint(trial_id, run_dir, uri, float(record["kimg"]))
            try:
                tune.report(metrics, checkpoint=checkpoint)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        else:
            tune.report(metrics)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


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


def _scheduler(sweep: SweepConfig, space: SearchSpace, max_ticks: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if sweep.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max(max_ticks, 1),
                             grace_period=min(sweep.grace_period, max(max_ticks, 1)), reduction_factor=2)
    if sweep.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=sweep.perturbation_interval,
            hyperparam_mutations=space.pbt_mutations(),
            quantile_fraction=0.5,
            resample_probability=0.25,
            synch=False,
        )
    return FIFOScheduler()


def _searcher(sweep: SweepConfig, objective: Objective):
    if sweep.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:  # pragma: no cover - optuna is a dependency
            raise ValueError(f"--search optuna needs the optuna package ({e})") from None
        return OptunaSearch(metric=objective.key, mode="min", seed=sweep.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed)


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
    max_ticks = math.ceil(probe.train.kimg / probe.train.tick_kimg)
    trainable = tune.with_resources(
        tune.with_parameters(trial_main, sweep_dict=sweep.to_dict(), objective_dict=dataclasses.asdict(objective),
                             plan=plan, data_info=data_info),
        {"CPU": 0.01},
    )
    tune_path = storage.join(out, TUNE_DIR)
    concurrent = _max_concurrent(sweep)
    if resume:
        if not tune.Tuner.can_restore(tune_path):
            raise ValueError(f"--resume: {tune_path} holds no Tune state to restore; start the sweep without --resume")
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        grid = space.grid_size() if sweep.search != "optuna" else 1
        log.info("%d trial(s) (%s search, %s scheduler), %d at a time, %d worker(s) each, objective %s",
                 sweep.trials * grid, sweep.search, sweep.scheduler, concurrent, sweep.workers_per_trial,
                 objective.name)
        tuner = tune.Tuner(
            trainable,
            param_space=space.tune_space(sweep.search),
            tune_config=tune.TuneConfig(
                metric=objective.key,
                mode="min",
                num_samples=1 if sweep.search == "grid" else sweep.trials,
                scheduler=_scheduler(sweep, space, max_ticks),
                search_alg=_searcher(sweep, objective),
                max_concurrent_trials=concurrent,
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
