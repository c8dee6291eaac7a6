"""One trial of a sweep (``styleray tune``): a Ray Tune class Trainable around ``ray_train.fit``.

    Tune                       SweepTrial (0.01 CPU)                 Ray Train (its own actors)
    step()          <-------   the next measured report   <-------   ForwardReports.after_report (controller)
    save_checkpoint()  ---->   a pointer to the newest measured styleray checkpoint (PBT)
    load_checkpoint()  ---->   another trial's pointer: PBT exploit, adopted before training starts
    cleanup()          ---->   controller.abort(): workers and their placement group released at once

``ray_train.fit`` runs in a thread of the trial; a Ray Train callback forwards every report through a queue
(size 1, so training waits while Tune decides). A stopped trial aborts its Ray Train run instead of leaving
it to Ray's placement-group cleaner, which cannot always tell the clusters of a machine apart.

PBT exploit: the trial sets its own checkpoints aside (``superseded-N/``, with its best.json and Ray Train's
snapshot), copies the better trial's checkpoint into ``checkpoints/`` (meta.json last), records the copy in
``exploits.jsonl`` and resumes from it with the perturbed hyperparameters.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import ray
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from styleray import storage
from styleray.platform import checkpoint as ckpt_lib
from styleray.platform.train import ray_train
from styleray.platform.tune.sweep import TRIALS_DIR, Objective, SweepConfig, SweepError, trial_run_config

log = logging.getLogger(__name__)

POINTER_FILE = "styleray_checkpoint.json"  # inside the Tune checkpoints of PBT trials
EXPLOITS_FILE = "exploits.jsonl"  # in a trial's run folder: every checkpoint it copied from another trial


class ForwardReports(UserCallback):
    """A Ray Train callback (it runs in the Train controller) that puts every report, rank 0's metrics and the
    checkpoint path, on the trial's queue; with the first one, the controller's handle (to abort it)."""

    def __init__(self, queue):
        self.queue = queue
        self.sent_handle = False

    def after_report(self, run_context, metrics, checkpoint):
        if not self.sent_handle:
            self.queue.put(("controller", ray.get_runtime_context().current_actor, None))
            self.sent_handle = True
        self.queue.put(("report", dict(metrics[0]), checkpoint.path if checkpoint else None))


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
    from styleray.platform.train.ray_train import TRAIN_SNAPSHOT

    old = ckpt_lib.checkpoints_dir(run_dir)
    if storage.exists(old):
        n = sum(1 for name in storage.listdir(run_dir) if name.startswith("superseded-"))
        aside = storage.join(run_dir, f"superseded-{n + 1}")
        if not storage.is_remote(aside):
            os.makedirs(aside, exist_ok=True)
        storage.rename_dir(old, storage.join(aside, ckpt_lib.CHECKPOINTS_DIR))
        for name in (ckpt_lib.BEST_FILE, TRAIN_SNAPSHOT):  # they name the checkpoints set aside
            if storage.exists(storage.join(run_dir, name)):
                storage.write_bytes(storage.join(aside, name), storage.read_bytes(storage.join(run_dir, name)))
                storage.remove(storage.join(run_dir, name))
    dst = storage.join(ckpt_lib.checkpoints_dir(run_dir), src.rstrip("/").rsplit("/", 1)[-1])
    _copy_checkpoint(src, dst)
    record = {"time": time.time(), "trial_id": trial_id, "from_trial": pointer["trial_id"], "from_checkpoint": src,
              "checkpoint": dst, "kimg": pointer.get("kimg"), "hyperparameters": hp}
    storage.append_text(storage.join(run_dir, EXPLOITS_FILE), json.dumps(record) + "\n")
    log.info("trial %s exploits trial %s: resumes from its %s with %s", trial_id, pointer["trial_id"], dst, hp)
    return dst


def _tune_metrics(record: dict[str, Any], objective: Objective, trial_id: str, run_dir: str) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update(objective=objective.name, styleray_trial=trial_id, run_dir=run_dir)
    return out


class SweepTrial(tune.Trainable):
    """The trial, a class Trainable: Tune calls step() for each measured tick and save/load_checkpoint for PBT,
    and cleanup() when it stops the trial, which aborts the Ray Train run so that its workers and their
    placement group are released at once (a function trainable's thread would just be abandoned)."""

    def setup(self, config, sweep_dict=None, objective_dict=None, plan=None, data_info=None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.sweep, self.objective = SweepConfig.from_dict(sweep_dict), Objective(**objective_dict)
        self.plan, self.data_info = plan, data_info
        self.run_dir = storage.join(self.sweep.out, TRIALS_DIR, self.trial_id)
        self.hp = {k: config[k] for k in sorted(config)}
        self.run = trial_run_config(self.sweep, self.hp, self.run_dir, data_info)
        self.target_kimg = self.run.train.kimg
        self.queue = None
        self.thread: threading.Thread | None = None
        self.outcome: dict[str, Any] = {}
        self.controller = None
        self.adopt: dict[str, Any] | None = None
        self.last: tuple[dict[str, Any], str | None] | None = None
        self.finished = False

    # --------------------------------------------------------------- PBT: pointers to styleray checkpoints

    def save_checkpoint(self, checkpoint_dir: str):
        if self.last is None or self.last[1] is None:
            return None
        record, uri = self.last
        with open(os.path.join(checkpoint_dir, POINTER_FILE), "w", encoding="utf-8") as f:
            json.dump({"trial_id": self.trial_id, "run_dir": self.run_dir, "checkpoint": uri,
                       "kimg": float(record["kimg"])}, f)
        return None

    def load_checkpoint(self, checkpoint):
        folder = checkpoint if isinstance(checkpoint, str) else None
        path = os.path.join(folder, POINTER_FILE) if folder else None
        if not path or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            pointer = json.load(f)
        if pointer["trial_id"] != self.trial_id:  # PBT exploit; our own pointer: the run folder has it all
            self.adopt = pointer

    # --------------------------------------------------------------- training

    def _start(self) -> None:

        if self.adopt is not None:
            adopt_checkpoint(self.run_dir, self.adopt, self.trial_id, self.hp)
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
        options = ray_train.RayOptions(gpus=self.sweep.gpus, cpus_per_worker=self.sweep.cpus_per_worker,
                                       max_failures=1)
        callbacks = [ForwardReports(self.queue)]

        def train() -> None:
            try:
                self.outcome["summary"] = ray_train.fit(self.run, data=self.data_info, resume="latest",
                                                        options=options, metrics=self.plan, callbacks=callbacks)
            except BaseException as e:  # noqa: BLE001 - raised by step() in the trial's thread
                self.outcome["error"] = e
            finally:
                self.queue.put(("done", None, None))

        self.thread = threading.Thread(target=train, name="styleray-trial-fit", daemon=True)
        self.thread.start()

    def step(self) -> dict[str, Any]:
        """The next measured report of the Ray Train run (started on the first call), or its end."""
        if self.thread is None:
            self._start()
        while True:
            kind, payload, ckpt_path = self.queue.get()
            if kind == "controller":
                self.controller = payload
            elif kind == "done":
                return self._finished()
            elif payload.get(self.objective.key) is not None:  # schedulers compare measured ticks only
                return self._measured(payload, ckpt_path)

    def _measured(self, record: dict[str, Any], ckpt_path: str | None) -> dict[str, Any]:
        uri = None
        if ckpt_path is not None:
            uri = storage.join(ckpt_lib.checkpoints_dir(self.run_dir), ckpt_path.rstrip("/").rsplit("/", 1)[-1])
        self.last = (record, uri)
        done = float(record["kimg"]) >= self.target_kimg - 1e-9
        self.finished = self.finished or done
        return {**_tune_metrics(record, self.objective, self.trial_id, self.run_dir), "done": done}

    def _finished(self) -> dict[str, Any]:
        self.thread.join()
        self.finished = True
        if "error" in self.outcome:
            raise self.outcome["error"]
        if self.last is None:
            raise SweepError(f"trial {self.trial_id} finished without measuring {self.objective.name}")
        return {**_tune_metrics(self.last[0], self.objective, self.trial_id, self.run_dir), "done": True}

    def cleanup(self) -> None:
        """Tune stops the trial (finished, ASHA, PBT exploit): abort a Ray Train run still going."""
        if self.thread is not None and self.finished:
            self.thread.join(timeout=60)  # the last tick is reported: the run is only wrapping up
        if self.thread is not None and self.thread.is_alive():
            if self.controller is not None:
                log.info("trial %s stopped: aborting its Ray Train run", self.trial_id)
                try:
                    ray.get(self.controller.abort.remote(), timeout=60)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # abort ends the controller's process: its reply never comes
            else:
                log.warning("trial %s stopped before its first report: its Ray Train run is left to Ray", self.trial_id)
            self.thread.join(timeout=30)
        if self.queue is not None:
            self.queue.shutdown()
