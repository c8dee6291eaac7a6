"""The training loop around the StyleGAN2-ADA step: ticks, metrics, snapshots, resume, rollback.

Shared by the single-process ``styleray train --no-ray`` and the Ray Train worker function: it reads as a
table of contents (build -> restore -> ticks -> report/checkpoint) and takes its batches and its reporting as
arguments, so it never imports Ray itself. Inside a torch process group every rank runs it: tick statistics
are averaged over the ranks (so every rank judges stability the same way), snapshots gather every rank's
state and check that the replicas still hold identical weights, and only the chief writes files:

    RUN/config.json          the resolved RunSpec
    RUN/metrics.jsonl        one line per tick: kimg, sec/kimg, img/s, step_sec (the part of the tick spent
                             in the training step; the rest is data and reporting), losses, penalties, ADA p
                             and r_t, memory, resumed_kimg, rollbacks, and unstable/unstable_reason/rollback_to
    RUN/checkpoints/ckpt-N/  every --snap ticks (checkpoint.py); the newest --keep plus best and last good
    RUN/grids/ckpt-N.png     the sample grid of every snapshot (fixed seeds)
    RUN/best.json            the best stable checkpoint: lowest FID when ticks are measured (--metrics;
                             every measured tick also writes a checkpoint), else the newest
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist

from styleray.config import RunSpec
from styleray.models import sampling
from styleray.models.training import StyleGAN2Trainer
from styleray.platform import checkpoint as ckpt_lib
from styleray import storage
from styleray.platform.train.stability import StabilityMonitor, TrainingDiverged
from styleray.platform.train.transfer import start_from_source

log = logging.getLogger(__name__)

GRID_SEEDS = 32  # the sample grid always shows seeds 0..GRID_SEEDS-1 (fixed, so snapshots compare)


class BatchSource(Protocol):
    def next(self) -> tuple[np.ndarray, np.ndarray | None]: ...  # uint8 [B, H, W, C], one-hot [B, K] or None


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float [B, C, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def sample_grid_png(trainer: StyleGAN2Trainer, class_names: int = 0) -> bytes:
    """PNG of G_ema at the fixed grid seeds (classes cycled for a conditional model)."""
    G = trainer.G_ema
    n = GRID_SEEDS if G.img_resolution <= 128 else 16
    seeds = list(range(n))
    if G.c_dim > 0:
        imgs = np.concatenate(
            [sampling.generate_images(G, [s], class_idx=s % G.c_dim, noise_mode="const") for s in seeds]
        )
    else:
        imgs = sampling.generate_images(G, seeds, noise_mode="const")
    grid = sampling.image_grid(imgs, cols=int(math.ceil(math.sqrt(n))) if n != 32 else 8)
    buf = io.BytesIO()
    sampling.to_pil(grid).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class TickStats:
    """Running means of the step statistics over one tick. The step's values may be tensors on the device:
    they are summed there and read on the host once, by ``means()`` at the end of the tick."""

    sums: dict[str, Any] = field(default_factory=dict)  # float or 0-dim tensor
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, stats: dict[str, Any]) -> None:
        for k, v in stats.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.detach().to(torch.float64)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        keys = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        values = dict(zip(keys, torch.stack([self.sums[k] for k in keys]).tolist())) if keys else {}  # one sync
        return {k: float(values.get(k, self.sums[k])) / self.counts[k] for k in self.sums}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - non-Linux
        return float("nan")


@dataclass
class LoopHooks:
    """What differs between a single process and a Ray Train worker."""

    is_chief: bool = True  # writes checkpoints, metrics, best.json and grids
    report: Callable[[dict[str, Any], str | None], None] | None = None  # (tick record, checkpoint uri or None)
    progress: bool = True  # show a progress bar (chief only)
    # G_ema -> {fid, kid, ...} added to the tick record (train_metrics.TickEvaluator); called on every rank
    evaluate: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    evaluate_every: int = 1  # ticks between evaluations (the last tick is always evaluated)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_over_ranks(means: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average tick statistics over the process group (identical keys on every rank: phases are in step)."""
    _, world = _world()
    if world == 1 or not means:
        return means
    keys = sorted(means)
    t = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world).tolist()))


