"""The phases of one StyleGAN2-ADA training iteration: one small class per phase, each knowing what it trains.

    Gmain (every step)  non-saturating loss on D(aug(G(z)))                                trains G
    Greg  (every 4)     path length regularisation, weighted by the interval (lazy)        trains G
    Dmain (every step)  logistic loss on fakes and reals; r_t statistics for ADA           trains D
    Dreg  (every 16)    R1 on augmented reals, weighted by the interval; r_t statistics    trains D

A phase accumulates gradients one round (micro-batch) at a time, as the reference's loss does:
``accumulate(trainer, round, gain)`` runs one round's forward and backward passes (its mean loss times
``gain``, the phase's interval) and returns the round's statistics. The trainer zeroes the gradients before
the first round, and averages them over the workers and steps the optimizer after the last. So k rounds sum
k per-round means, like the reference (Adam's update does not depend on that scale, up to its epsilon).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from styleray.config import TrainConfig
from styleray.models import loss as L


class Trainer(Protocol):
    """What a phase uses of the trainer (training.StyleGAN2Trainer)."""

    cfg: TrainConfig
    pl_mean: torch.Tensor  # [] this worker's running mean of path lengths, updated in place

    def run_G(self, z: torch.Tensor, c: torch.Tensor | None, main: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def run_D(self, img: torch.Tensor, c: torch.Tensor | None, main: bool = False) -> torch.Tensor:
        ...

    def run_D_input_grad(self, img: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def count_real_logits(self, logits: torch.Tensor) -> None:
        ...


@dataclass(frozen=True)
class Round:
    """One micro-batch of a phase on one worker."""

    real_img: torch.Tensor  # [n, C, H, W] real images in [-1, 1]
    real_c: torch.Tensor | None  # [n, c_dim] their labels; None = unconditional
    gen_z: torch.Tensor  # [n, z_dim] latents to generate from
    gen_c: torch.Tensor | None  # [n, c_dim] labels to generate with; None = unconditional


class Phase:
    """A phase of the iteration: runs every ``interval`` iterations and trains G or D."""

    name: ClassVar[str]
    trains_generator: ClassVar[bool]  # True: G's gradients and optimizer; False: D's

    def __init__(self, interval: int = 1):  # interval: iterations between runs; also the loss weight (lazy reg.)
        self.interval = interval

    def __repr__(self) -> str:
        return f"{type(self).__name__}(interval={self.interval})"

    def is_due(self, batch_idx: int) -> bool:
        return batch_idx % self.interval == 0

    def accumulate(self, trainer: Trainer, rnd: Round, gain: int) -> dict[str, torch.Tensor]:
        """Backward of one round's loss times ``gain``; returns the round's statistics (detached scalars)."""
        raise NotImplementedError


class GeneratorMain(Phase):
    name, trains_generator = "Gmain", True

    def accumulate(self, trainer, rnd, gain):
        img, _ = trainer.run_G(rnd.gen_z, rnd.gen_c, main=True)
        logits = trainer.run_D(img, rnd.gen_c, main=True)
        loss = L.nonsaturating_g_loss(logits)
        (loss.mean() * gain).backward()
        return {"loss_G": loss.detach().mean(), "scores_fake": logits.detach().mean()}


class GeneratorPathLength(Phase):
    name, trains_generator = "Greg", True

    def accumulate(self, trainer, rnd, gain):
        cfg = trainer.cfg
        n = max(rnd.gen_z.shape[0] // cfg.pl_batch_shrink, 1)  # the reference's round // shrink, at least 1
        img, ws = trainer.run_G(rnd.gen_z[:n], None if rnd.gen_c is None else rnd.gen_c[:n])
        # Contiguous: the penalty draws randn_like(img), whose values follow the memory layout; this keeps the
        # random draw (and so the run) the same with channels-last activations or without.
        img = img.contiguous()
        # This worker's running mean moves once per round, and the batch mean stays in the graph (reference).
        penalty, new_mean = L.path_length_penalty(img, ws, trainer.pl_mean, cfg.pl_decay)
        trainer.pl_mean.copy_(new_mean.detach())
        loss = img[:, 0, 0, 0] * 0 + penalty * cfg.pl_weight
        (loss.mean() * gain).backward()
        return {"pl_penalty": penalty.detach().mean()}


class DiscriminatorMain(Phase):
    name, trains_generator = "Dmain", False

    def accumulate(self, trainer, rnd, gain):
        with torch.no_grad():
            fake_img, _ = trainer.run_G(rnd.gen_z, rnd.gen_c, main=True)
        fake_logits = trainer.run_D(fake_img, rnd.gen_c, main=True)
        loss_fake = L.d_fake_loss(fake_logits)
        (loss_fake.mean() * gain).backward()  # before the reals' pass, so their graphs never coexist
        real_logits = trainer.run_D(rnd.real_img, rnd.real_c, main=True)
        loss_real = L.d_real_loss(real_logits)
        (loss_real.mean() * gain).backward()
        trainer.count_real_logits(real_logits)
        real_logits = real_logits.detach()
        return {
            "loss_D": (loss_fake.detach() + loss_real.detach()).mean(),
            "scores_real": real_logits.mean(),
            "signs_real": real_logits.sign().mean(),
        }


class DiscriminatorR1(Phase):
    name, trains_generator = "Dreg", False

    def accumulate(self, trainer, rnd, gain):
        real = rnd.real_img.detach().requires_grad_(True)
        logits, grads = trainer.run_D_input_grad(real, rnd.real_c)
        penalty = L.r1_from_input_grad(grads)
        loss = logits * 0 + (penalty * (trainer.cfg.r1_gamma / 2))[:, None]
        (loss.mean() * gain).backward()
        trainer.count_real_logits(logits)  # the reference's r_t counts these reals too
        return {"r1_penalty": penalty.detach().mean()}
