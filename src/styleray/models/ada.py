"""The ADA controller: tunes the augment pipe's probability p from the discriminator's overfitting heuristic.

Karras et al., "Training Generative Adversarial Networks with Limited Data" (NeurIPS 2020), section 3:
r_t = E[sign(D(real))] over the real logits the discriminator saw since the last adjustment (the reference
counts those of D main and of the R1 phase); p moves towards the value that keeps r_t at a target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from styleray.models.augment import AugmentPipe


class AdaController:
    """Adjusts `AugmentPipe.p` from the overfitting heuristic r_t = E[sign(D(real))].

    Every `interval` training steps: p += sign(r_t - target) * batch_size * interval / (ada_kimg * 1000),
    clamped at 0, so p can move from 0 to 1 in `ada_kimg` thousand images.
    """

    def __init__(
        self,
        batch_size: int,  # total batch size over all workers, images per training step
        target: float = 0.6,  # r_t the controller steers towards
        ada_kimg: float = 500,  # thousands of images for p to move by 1
        interval: int = 4,  # training steps between adjustments
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"AdaController(batch_size={batch_size}) must be >= 1")
        if not 0 <= target <= 1:
            raise ValueError(f"AdaController(target={target}) must be in [0, 1] (the paper uses 0.6)")
        if not ada_kimg > 0:
            raise ValueError(f"AdaController(ada_kimg={ada_kimg}) must be > 0 (the paper uses 500)")
        if interval < 1:
            raise ValueError(f"AdaController(interval={interval}) must be >= 1 (the paper uses 4)")
        self.batch_size = int(batch_size)
        self.target = float(target)
        self.ada_kimg = float(ada_kimg)
        self.interval = int(interval)
        self.last_r_t: torch.Tensor | float | None = None  # r_t of the latest adjustment (a tensor after `adjust`)
        self._signs_sum = torch.zeros([], dtype=torch.float64)  # sum of sign(D(real)) since the last adjustment
        self._signs_count = torch.zeros([], dtype=torch.float64)  # number of logits summed

    @property
    def adjustment(self) -> float:
        """Size of one p step."""
        return self.batch_size * self.interval / (self.ada_kimg * 1000)

    def accumulate(self, real_logits: torch.Tensor) -> None:
        """Adds sign statistics of the discriminator's logits on real images (any shape). No host sync."""
        signs = real_logits.detach().sign().to(torch.float64)
        self._signs_sum = self._signs_sum.to(signs.device) + signs.sum()
        self._signs_count = self._signs_count.to(signs.device) + signs.numel()

    def stats_tensor(self) -> torch.Tensor:
        """[sum, count] float64 on the device logits were accumulated on: all-reduce (sum) it across workers,
        then hand it back with `load_stats`."""
        return torch.stack([self._signs_sum, self._signs_count])

    def load_stats(self, stats: torch.Tensor) -> None:
        """Replaces the accumulated statistics with `stats` [sum, count] (e.g. all-reduced)."""
        if stats.shape != (2,):
            raise ValueError(f"AdaController.load_stats expects a [sum, count] tensor, got shape {tuple(stats.shape)}")
        stats = stats.detach().to(torch.float64)
        self._signs_sum, self._signs_count = stats[0].clone(), stats[1].clone()

    def is_due(self, batch_idx: int) -> bool:
        """Whether `step` adjusts p after `batch_idx` completed training steps."""
        return batch_idx > 0 and batch_idx % self.interval == 0

    def step(
        self,
        batch_idx: int,  # completed training steps, counted from 1 after the first
        pipe: AugmentPipe,
        all_reduce: Callable[[torch.Tensor], Any] | None = None,  # in-place sum across workers; None: one worker
    ) -> float | None:
        """`adjust`, read on the host: r_t as a float, or None when p was not adjusted (not due, or no logits
        accumulated)."""
        before = self.last_r_t
        r_t = self.adjust(batch_idx, pipe, all_reduce)
        if r_t is None:
            return None
        value = float(r_t)
        self.last_r_t = before if math.isnan(value) else value
        return None if math.isnan(value) else value

    def adjust(
        self, batch_idx: int, pipe: AugmentPipe, all_reduce: Callable[[torch.Tensor], Any] | None = None
    ) -> torch.Tensor | None:
        """Adjusts `pipe.p` when due and resets the statistics, on the device (no host sync). Returns r_t as a
        0-dim float64 tensor (NaN when no logits were accumulated; p then stays), or None when not due."""
        if not self.is_due(batch_idx):
            return None
        stats = self.stats_tensor()
        if all_reduce is not None:
            all_reduce(stats)
        total, count = stats.unbind()
        self.load_stats(torch.zeros(2, dtype=torch.float64, device=stats.device))
        r_t = total / count  # NaN for 0 / 0
        direction = torch.sign(r_t - self.target).nan_to_num(0.0).to(pipe.p.dtype)  # sign(r_t - target)
        with torch.no_grad():
            pipe.p.copy_((pipe.p + direction.to(pipe.p.device) * self.adjustment).clamp_min(0))
        previous = torch.full_like(r_t, math.nan) if self.last_r_t is None else torch.as_tensor(self.last_r_t)
        self.last_r_t = torch.where(count > 0, r_t, previous.to(r_t))
        return r_t

    def state_dict(self) -> dict[str, float | None]:
        """Plain floats (loadable with weights_only=True). p itself is in `AugmentPipe.state_dict()`."""
        total, count = self.stats_tensor().tolist()
        last = None if self.last_r_t is None else float(self.last_r_t)
        return {"signs_sum": total, "signs_count": count, "last_r_t": None if last is None or math.isnan(last) else last}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        missing = {"signs_sum", "signs_count", "last_r_t"} - set(state)
        if missing:
            raise KeyError(f"AdaController state is missing {sorted(missing)}")
        self.load_stats(torch.tensor([float(state["signs_sum"]), float(state["signs_count"])], dtype=torch.float64))
        self.last_r_t = None if state["last_r_t"] is None else float(state["last_r_t"])
