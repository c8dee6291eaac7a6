"""The StyleGAN2-ADA training step, on one device or inside an existing torch process group.

Knows nothing of Ray: the platform layer (Ray Train) or the single-process CLI drives it. One call to
``step(real, c)`` is one iteration of the reference's loop, in explicit phases:

    Gmain (every step)  non-saturating loss on D(aug(G(z)))
    Greg  (every 4)     path length regularisation, weighted by the interval (lazy regularisation)
    Dmain (every step)  logistic loss on fakes and reals; r_t statistics for ADA
    Dreg  (every 16)    R1 on augmented reals, weighted by the interval
    then                G_ema update, ADA p adjustment (every 4)

Gradients are averaged across ranks with one all-reduce per phase (what DDP would do, without wrapping the
networks, which keeps double backward and per-phase requires_grad simple). ``state_dict()`` holds everything
an exact resume needs: networks, optimizers, ADA p and statistics, path-length mean, counters and RNG state.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from styleray.config import ModelConfig, TrainConfig
from styleray.models import loss as L
from styleray.models.augment import AdaController, AugmentPipe
from styleray.models.networks import Discriminator, Generator, requires_grad
from styleray.models.transfer import freeze_discriminator_layers

log = logging.getLogger(__name__)

# Compiled graphs draw random numbers (the synthesis noise) from torch's generator, like eager mode: the same
# noise with or without compile, and an exact resume from the saved RNG state.
_COMPILE_OPTIONS = {"fallback_random": True}


@dataclass(frozen=True)
class Phase:
    name: str  # Gmain, Greg, Dmain, Dreg
    interval: int  # run when batch_idx % interval == 0; the loss is multiplied by it (lazy regularisation)


def lazy_adam_hparams(lr: float, betas: tuple[float, float], reg_interval: int | None) -> tuple[float, tuple]:
    """Learning rate and betas corrected for lazy regularisation (reference: mb_ratio = k / (k + 1))."""
    if reg_interval is None:
        return lr, tuple(betas)
    ratio = reg_interval / (reg_interval + 1)
    return lr * ratio, tuple(b**ratio for b in betas)


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class StyleGAN2Trainer:
    """Networks, optimizers, ADA and counters of one training run, and its step."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        device: str | torch.device = "cpu",
        *,
        channels_last: bool | None = None,  # NHWC activations and conv weights; None = the device's default.
        compile: bool = False,  # torch.compile the networks for the phases without double backward.
    ):
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.device = torch.device(device)
        if channels_last is None:
            channels_last = self.device.type == "cpu"  # measured faster on CPU (benchmarks/RESULTS.md)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.rank = dist.get_rank() if _dist_ready() else 0
        self.world_size = dist.get_world_size() if _dist_ready() else 1
        if self.world_size != train_cfg.workers:
            log.warning("process group has %d ranks but config says --workers %d", self.world_size, train_cfg.workers)
        self.batch_per_worker = train_cfg.batch // self.world_size
        self.global_batch = self.batch_per_worker * self.world_size

        # Same initial weights on every rank; different data and latents afterwards.
        torch.manual_seed(train_cfg.seed)
        self.G = Generator(model_cfg).to(self.device, memory_format=self.memory_format).train()
        self.D = Discriminator(model_cfg).to(self.device, memory_format=self.memory_format).train()
        freeze_discriminator_layers(self.D, train_cfg.freeze_d)  # FreezeD (--freeze-d): before the optimizer
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        # The networks as the main phases call them: compiled if asked. The regularisation phases take double
        # backward, which compiled graphs do not support, so they always call the eager modules.
        self._synthesis_main: Any = self.G.synthesis
        self._D_main: Any = self.D
        if compile:
            self._synthesis_main = torch.compile(self.G.synthesis, options=_COMPILE_OPTIONS)
            self._D_main = torch.compile(self.D, options=_COMPILE_OPTIONS)
        self.seed_everything(train_cfg.seed * 1000 + self.rank)

        self.augment_pipe: AugmentPipe | None = None
        self.ada: AdaController | None = None
        if train_cfg.augment != "noaug":
            self.augment_pipe = AugmentPipe().to(self.device).train()
            self.augment_pipe.p.copy_(torch.as_tensor(train_cfg.augment_p))
            if train_cfg.augment == "ada":
                self.ada = AdaController(
                    target=train_cfg.ada_target,
                    ada_kimg=train_cfg.ada_kimg,
                    interval=train_cfg.ada_interval,
                    batch_size=self.global_batch,
                )

        g_reg = train_cfg.pl_interval if train_cfg.pl_weight > 0 else None
        d_reg = train_cfg.r1_interval if train_cfg.r1_gamma > 0 else None
        self.phases = [Phase("Gmain", 1)]
        if g_reg:
            self.phases.append(Phase("Greg", g_reg))
        self.phases.append(Phase("Dmain", 1))
        if d_reg:
            self.phases.append(Phase("Dreg", d_reg))
        lr_g, betas_g = lazy_adam_hparams(train_cfg.lr_g, train_cfg.betas, g_reg)
        lr_d, betas_d = lazy_adam_hparams(train_cfg.lr_d, train_cfg.betas, d_reg)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr_g, betas=betas_g, eps=train_cfg.eps)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=betas_d, eps=train_cfg.eps)

        self.pl_mean = torch.zeros([], device=self.device)
        self.cur_nimg = 0  # images seen, over all ranks
        self.batch_idx = 0  # iterations done
        self.last_r_t: float | None = None

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @property
    def kimg(self) -> float:
        return self.cur_nimg / 1000.0

    @property
    def augment_p(self) -> float:
        return float(self.augment_pipe.p) if self.augment_pipe is not None else 0.0

    def _latents(self, n: int) -> torch.Tensor:
        return torch.randn([n, self.model_cfg.z_dim], device=self.device)

    def _fake_labels(self, real_c: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Labels for generated images: drawn from the real batch's labels (the dataset's distribution)."""
        if self.model_cfg.c_dim == 0:
            return None
        idx = torch.randint(0, real_c.shape[0], [n], device=self.device)
        return real_c[idx]

    def run_G(self, z: torch.Tensor, c: torch.Tensor | None, main: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """G(z, c) with style mixing regularisation; returns (images, ws). main: a phase without double backward."""
        ws = self.G.mapping(z, c, update_w_avg=True)  # [N, num_ws, w_dim]
        if self.cfg.style_mixing > 0:
            n, num_ws = ws.shape[:2]
            cutoff = torch.randint(1, num_ws, [], device=self.device)
            use_mix = torch.rand([], device=self.device) < self.cfg.style_mixing
            cutoff = torch.where(use_mix, cutoff, torch.full_like(cutoff, num_ws))
            ws2 = self.G.mapping(self._latents(n), c, update_w_avg=False)
            mix = torch.arange(num_ws, device=self.device)[None, :, None] >= cutoff
            ws = torch.where(mix, ws2, ws)
        return (self._synthesis_main if main else self.G.synthesis)(ws), ws

    def run_D(self, img: torch.Tensor, c: torch.Tensor | None, main: bool = False) -> torch.Tensor:
        if self.augment_pipe is not None and float(self.augment_pipe.p) > 0:
            img = self.augment_pipe(img)
        return (self._D_main if main else self.D)(img, c)

    def _sync_grads(self, module: torch.nn.Module) -> None:
        """Average gradients over ranks (one flat all-reduce) and scrub non-finite values."""
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            return
        if self.world_size > 1:
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat)
            flat /= self.world_size
            torch.nan_to_num(flat, nan=0.0, posinf=1e5, neginf=-1e5, out=flat)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        else:
            for p in params:
                torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)

    def _mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world_size
        return x

    # ------------------------------------------------------------------ phases

    def _phase_g_main(self, real_c) -> dict[str, float]:
        n = self.batch_per_worker
        c = self._fake_labels(real_c, n)
        img, _ = self.run_G(self._latents(n), c, main=True)
        logits = self.run_D(img, c, main=True)
        loss = L.nonsaturating_g_loss(logits).mean()
        loss.backward()
        return {"loss_G": loss.item(), "scores_fake": logits.mean().item()}

    def _phase_g_reg(self, real_c, gain: int) -> dict[str, float]:
        n = max(self.batch_per_worker // self.cfg.pl_batch_shrink, 1)
        img, ws = self.run_G(self._latents(n), self._fake_labels(real_c, n))
        # Contiguous: the penalty draws randn_like(img), whose values follow the memory layout; this keeps the
        # random draw (and so the run) the same with channels-last activations or without.
        img = img.contiguous()
        penalty, new_mean = L.path_length_penalty(img, ws, self.pl_mean, self.cfg.pl_decay, self._mean_over_ranks)
        self.pl_mean.copy_(new_mean.detach())
        loss = (img[:, 0, 0, 0] * 0 + penalty * self.cfg.pl_weight).mean()
        (loss * gain).backward()
        return {"pl_penalty": penalty.mean().item()}

    def _phase_d_main(self, real_img, real_c) -> dict[str, float]:
        n = self.batch_per_worker
        c = self._fake_labels(real_c, n)
        with torch.no_grad():
            fake_img, _ = self.run_G(self._latents(n), c, main=True)
        fake_logits = self.run_D(fake_img, c, main=True)
        real_logits = self.run_D(real_img, real_c, main=True)
        loss = L.d_fake_loss(fake_logits).mean() + L.d_real_loss(real_logits).mean()
        loss.backward()
        if self.ada is not None:
            self.ada.accumulate(real_logits.detach())
        return {
            "loss_D": loss.item(),
            "scores_real": real_logits.mean().item(),
            "signs_real": real_logits.sign().mean().item(),
        }

    def _phase_d_reg(self, real_img, real_c, gain: int) -> dict[str, float]:
        real = real_img.detach().requires_grad_(True)
        logits = self.run_D(real, real_c)
        penalty = L.r1_penalty(real, logits)
        loss = (logits * 0 + (penalty * (self.cfg.r1_gamma / 2))[:, None]).mean()
        (loss * gain).backward()
        return {"r1_penalty": penalty.mean().item()}

    # ------------------------------------------------------------------ the step

    def step(self, real_img: torch.Tensor, real_c: torch.Tensor | None = None) -> dict[str, float]:
        """One iteration on this rank's batch: real_img [B, C, H, W] in [-1, 1], real_c [B, c_dim] or None."""
        expected = (self.batch_per_worker, self.model_cfg.img_channels, self.model_cfg.resolution, self.model_cfg.resolution)
        if tuple(real_img.shape) != expected:
            raise ValueError(f"real batch must be {list(expected)} (per-worker batch), got {list(real_img.shape)}")
        if self.model_cfg.c_dim > 0 and (real_c is None or real_c.shape != (expected[0], self.model_cfg.c_dim)):
            raise ValueError(f"conditional model needs labels [{expected[0]}, {self.model_cfg.c_dim}]")
        real_img = real_img.to(self.device, torch.float32, memory_format=self.memory_format)
        real_c = real_c.to(self.device, torch.float32) if real_c is not None else None

        stats: dict[str, float] = {}
        for phase in self.phases:
            if self.batch_idx % phase.interval != 0:
                continue
            is_g = phase.name.startswith("G")
            module, opt = (self.G, self.opt_G) if is_g else (self.D, self.opt_D)
            opt.zero_grad(set_to_none=True)
            with requires_grad(self.G, is_g), requires_grad(self.D, not is_g):
                if phase.name == "Gmain":
                    stats.update(self._phase_g_main(real_c))
                elif phase.name == "Greg":
                    stats.update(self._phase_g_reg(real_c, phase.interval))
                elif phase.name == "Dmain":
                    stats.update(self._phase_d_main(real_img, real_c))
                else:
                    stats.update(self._phase_d_reg(real_img, real_c, phase.interval))
            self._sync_grads(module)
            opt.step()

        self._update_ema()
        self.cur_nimg += self.global_batch
        self.batch_idx += 1
        if self.ada is not None:
            reduce = dist.all_reduce if self.world_size > 1 else None
            r_t = self.ada.step(self.batch_idx, self.augment_pipe, all_reduce=reduce)
            if r_t is not None:
                self.last_r_t = r_t
        stats["augment_p"] = self.augment_p
        if self.last_r_t is not None:
            stats["r_t"] = self.last_r_t
        return stats

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema_nimg = self.cfg.ema_kimg * 1000
        if self.cfg.ema_rampup is not None:
            ema_nimg = min(ema_nimg, self.cur_nimg * self.cfg.ema_rampup)
        beta = 0.5 ** (self.global_batch / max(ema_nimg, 1e-8))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    # ------------------------------------------------------------------ state

    def _rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs. In a process group, every rank's RNG state is gathered."""
        rng = self._rng_state()
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "augment_pipe": self.augment_pipe.state_dict() if self.augment_pipe is not None else None,
            "ada": self.ada.state_dict() if self.ada is not None else None,
            "pl_mean": self.pl_mean.detach().cpu().clone(),
            "counters": {"cur_nimg": self.cur_nimg, "batch_idx": self.batch_idx, "last_r_t": self.last_r_t},
            "rng": gathered,
            "model_cfg": dataclasses.asdict(self.model_cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        if self.augment_pipe is not None and state.get("augment_pipe") is not None:
            self.augment_pipe.load_state_dict(state["augment_pipe"])
        if self.ada is not None and state.get("ada") is not None:
            self.ada.load_state_dict(state["ada"])
        self.pl_mean.copy_(state["pl_mean"])
        counters = state["counters"]
        self.cur_nimg, self.batch_idx = int(counters["cur_nimg"]), int(counters["batch_idx"])
        self.last_r_t = counters.get("last_r_t")
        rngs = state.get("rng") or []
        if len(rngs) == self.world_size:
            self._set_rng_state(rngs[self.rank])
        else:
            # A different worker count: continue deterministically, but not bit-exactly.
            log.warning("checkpoint has RNG state for %d ranks, running %d: reseeding", len(rngs), self.world_size)
            self.seed_everything(self.cfg.seed * 1000 + self.rank + self.batch_idx)
