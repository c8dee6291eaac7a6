"""Training stability: spot a diverging GAN from its tick statistics, the way the seed did by eye.

Two signs, checked on the tick means averaged over every rank (so every rank reaches the same verdict):

- non-finite: a loss or penalty is NaN or Inf. The weights are poisoned; roll back at once.
- collapse: the discriminator loss has fallen below ``collapse_d_loss`` (D wins outright) while the
  generator loss climbs tick after tick. ``unstable_ticks`` consecutive collapsed ticks trigger a rollback;
  a single bad tick is normal GAN noise.

The loop rolls back to the last stable checkpoint (see ``loop.py``); this module only judges. Nothing here
imports torch or Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

# Tick statistics that must stay finite (the step reports them when their phase ran).
WATCHED = ("loss_G", "loss_D", "r1_penalty", "pl_penalty", "scores_fake", "scores_real")


class TrainingDiverged(RuntimeError):
    """Training became unstable more often than ``--max-rollbacks`` allows."""


@dataclass(frozen=True)
class Verdict:
    unstable: bool  # this tick is unstable (marked in metrics.jsonl)
    rollback: bool  # roll back now
    reason: str | None = None  # what was seen, for metrics and logs


@dataclass
class StabilityMonitor:
    unstable_ticks: int = 3  # consecutive collapsed ticks before a rollback
    collapse_d_loss: float = 0.05  # D loss below this counts as collapsed (with G loss climbing)
    streak: int = 0  # consecutive collapsed ticks so far
    prev_loss_g: float | None = None  # G loss of the previous tick

    @classmethod
    def from_config(cls, cfg) -> "StabilityMonitor":
        return cls(unstable_ticks=cfg.unstable_ticks, collapse_d_loss=cfg.collapse_d_loss)

    def observe(self, means: Mapping[str, Any]) -> Verdict:
        """Judge one tick from its (rank-averaged) statistics."""
        bad = [k for k in WATCHED if k in means and not math.isfinite(float(means[k]))]
        if bad:
            self.streak += 1
            return Verdict(True, True, f"non-finite {', '.join(bad)}")
        loss_g, loss_d = means.get("loss_G"), means.get("loss_D")
        climbing = loss_g is not None and self.prev_loss_g is not None and loss_g > self.prev_loss_g
        collapsed = loss_d is not None and loss_d < self.collapse_d_loss and climbing
        previous, self.prev_loss_g = self.prev_loss_g, loss_g
        if not collapsed:
            self.streak = 0
            return Verdict(False, False)
        self.streak += 1
        reason = (
            f"D loss {loss_d:.3g} < {self.collapse_d_loss:g} while G loss climbs {previous:.3g} -> {loss_g:.3g} "
            f"({self.streak}/{self.unstable_ticks} ticks)"
        )
        return Verdict(True, self.streak >= self.unstable_ticks, reason)

    @property
    def stable(self) -> bool:
        """No instability in progress: a checkpoint taken now is a rollback target."""
        return self.streak == 0

    def reset(self) -> None:
        """Forget the history (after a rollback the statistics start again)."""
        self.streak, self.prev_loss_g = 0, None