# Per-rank running statistics that are allowed to differ (the reference's check_ddp_consistency ignores the
# same): w_avg tracks each rank's own latents.
_PER_RANK = re.compile(r".*\.[^.]+_(avg|ema)$")


def replica_digests(state: dict[str, Any]) -> list[str]:
    """SHA-256 of this rank's G, D and G_ema weights (all but per-rank running averages), gathered from every
    rank (collective). All equal = the replicas are in sync."""
    h = hashlib.sha256()
    for net in ("G", "D", "G_ema"):
        for name, tensor in sorted(state[net].items()):
            if _PER_RANK.match(name):
                continue
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()[:16]
    _, world = _world()
    if world == 1:
        return [digest]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, digest)
    return gathered


# How the model runs, not what it is: a run may resume on another card (--precision auto: fp16 on a V100, bf16
# on an A100) or on the CPU.
RUNTIME_MODEL_FIELDS = frozenset({"mixed_precision"})


def _check_model_matches(ck: ckpt_lib.Checkpoint, trainer: StyleGAN2Trainer) -> None:
    saved, ours = ck.state.get("model_cfg") or {}, dataclasses.asdict(trainer.model_cfg)
    diff = {k: (saved.get(k), v) for k, v in ours.items()
            if k in saved and saved[k] != v and k not in RUNTIME_MODEL_FIELDS}
    if diff:
        listed = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"--resume {ck.uri}: the checkpoint's model differs from this run's ({listed}); "
            "resume with the same --preset/--resolution/--cond, or train into a new --out"
        )


def _check_frozen_layers_match(ck: ckpt_lib.Checkpoint, trainer: StyleGAN2Trainer) -> None:
    saved = int(((ck.config or {}).get("train") or {}).get("freeze_d", 0))
    if saved != trainer.cfg.freeze_d:
        raise ValueError(
            f"--freeze-d {trainer.cfg.freeze_d}, but {ck.uri} was trained with --freeze-d {saved} (its optimizer "
            f"holds the other layers): resume with --freeze-d {saved}, or start a new run from it with --init-from"
        )


def restore(
    trainer: StyleGAN2Trainer, sampler, run_dir: str, resume: "str | ckpt_lib.Checkpoint | None"
) -> ckpt_lib.Checkpoint | None:
    """Restore trainer (and sampler) from ``resume``: "latest" (the run's newest good checkpoint, or none),
    a checkpoint/run path, an already loaded checkpoint, or None (fresh start)."""
    if resume is None:
        return None
    if isinstance(resume, ckpt_lib.Checkpoint):
        ck = resume
    elif resume == "latest":
        ck = ckpt_lib.load_latest(run_dir)
        if ck is None:
            return None
    else:
        ck = ckpt_lib.resolve(resume)
    _check_model_matches(ck, trainer)
    _check_frozen_layers_match(ck, trainer)
    trainer.load_state_dict(ck.state)
    if sampler is not None and ck.state.get("sampler") is not None and hasattr(sampler, "load_state_dict"):
        try:
            sampler.load_state_dict(json.loads(ck.state["sampler"]))
        except (ValueError, KeyError) as e:
            log.warning("data order not restored (%s); continuing with a fresh order", e)
    log.info("resumed from %s at %.3f kimg (augment p %.3f)", ck.uri, trainer.kimg, trainer.augment_p)
    return ck


