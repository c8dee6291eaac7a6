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

The trial itself (the Trainable, the PBT exploit) is in ``trial.py``. An interrupted sweep continues
with ``--resume`` (Tuner.restore): unfinished trials resume from the newest checkpoint in their run folder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

from styleray import storage
from styleray.config import RunSpec
from styleray.platform.tune.space import SearchSpace, load_space
from styleray.platform.tune.sweep import (
    SWEEP_FILE,
    TRIALS_DIR,
    TUNE_DIR,
    Objective,
    SweepConfig,
    read_sweep_file,
    resolve_objective,
    trial_run_config,
    write_sweep_file,
)

log = logging.getLogger(__name__)


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

    from styleray.platform.train.ray_train import RayOptions, placeable_workers

    per_worker = RayOptions(gpus=sweep.gpus, cpus_per_worker=sweep.cpus_per_worker).resources_per_worker()
    fits, _ = placeable_workers(per_worker)
    fit_trials = fits // sweep.workers_per_trial
    if fit_trials < 1:
        raise ValueError(
            f"--workers-per-trial {sweep.workers_per_trial} x {per_worker} does not fit the cluster "
            f"({ray.cluster_resources()}): lower --workers-per-trial or --cpus-per-worker"
        )
    return min(fit_trials, sweep.max_concurrent or fit_trials)


def run_sweep(sweep: SweepConfig) -> dict[str, Any]:
    """Run a new sweep; writes the results and returns their summary."""
    out = storage.absolute(sweep.out)
    base = dict(sweep.base, data=storage.absolute(str(sweep.base.get("data") or "")))
    sweep = dataclasses.replace(sweep, out=out, base=base, space_file=os.path.abspath(sweep.space_file))
    if storage.exists(storage.join(out, SWEEP_FILE)):
        raise ValueError(f"--out {out} already holds a sweep: pass --resume to continue it, or give a new --out")
    objective = resolve_objective(sweep.metric, sweep.extractor, sweep.inception)
    return _sweep(sweep, objective, resume=False)


def resume_sweep(out: str) -> dict[str, Any]:
    """Continue the interrupted sweep in ``out`` with its saved settings (sweep.json)."""
    sweep, objective = read_sweep_file(storage.absolute(out))
    log.info("resuming the sweep in %s with its saved settings (%s)", sweep.out, SWEEP_FILE)
    return _sweep(sweep, objective, resume=True)


def _sweep(sweep: SweepConfig, objective: Objective, *, resume: bool) -> dict[str, Any]:
    """Check everything, prepare the objective's statistics once, run the Tuner, write the results."""
    from ray import tune

    from styleray.datasets.read.ray_data import inspect_dataset
    from styleray.platform.train import ray_train
    from styleray.platform.tune.results import write_results
    from styleray.platform.tune.trial import SweepTrial

    space = load_space(sweep.space_file)
    space.check_search(sweep.search, sweep.scheduler)
    data_info = inspect_dataset(sweep.data, storage.pyarrow_filesystem(sweep.data)[0])
    probe = trial_run_config(sweep, {p.key: p.values[0] for p in space.params},
                             storage.join(sweep.out, TRIALS_DIR, "probe"), data_info)  # checked before any trial
    storage.check_writable(sweep.out, "--out")
    log.info("objective: %s", objective.describe())
    print(f"sweep objective: {objective.describe()}", flush=True)
    log.info(ray_train.connect())
    plan = _metrics_plan(sweep, objective, data_info, probe)
    if not resume:
        write_sweep_file(sweep, objective)
    trainable = tune.with_resources(
        tune.with_parameters(SweepTrial, sweep_dict=sweep.to_dict(),
                             objective_dict=dataclasses.asdict(objective), plan=plan, data_info=data_info),
        {"CPU": 0.01},
    )
    tuner = _restored_tuner(sweep, trainable) if resume else _new_tuner(sweep, objective, space, probe, trainable)
    summary = write_results(sweep.out, tuner.fit(), sweep, objective, space)
    print(f"sweep objective: {objective.describe()}", flush=True)
    return summary


def _metrics_plan(sweep: SweepConfig, objective: Objective, data_info, probe: RunSpec):
    from styleray.platform.train import metrics as train_metrics

    options = train_metrics.MetricsOptions(metrics=("fid", "kid"), every=sweep.metrics_every, num_gen=sweep.num_gen,
                                           extractor=objective.extractor, weights=objective.weights)
    return train_metrics.prepare(options, data_info, probe.model.resolution, probe.model.img_channels)


def _restored_tuner(sweep: SweepConfig, trainable):
    from ray import tune

    tune_path = storage.join(sweep.out, TUNE_DIR)
    if not tune.Tuner.can_restore(tune_path):
        raise ValueError(f"--resume: {tune_path} holds no Tune state to restore; start the sweep without --resume")
    return tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True)


def _new_tuner(sweep: SweepConfig, objective: Objective, space: SearchSpace, probe: RunSpec, trainable):
    from ray import tune

    concurrent = _max_concurrent(sweep)
    max_reports = math.ceil(math.ceil(probe.train.kimg / probe.train.tick_kimg - 1e-9) / sweep.metrics_every)
    log.info("%d trial(s) (%s search%s, %s scheduler), %d at a time, %d worker(s) each, objective %s",
             space.num_trials(sweep.search, sweep.trials), sweep.search,
             ": every combination once, --trials does not apply" if sweep.search == "grid" else "",
             sweep.scheduler, concurrent, sweep.workers_per_trial, objective.name)
    return tune.Tuner(
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
            storage_path=sweep.out,
            callbacks=[_progress_callback(objective)],
            failure_config=tune.FailureConfig(max_failures=1),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
            verbose=1,
        ),
    )
