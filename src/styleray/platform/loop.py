"""The training loop around the StyleGAN2-ADA step: ticks, metrics, snapshots, resume.

Shared by the single-process ``styleray train`` and the Ray Train worker function: it reads as a table of
contents (build -> restore -> ticks -> report/checkpoint) and takes its batches and its reporting as
arguments, so it never imports Ray itself.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from styleray.config import RunConfig
from styleray.models import sampling
from styleray.models.training import StyleGAN2Trainer
from styleray.platform import checkpoint as ckpt_lib
from styleray.platform import storage

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
    """Running means of the step statistics over one tick."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            if v is None:
                continue
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


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

    is_chief: bool = True  # writes checkpoints, metrics and grids
    report: Callable[[dict[str, Any], str | None], None] | None = None  # (tick record, checkpoint uri or None)
    progress: bool = True  # show a progress bar (chief only)


def restore(trainer: StyleGAN2Trainer, sampler, run_dir: str, resume: str | None) -> ckpt_lib.Checkpoint | None:
    """Restore trainer (and sampler) from ``resume``: "latest" (the run's newest good checkpoint, or none),
    a checkpoint/run path, or None (fresh start)."""
    if resume is None:
        return None
    if resume == "latest":
        ck = ckpt_lib.load_latest(run_dir)
        if ck is None:
            return None
    else:
        ck = ckpt_lib.resolve(resume)
    trainer.load_state_dict(ck.state)
    if sampler is not None and ck.state.get("sampler") is not None and hasattr(sampler, "load_state_dict"):
        try:
            sampler.load_state_dict(json.loads(ck.state["sampler"]))
        except (ValueError, KeyError) as e:
            log.warning("data order not restored (%s); continuing with a fresh order", e)
    log.info("resumed from %s at %.3f kimg (augment p %.3f)", ck.uri, trainer.kimg, trainer.augment_p)
    return ck


def run_training(
    run: RunConfig,
    batches: BatchSource,
    *,
    resume: str | None = "latest",
    hooks: LoopHooks | None = None,
    trainer: StyleGAN2Trainer | None = None,
) -> dict[str, Any]:
    """Train until ``run.train.kimg``; returns a summary (final kimg, last checkpoint, last tick record).

    ``resume="latest"`` continues from the newest good checkpoint in ``run.out`` if there is one, so a
    restarted worker trains only the remaining kimg.
    """
    hooks = hooks or LoopHooks()
    cfg = run.train
    device = torch.device(run.device)
    run_dir = run.out
    if run_dir is None:
        raise ValueError("--out is required: the run folder for checkpoints and metrics")
    trainer = trainer or StyleGAN2Trainer(run.model, cfg, device)
    restored = restore(trainer, batches, run_dir, resume)
    target_nimg = int(round(cfg.kimg * 1000))
    tick_nimg = max(int(round(cfg.tick_kimg * 1000)), 1)
    tick = int(restored.meta.get("tick", 0)) if restored else 0
    last_ckpt = restored.uri if restored else None
    record: dict[str, Any] = {}

    if hooks.is_chief:
        storage.write_bytes(storage.join(run_dir, "config.json"), run.to_json().encode())

    bar = None
    if hooks.is_chief and hooks.progress:
        from tqdm import tqdm

        bar = tqdm(total=round(cfg.kimg, 3), initial=round(trainer.kimg, 3), unit="kimg", dynamic_ncols=True)

    def snapshot(record: dict[str, Any]) -> str | None:
        state = trainer.state_dict()  # collective in a process group: every rank calls it
        if hasattr(batches, "state_dict"):
            state["sampler"] = json.dumps(batches.state_dict())
        if not hooks.is_chief:
            return None
        uri = ckpt_lib.save_checkpoint(
            run_dir,
            state,
            config=run.to_dict(),
            meta={"cur_nimg": trainer.cur_nimg, "kimg": trainer.kimg, "tick": tick, "metrics": record},
            grid_png=sample_grid_png(trainer),
        )
        ckpt_lib.prune(run_dir, cfg.keep_checkpoints)
        return uri

    tick_start_nimg, tick_start_time = trainer.cur_nimg, time.time()
    stats = TickStats()
    while trainer.cur_nimg < target_nimg:
        images, labels = batches.next()
        real = to_tensor(images, device)
        c = torch.from_numpy(labels).to(device) if labels is not None else None
        stats.add(trainer.step(real, c))
        done = trainer.cur_nimg >= target_nimg
        if trainer.cur_nimg - tick_start_nimg < tick_nimg and not done:
            continue
        tick += 1
        elapsed = time.time() - tick_start_time
        nimg = trainer.cur_nimg - tick_start_nimg
        record = {
            "tick": tick,
            "kimg": trainer.kimg,
            "sec_per_kimg": elapsed / max(nimg / 1000, 1e-9),
            "img_per_sec": nimg / max(elapsed, 1e-9),
            "time": time.time(),
            "memory_mb": peak_memory_mb(device),
            **stats.means(),
        }
        uri = snapshot(record) if (tick % cfg.snap == 0 or done) else None
        last_ckpt = uri or last_ckpt
        if hooks.is_chief:
            storage.append_text(storage.join(run_dir, "metrics.jsonl"), json.dumps(record) + "\n")
            if bar is not None:
                bar.update(round(min(trainer.kimg, cfg.kimg) - bar.n, 3))
                bar.set_postfix(
                    G=f"{record.get('loss_G', float('nan')):.3f}",
                    D=f"{record.get('loss_D', float('nan')):.3f}",
                    p=f"{trainer.augment_p:.3f}",
                    s_kimg=f"{record['sec_per_kimg']:.1f}",
                )
        if hooks.report is not None:
            hooks.report(record, uri)
        stats = TickStats()
        tick_start_nimg, tick_start_time = trainer.cur_nimg, time.time()

    if bar is not None:
        bar.close()
    return {"kimg": trainer.kimg, "checkpoint": last_ckpt, "last": record, "trainer": trainer}