class TrainingRun:
    """One process's share of a run: the trainer plus the bookkeeping around ticks, snapshots and rollbacks."""

    def __init__(self, run: RunSpec, batches: BatchSource, hooks: LoopHooks, trainer: StyleGAN2Trainer | None):
        if run.out is None:
            raise ValueError("--out is required: the run folder for checkpoints and metrics")
        self.run, self.cfg, self.batches, self.hooks = run, run.train, batches, hooks
        self.run_dir = run.out
        self.device = torch.device(run.device)
        self.rank, _ = _world()
        self.trainer = trainer or StyleGAN2Trainer(run.model, run.train, self.device)
        self.monitor = StabilityMonitor.from_config(run.train)
        self.tick = 0
        self.rollbacks = 0
        self.last_good: str | None = None  # name of the newest checkpoint taken while training was stable
        self.last_ckpt: str | None = None
        self.resumed_kimg = 0.0
        self.best = ckpt_lib.read_best(self.run_dir) if hooks.is_chief else None
        t = self.trainer
        log.info("rank %d on %s: %d images per worker per iteration in rounds of %d; precision %s (%s)", self.rank,
                 self.device, t.batch_per_worker, t.round_batch, t.precision.name, t.precision.reason)

    # ------------------------------------------------------------------ restore

    def restore(self, resume) -> None:
        """Continue from ``resume`` (see ``restore``); a run that starts now takes --init-from's weights."""
        ck = restore(self.trainer, self.batches, self.run_dir, resume)
        if ck is None:
            if self.run.init_from is not None:
                start_from_source(self.trainer, self.run.init_from)
            return
        self.tick = int(ck.meta.get("tick", 0))
        self.rollbacks = int(ck.meta.get("rollbacks", 0))
        self.last_good = ck.name if ck.meta.get("stable", True) else ck.meta.get("last_good")
        self.last_ckpt = ck.uri
        self.resumed_kimg = self.trainer.kimg

    # ------------------------------------------------------------------ ticks

    def tick_record(self, means: dict[str, float], nimg: int, elapsed: float, step_sec: float) -> dict[str, Any]:
        return {
            "tick": self.tick,
            "kimg": self.trainer.kimg,
            "sec_per_kimg": elapsed / max(nimg / 1000, 1e-9),
            "img_per_sec": nimg / max(elapsed, 1e-9),
            "step_sec": step_sec,  # of the tick's wall time, spent inside the training step
            "time": time.time(),
            "memory_mb": peak_memory_mb(self.device),
            "resumed_kimg": self.resumed_kimg,
            "rollbacks": self.rollbacks,
            "precision": self.trainer.precision.name,
            **means,
        }

    def publish(self, record: dict[str, Any], uri: str | None) -> None:
        """metrics.jsonl (chief) and the report hook (every rank: ray.train.report is a barrier)."""
        if self.hooks.is_chief:
            storage.append_text(storage.join(self.run_dir, "metrics.jsonl"), json.dumps(record) + "\n")
        if self.hooks.report is not None:
            self.hooks.report(record, uri)

    def end_tick(self, stats: TickStats, nimg: int, elapsed: float, step_sec: float, done: bool) -> dict[str, Any]:
        """Close a tick: statistics averaged over the ranks, the stability verdict (a rollback, or a measurement
        and a snapshot when due), metrics.jsonl and the report hook. Returns the tick's record."""
        self.tick += 1
        means = mean_over_ranks(stats.means(), self.device)
        record = self.tick_record(means, nimg, elapsed, step_sec)
        verdict = self.monitor.observe(means)
        if verdict.unstable:
            record.update(unstable=True, unstable_reason=verdict.reason)
        if verdict.rollback:
            record["rollback_to"] = self.last_good
            self.publish(record, None)
            self.rollback(verdict.reason or "unstable")
            return record
        measure = self.hooks.evaluate is not None and (self.tick % self.hooks.evaluate_every == 0 or done)
        if measure:  # collective: every rank evaluates its share of the images
            record.update(self.hooks.evaluate(self.trainer.G_ema))
        uri = None
        if self.tick % self.cfg.snap == 0 or done or measure:  # a measured model is kept: it may be the best
            uri = self.snapshot(record)
        self.last_ckpt = uri or self.last_ckpt
        self.publish(record, uri)
        return record

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, record: dict[str, Any]) -> str | None:
        state = self.trainer.state_dict()  # collective in a process group: every rank calls it
        replicas = replica_digests(state)  # collective too
        if len(set(replicas)) != 1:
            raise RuntimeError(f"replicas hold different weights at tick {self.tick}: {replicas}")
        stable = self.monitor.stable
        name = ckpt_lib.checkpoint_name(self.trainer.cur_nimg)
        if stable:
            self.last_good = name
        if hasattr(self.batches, "state_dict"):
            state["sampler"] = json.dumps(self.batches.state_dict())
        if not self.hooks.is_chief:
            return None
        meta = {
            "cur_nimg": self.trainer.cur_nimg,
            "kimg": self.trainer.kimg,
            "tick": self.tick,
            "metrics": record,
            "stable": stable,
            "last_good": self.last_good,
            "rollbacks": self.rollbacks,
            "replicas": replicas,
        }
        grid = sample_grid_png(self.trainer)
        uri = ckpt_lib.save_checkpoint(self.run_dir, state, config=self.run.to_dict(), meta=meta, grid_png=grid)
        # grids/ keeps every snapshot's samples (pruning removes checkpoints, not the history to look at)
        storage.write_bytes(storage.join(self.run_dir, "grids", f"{name}.png"), grid)
        if stable:
            self._update_best(name, uri, record)
        protect = {n for n in (self.last_good, (self.best or {}).get("checkpoint")) if n}
        ckpt_lib.prune(self.run_dir, self.cfg.keep_checkpoints, protect=protect)
        return uri

    def _update_best(self, name: str, uri: str, record: dict[str, Any]) -> None:
        """best.json: the stable checkpoint with the lowest FID when ticks carry one, else the newest stable."""
        fid = record.get("fid")
        if self.best and self.best.get("criterion") == "fid" and (fid is None or self.best["value"] <= fid):
            return  # a measured best stays until a lower FID: unmeasured snapshots never replace it
        self.best = {
            "checkpoint": name,
            "uri": uri,
            "kimg": self.trainer.kimg,
            "tick": self.tick,
            "criterion": "fid" if fid is not None else "newest-stable",
            "value": fid,
        }
        ckpt_lib.write_best(self.run_dir, self.best)

    # ------------------------------------------------------------------ rollback

    def rollback(self, reason: str) -> None:
        """Return every rank to the last stable checkpoint (or to a fresh start), reseeded so the same
        trajectory is not replayed; TrainingDiverged once --max-rollbacks is spent."""
        self.rollbacks += 1
        if self.rollbacks > self.cfg.max_rollbacks:
            raise TrainingDiverged(
                f"training became unstable ({reason}) and --max-rollbacks {self.cfg.max_rollbacks} is spent; "
                f"the last stable checkpoint is {self.last_good or 'none'} (see best.json). "
                "Try a lower --lr or a higher --gamma, then --resume from it"
            )
        target = storage.join(ckpt_lib.checkpoints_dir(self.run_dir), self.last_good) if self.last_good else None
        ck = ckpt_lib.load_preferred(target, self.run_dir) if target else None
        if ck is not None:
            self.trainer.load_state_dict(ck.state)
            self.tick, self.last_good, self.last_ckpt = int(ck.meta.get("tick", 0)), ck.name, ck.uri
        else:
            self.trainer = StyleGAN2Trainer(self.run.model, self.cfg, self.device)
            if self.run.init_from is not None:  # the run's start was the source's weights
                start_from_source(self.trainer, self.run.init_from)
            self.tick, self.last_good, self.last_ckpt = 0, None, None
        self.trainer.reseed(self.cfg.seed * 1000 + self.rank + 7919 * self.rollbacks)
        self.monitor.reset()
        if self.hooks.is_chief:
            keep = ck.name if ck is not None else ""
            for uri in ckpt_lib.discard_newer(self.run_dir, keep):
                log.warning("discarded %s (taken after the last stable checkpoint)", uri)
            if self.best and self.best["checkpoint"] > keep:
                self.best = None
                storage.remove(storage.join(self.run_dir, ckpt_lib.BEST_FILE))
        log.warning(
            "unstable (%s): rolled back to %s at %.3f kimg (rollback %d of at most %d)",
            reason, ck.uri if ck else "a fresh start", self.trainer.kimg, self.rollbacks, self.cfg.max_rollbacks,
        )


