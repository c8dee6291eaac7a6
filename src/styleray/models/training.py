"""The StyleGAN2-ADA training step, on one device or inside an existing torch process group.

Knows nothing of Ray: the platform layer (Ray Train) or the single-process CLI drives it. One call to
``step(real, c)`` is one iteration of the reference's loop:

    draw latents and labels for every phase, split the worker's batch into rounds of --batch-gpu images
    for each phase that is due (phases.py: Gmain, Greg every 4, Dmain, Dreg every 16):
        zero grads, accumulate every round, average over workers, optimizer step
    G_ema update, ADA p adjustment (every 4)

Gradients are averaged across ranks with one all-reduce per phase (what DDP would do, without wrapping the
networks, which keeps double backward and per-phase requires_grad simple). The path-length mean is each
rank's own, as in the reference. The step draws from the trainer's own random streams (step_scope.py), so
building or stepping a trainer leaves the caller's global RNG alone. ``state_dict()`` holds everything an
exact resume needs: networks, optimizers, ADA p and statistics, every rank's path-length mean and random
streams, counters.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist

from styleray.config import ModelConfig, TrainConfig
from styleray.models.ada import AdaController
from styleray.models.augment import AugmentPipe
from styleray.models.input_grad import CompiledInputGrad
from styleray.models.networks import Discriminator, Generator, requires_grad
from styleray.models.phases import DiscriminatorMain, DiscriminatorR1, GeneratorMain, GeneratorPathLength, Phase, Round
from styleray.models.step_scope import RandomStreams, seeded_cpu, tf32_allowed
from styleray.models.precision import choose_for_device
from styleray.models.transfer import freeze_discriminator_layers

log = logging.getLogger(__name__)

# Compiled graphs draw random numbers (the synthesis noise) from torch's generator, like eager mode: the same
# noise with or without compile, and an exact resume from the saved RNG state.
_COMPILE_OPTIONS = {"fallback_random": True}


def lazy_adam_hparams(lr: float, betas: tuple[float, float], reg_interval: int | None) -> tuple[float, tuple]:
    """Learning rate and betas corrected for lazy regularisation (reference: mb_ratio = k / (k + 1))."""
    if reg_interval is None:
        return lr, tuple(betas)
    ratio = reg_interval / (reg_interval + 1)
    return lr * ratio, tuple(b**ratio for b in betas)


def default_channels_last(device: torch.device, model_cfg: ModelConfig) -> bool:
    """NHWC activations: on CPU (oneDNN; measured faster, benchmarks/RESULTS.md) and on CUDA in reduced precision
    (tensor-core convolutions want NHWC); NCHW for fp32 on CUDA."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and model_cfg.mixed_precision != "off"


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
        compile: bool | None = None,  # torch.compile G's synthesis and D for the main phases, and D with its
        # input gradient for R1 (input_grad.py); path length stays eager. None = train_cfg.compile (--compile).
        label_pool: torch.Tensor | None = None,  # [M, c_dim] the dataset's labels, fake labels are drawn from
        # them (the reference); None = from this worker's real batch. Conditional models only.
    ):
        self.device = torch.device(device)
        # --precision, decided here where the device is known. The networks run in it (net_cfg); the model config
        # stays as asked, so checkpoints keep the preset's reduced precision for a GPU that serves them later.
        self.precision = choose_for_device(train_cfg.precision, self.device)
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.net_cfg = dataclasses.replace(model_cfg, mixed_precision=self.precision.mixed_precision)
        if channels_last is None:
            channels_last = default_channels_last(self.device, self.net_cfg)  # what runs, not the wish
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.rank = dist.get_rank() if _dist_ready() else 0
        self.world_size = dist.get_world_size() if _dist_ready() else 1
        if self.world_size != train_cfg.workers:
            log.warning("process group has %d ranks but config says --workers %d", self.world_size, train_cfg.workers)
        self.batch_per_worker = train_cfg.batch // self.world_size
        self.global_batch = self.batch_per_worker * self.world_size
        self.round_batch = self._round_batch()
        self.label_pool = self._check_label_pool(label_pool)

        self._build_networks(train_cfg.compile if compile is None else compile)
        self.streams = RandomStreams(self.device, train_cfg.seed * 1000 + self.rank)
        self.augment_pipe, self.ada = self._build_augment()
        self.phases = self._build_phases()

        self.pl_mean = torch.zeros([], device=self.device)  # this rank's running mean of path lengths
        self.cur_nimg = 0  # images seen, over all ranks
        self.batch_idx = 0  # iterations done
        self.last_r_t: torch.Tensor | float | None = None  # r_t of the latest ADA adjustment (on the device)

    # ------------------------------------------------------------------ construction

    def _round_batch(self) -> int:
        """Images per round on this worker: --batch-gpu, or one round when it does not divide this worker's
        share (a process group of another size than --workers)."""
        size = self.cfg.batch_gpu or self.batch_per_worker
        if self.batch_per_worker % size != 0:
            log.warning("--batch-gpu %d does not divide this worker's %d images: one round", size, self.batch_per_worker)
            return self.batch_per_worker
        return size

    def _check_label_pool(self, pool: torch.Tensor | None) -> torch.Tensor | None:
        c_dim = self.model_cfg.c_dim
        if pool is None:
            return None
        if c_dim == 0 or pool.ndim != 2 or pool.shape[0] < 1 or pool.shape[1] != c_dim:
            raise ValueError(
                f"label_pool must be the dataset's labels [M, c_dim={c_dim}] of a conditional model, "
                f"got {list(pool.shape)}{' for an unconditional model' if c_dim == 0 else ''}"
            )
        return pool.to(self.device, torch.float32)

    def _build_networks(self, compile: bool) -> None:
        """G, D and G_ema, with the same initial weights on every rank (seeded by --seed alone)."""
        with seeded_cpu(self.cfg.seed):
            self.G = Generator(self.net_cfg).to(self.device, memory_format=self.memory_format).train()
            self.D = Discriminator(self.net_cfg).to(self.device, memory_format=self.memory_format).train()
        freeze_discriminator_layers(self.D, self.cfg.freeze_d)  # FreezeD (--freeze-d): before the optimizer
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        # The networks as the phases call them: compiled if asked. R1 differentiates D twice, which a compiled
        # graph does not support: it gets D and its input gradient traced into one graph (input_grad.py).
        self._synthesis_main: Any = self.G.synthesis
        self._D_main: Any = self.D
        self._D_input_grad: CompiledInputGrad | None = None
        if compile:
            self._synthesis_main = torch.compile(self.G.synthesis, options=_COMPILE_OPTIONS)
            self._D_main = torch.compile(self.D, options=_COMPILE_OPTIONS)
            self._D_input_grad = CompiledInputGrad(self.D, _COMPILE_OPTIONS)

    def _build_augment(self) -> tuple[AugmentPipe | None, AdaController | None]:
        cfg = self.cfg
        if cfg.augment == "noaug":
            return None, None
        pipe = AugmentPipe.named(cfg.augment_pipe).to(self.device).train()
        pipe.p.copy_(torch.as_tensor(cfg.augment_p))
        if cfg.augment != "ada":
            return pipe, None
        ada = AdaController(
            target=cfg.ada_target, ada_kimg=cfg.ada_kimg, interval=cfg.ada_interval, batch_size=self.global_batch
        )
        return pipe, ada

    def _build_phases(self) -> list[Phase]:
        """The phases, and Adam for G and D. Lazy regularisation corrects Adam's lr and betas by k / (k + 1)
        even when its regulariser is off (gamma 0, pl_weight 0), as the reference does; a phase that would do
        nothing is left out."""
        cfg = self.cfg
        phases: list[Phase] = [GeneratorMain()]
        if cfg.pl_weight > 0:
            phases.append(GeneratorPathLength(cfg.pl_interval))
        phases.append(DiscriminatorMain())
        if cfg.r1_gamma > 0:
            phases.append(DiscriminatorR1(cfg.r1_interval))
        lr_g, betas_g = lazy_adam_hparams(cfg.lr_g, cfg.betas, cfg.pl_interval)
        lr_d, betas_d = lazy_adam_hparams(cfg.lr_d, cfg.betas, cfg.r1_interval)
        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel per step on CUDA
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr_g, betas=betas_g, eps=cfg.eps, **fused)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=betas_d, eps=cfg.eps, **fused)
        return phases

    # ------------------------------------------------------------------ helpers

    def reseed(self, seed: int) -> None:
        """Restart this trainer's random streams from ``seed`` (e.g. after a rollback, to leave a bad path)."""
        self.streams.reseed(seed)

    @property
    def kimg(self) -> float:
        return self.cur_nimg / 1000.0

    @property
    def augment_p(self) -> float:
        return float(self.augment_pipe.p) if self.augment_pipe is not None else 0.0

    def _augment_p_tensor(self) -> torch.Tensor:
        if self.augment_pipe is None:
            return torch.zeros([], device=self.device)
        return self.augment_pipe.p.detach().clone()

    def _latents(self, n: int) -> torch.Tensor:
        return torch.randn([n, self.model_cfg.z_dim], device=self.device)

    def _fake_labels(self, real_c: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """n labels for generated images: drawn from the dataset's labels when the trainer has them, else
        from the real batch's (the same distribution, with the batch's sampling noise)."""
        if self.model_cfg.c_dim == 0:
            return None
        pool = self.label_pool if self.label_pool is not None else real_c
        return pool[torch.randint(0, pool.shape[0], [n], device=self.device)]

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

    def _augment(self, img: torch.Tensor) -> torch.Tensor:
        if self.augment_pipe is not None and float(self.augment_pipe.p) > 0:
            return self.augment_pipe(img)
        return img

    def run_D(self, img: torch.Tensor, c: torch.Tensor | None, main: bool = False) -> torch.Tensor:
        return (self._D_main if main else self.D)(self._augment(img), c)

    def run_D_input_grad(self, img: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """D's logits on augment(img) and d(logits.sum())/d img (img requires grad), both differentiable w.r.t.
        D's weights (R1). Compiled: D and its input gradient are one graph, the augment pipe's part is eager."""
        augmented = self._augment(img)
        if self._D_input_grad is None:
            logits = self.D(augmented, c)
            (grads,) = torch.autograd.grad(logits.sum(), img, create_graph=True)
            return logits, grads
        logits, grads = self._D_input_grad(augmented, c)
        if augmented is not img:  # chain the augment pipe's input gradient on, eagerly
            (grads,) = torch.autograd.grad(augmented, img, grads, create_graph=True)
        return logits, grads

    def count_real_logits(self, logits: torch.Tensor) -> None:
        """D's logits on real images go into ADA's r_t (no host sync)."""
        if self.ada is not None:
            self.ada.accumulate(logits.detach())

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

    # ------------------------------------------------------------------ the step

    def _check_reals(self, real_img: torch.Tensor, real_c: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        expected = (self.batch_per_worker, self.model_cfg.img_channels, self.model_cfg.resolution, self.model_cfg.resolution)
        if tuple(real_img.shape) != expected:
            raise ValueError(f"real batch must be {list(expected)} (per-worker batch), got {list(real_img.shape)}")
        if self.model_cfg.c_dim > 0 and (real_c is None or real_c.shape != (expected[0], self.model_cfg.c_dim)):
            raise ValueError(f"conditional model needs labels [{expected[0]}, {self.model_cfg.c_dim}]")
        real_img = real_img.to(self.device, torch.float32, memory_format=self.memory_format)
        real_c = real_c.to(self.device, torch.float32) if real_c is not None and self.model_cfg.c_dim > 0 else None
        return real_img, real_c

    def _rounds(self, real_img: torch.Tensor, real_c: torch.Tensor | None) -> list[list[Round]]:
        """Per phase, the rounds it runs: the reals split into rounds of --batch-gpu, with latents and labels
        drawn for every phase whether it is due or not (the reference's draws)."""
        k, n = len(self.phases), self.batch_per_worker
        gen_z = self._latents(k * n).split(n)
        gen_c = self._fake_labels(real_c, k * n)
        gen_c = gen_c.split(n) if gen_c is not None else [None] * k

        def split(x: torch.Tensor | None) -> list:
            return list(x.split(self.round_batch)) if x is not None else [None] * (n // self.round_batch)

        reals, real_cs = split(real_img), split(real_c)
        return [[Round(*parts) for parts in zip(reals, real_cs, split(z), split(c))] for z, c in zip(gen_z, gen_c)]

    def _run_phase(self, phase: Phase, rounds: list[Round]) -> dict[str, torch.Tensor]:
        """Accumulate the phase's gradients over its rounds, average them over the ranks, step its optimizer;
        returns the statistics averaged over the rounds (0-dim tensors on the device: no host sync)."""
        module, opt = (self.G, self.opt_G) if phase.trains_generator else (self.D, self.opt_D)
        opt.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        with requires_grad(self.G, phase.trains_generator), requires_grad(self.D, not phase.trains_generator):
            for rnd in rounds:
                for key, value in phase.accumulate(self, rnd, gain=phase.interval).items():
                    sums[key] = sums[key] + value if key in sums else value
        self._sync_grads(module)
        opt.step()
        return {key: value / len(rounds) for key, value in sums.items()}

    def step(self, real_img: torch.Tensor, real_c: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One iteration on this rank's batch: real_img [B, C, H, W] in [-1, 1], real_c [B, c_dim] or None.

        Returns the step's statistics as 0-dim tensors on the device (losses, penalties, scores, augment_p, r_t):
        nothing here waits for the device; the training loop reads them once per tick (float() works on each)."""
        real_img, real_c = self._check_reals(real_img, real_c)
        stats: dict[str, torch.Tensor] = {}
        with self.streams.scope(), tf32_allowed(self.cfg.allow_tf32):
            for phase, rounds in zip(self.phases, self._rounds(real_img, real_c)):
                if phase.is_due(self.batch_idx):
                    stats.update(self._run_phase(phase, rounds))
            self._update_ema()
        self.cur_nimg += self.global_batch
        self.batch_idx += 1
        if self.ada is not None:
            reduce = dist.all_reduce if self.world_size > 1 else None
            if self.ada.adjust(self.batch_idx, self.augment_pipe, all_reduce=reduce) is not None:
                self.last_r_t = self.ada.last_r_t  # the trainer's Dmain counts reals every step: never NaN
        stats["augment_p"] = self._augment_p_tensor()
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

    def _gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (collective in a process group)."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs. In a process group, every rank's own state is gathered."""
        ranks = self._gather({"rng": self.streams.state_dict(), "pl_mean": float(self.pl_mean)})
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "augment_pipe": self.augment_pipe.state_dict() if self.augment_pipe is not None else None,
            "ada": self.ada.state_dict() if self.ada is not None else None,
            "pl_mean": torch.tensor([r["pl_mean"] for r in ranks], dtype=torch.float32),  # [ranks]
            "counters": {"cur_nimg": self.cur_nimg, "batch_idx": self.batch_idx, "last_r_t": self._last_r_t_float()},
            "rng": [r["rng"] for r in ranks],
            "model_cfg": dataclasses.asdict(self.model_cfg),
        }

    def _last_r_t_float(self) -> float | None:
        return None if self.last_r_t is None else float(self.last_r_t)

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
        counters = state["counters"]
        self.cur_nimg, self.batch_idx = int(counters["cur_nimg"]), int(counters["batch_idx"])
        self.last_r_t = counters.get("last_r_t")
        self._load_per_rank(state.get("pl_mean"), state.get("rng") or [])

    def _load_per_rank(self, pl_mean: torch.Tensor | None, rngs: list[Any]) -> None:
        """This rank's path-length mean and random streams; with another worker count than the checkpoint's,
        the ranks' mean and a fresh seed (deterministic, but not bit-exact)."""
        if pl_mean is not None:
            pl_mean = torch.as_tensor(pl_mean).reshape(-1)  # older checkpoints hold one value for every rank
            self.pl_mean.copy_(pl_mean[self.rank] if pl_mean.numel() == self.world_size else pl_mean.mean())
        if len(rngs) == self.world_size:
            self.streams.load_state_dict(rngs[self.rank])
        else:
            log.warning("checkpoint has RNG state for %d ranks, running %d: reseeding", len(rngs), self.world_size)
            self.reseed(self.cfg.seed * 1000 + self.rank + self.batch_idx)