def run_training(
    run: RunSpec,
    batches: BatchSource,
    *,
    resume: "str | ckpt_lib.Checkpoint | None" = "latest",
    hooks: LoopHooks | None = None,
    trainer: StyleGAN2Trainer | None = None,
) -> dict[str, Any]:
    """Train until ``run.train.kimg``; returns a summary (final kimg, last checkpoint, last tick record, ...).

    ``resume="latest"`` continues from the newest good checkpoint in ``run.out`` if there is one, so a
    restarted worker trains only the remaining kimg. Raises TrainingDiverged when instability outlasts
    ``--max-rollbacks``.
    """
    hooks = hooks or LoopHooks()
    tr = TrainingRun(run, batches, hooks, trainer)
    tr.restore(resume)
    started_at = time.time()
    if hooks.is_chief:
        storage.write_bytes(storage.join(tr.run_dir, "config.json"), run.to_json().encode())
    bar = _progress_bar(run.train.kimg, tr.trainer.kimg) if hooks.is_chief and hooks.progress else None
    try:
        record, first_step_at = _train_ticks(tr, int(round(run.train.kimg * 1000)), bar)
    finally:
        if bar is not None:
            bar.close()
    return {
        "kimg": tr.trainer.kimg,
        "checkpoint": tr.last_ckpt,
        "last": record,
        "trainer": tr.trainer,
        "resumed_kimg": tr.resumed_kimg,
        "rollbacks": tr.rollbacks,
        "best": tr.best,
        "started_at": started_at,
        "first_step_at": first_step_at,
    }


def _train_ticks(tr: TrainingRun, target_nimg: int, bar) -> tuple[dict[str, Any], float | None]:
    """Steps until ``target_nimg``, closing a tick every --tick kimg (and at the end); returns the last tick's
    record and when the first step ended."""
    tick_nimg = max(int(round(tr.cfg.tick_kimg * 1000)), 1)
    record: dict[str, Any] = {}
    first_step_at = None
    tick_start_nimg, tick_start_time, step_sec = tr.trainer.cur_nimg, time.time(), 0.0
    stats = TickStats()
    while tr.trainer.cur_nimg < target_nimg:
        images, labels = tr.batches.next()
        real = to_tensor(images, tr.device)
        c = torch.from_numpy(labels).to(tr.device) if labels is not None else None
        step_start = time.perf_counter()
        stats.add(tr.trainer.step(real, c))
        step_sec += time.perf_counter() - step_start
        first_step_at = first_step_at or time.time()
        done = tr.trainer.cur_nimg >= target_nimg
        if tr.trainer.cur_nimg - tick_start_nimg < tick_nimg and not done:
            continue
        record = tr.end_tick(stats, tr.trainer.cur_nimg - tick_start_nimg, time.time() - tick_start_time, step_sec,
                             done)
        _show(bar, tr, record)
        stats = TickStats()
        tick_start_nimg, tick_start_time, step_sec = tr.trainer.cur_nimg, time.time(), 0.0
    return record, first_step_at


def _progress_bar(target_kimg: float, kimg: float):
    """A kimg progress bar; none where tqdm is not installed (a bare GPU machine: the tick log lines remain)."""
    try:
        from tqdm import tqdm
    except ImportError:
        log.info("no progress bar: tqdm is not installed")
        return None

    return tqdm(total=round(target_kimg, 3), initial=round(kimg, 3), unit="kimg", dynamic_ncols=True)


def _show(bar, tr: TrainingRun, record: dict[str, Any]) -> None:
    if bar is None:
        return
    bar.n = round(min(tr.trainer.kimg, tr.cfg.kimg), 3)
    bar.set_postfix(
        G=f"{record.get('loss_G', float('nan')):.3f}",
        D=f"{record.get('loss_D', float('nan')):.3f}",
        p=f"{tr.trainer.augment_p:.3f}",
        s_kimg=f"{record['sec_per_kimg']:.1f}",
    )
    bar.refresh()
