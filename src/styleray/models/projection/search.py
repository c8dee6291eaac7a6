"""Projection: the latent of an image, found by optimisation (the reference projector's method, plus W+).

    start      w = the mean of G.mapping over `w_avg_samples` random z (and random classes, for a conditional
               G); the spread of those w, w_std, scales the exploration noise below
    each step  t = step / steps
               lr = lr * ramp, the ramp linear up over the first `lr_rampup` of the steps and a half cosine
               down over the last `lr_rampdown`
               w' = w + N(0, (w_std * w_noise * max(0, 1 - t / w_noise_ramp)^2)^2): explores early, off late
               loss = distance(G.synthesis(w'), target) + noise_weight * the noise maps' autocorrelation at
               every scale (down to 8 px)
               Adam on w and the noise maps, then each noise map re-normalised to zero mean, unit variance
    spaces     "w": one w for every layer (the reference); "w+": one w per layer, from the same start

The generator is copied; its noise maps (``noise_const``) are the optimised noise. The result holds w (per
layer), the noise maps, the reconstruction with those noise maps, and the curve of distance and PSNR.
Pure PyTorch: no files, no Ray. Images are ``[C, H, W]`` tensors, uint8 or float in [-1, 1].
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from styleray.models.projection.distances import Distance, psnr

SPACES = ("w", "w+")
MAX_STEPS = 100_000


@dataclass(frozen=True)
class ProjectionConfig:
    steps: int = 1000  # --steps: optimisation steps
    space: str = "w"  # --space: "w" (one w broadcast to every layer) or "w+" (one w per layer)
    seed: int = 0  # --seed: the exploration noise and the initial noise maps
    class_idx: int | None = None  # --class: a conditional G's w statistics over this class; None = all classes
    w_avg_samples: int = 10_000  # z samples for the mean and spread of w
    lr: float = 0.1  # peak learning rate of Adam
    lr_rampup: float = 0.05  # fraction of the steps over which lr rises linearly from 0
    lr_rampdown: float = 0.25  # fraction of the steps over which lr falls to 0 (half cosine)
    w_noise: float = 0.05  # exploration noise at the start, times w_std
    w_noise_ramp: float = 0.75  # fraction of the steps after which the exploration noise is off
    noise_weight: float = 1e5  # weight of the noise maps' regulariser; 0 with optimize_noise=False
    optimize_noise: bool = True  # optimise the noise maps too (the reference does); False: keep G's own

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"--steps {self.steps} must be within 1..{MAX_STEPS} (the reference uses 1000)")
        if self.space not in SPACES:
            raise ValueError(f"--space {self.space!r} must be one of {', '.join(SPACES)}")
        if self.w_avg_samples < 2:
            raise ValueError(f"w_avg_samples {self.w_avg_samples} must be >= 2")
        if not self.lr > 0:
            raise ValueError(f"lr {self.lr} must be > 0")
        for name in ("lr_rampup", "lr_rampdown", "w_noise_ramp"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} {getattr(self, name)} must be within (0, 1]")
        if self.w_noise < 0 or self.noise_weight < 0:
            raise ValueError("w_noise and noise_weight must be >= 0")


@dataclass(frozen=True)
class Progress:
    """What a callback sees after each step."""

    step: int  # steps done, 1..steps
    steps: int
    distance: float
    psnr: float  # dB, of this step's image (exploration noise included)
    image: torch.Tensor = field(repr=False)  # [C, H, W] in [-1, 1], this step's synthesis (detached)


@dataclass
class Projection:
    ws: torch.Tensor  # [num_ws, w_dim] float32 on CPU: the latent, one w per layer (equal rows for "w")
    noise: dict[str, torch.Tensor]  # noise buffer name -> [res, res] float32 on CPU: the optimised maps
    space: str
    distance_name: str
    image: torch.Tensor  # [C, H, W] in [-1, 1] on CPU: G.synthesis(ws) with the optimised noise maps
    distance: float  # of `image`
    psnr: float  # dB, of `image`
    history: list[tuple[int, float, float]]  # (step, distance, psnr) per step
    seconds: float


def schedule(step: int, cfg: ProjectionConfig) -> tuple[float, float]:
    """(learning-rate factor in [0, 1], exploration-noise factor in [0, w_noise]) at ``step`` (0-based)."""
    t = step / cfg.steps
    ramp = min(1.0, (1.0 - t) / cfg.lr_rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp *= min(1.0, t / cfg.lr_rampup)
    return ramp, cfg.w_noise * max(0.0, 1.0 - t / cfg.w_noise_ramp) ** 2


def w_statistics(G, cfg: ProjectionConfig, device: torch.device) -> tuple[torch.Tensor, float]:
    """(mean w [1, w_dim], spread: root of the mean squared distance to it) over cfg.w_avg_samples z."""
    rs = np.random.RandomState(123)
    z = torch.from_numpy(rs.randn(cfg.w_avg_samples, G.z_dim)).float().to(device)
    c = None
    if G.c_dim > 0:
        if cfg.class_idx is not None:
            classes = np.full(cfg.w_avg_samples, cfg.class_idx)
        else:
            classes = rs.randint(G.c_dim, size=cfg.w_avg_samples)
        c = F.one_hot(torch.from_numpy(classes).long(), G.c_dim).float().to(device)
    with torch.no_grad():
        w = torch.cat([G.mapping(z[i : i + 1000], None if c is None else c[i : i + 1000])[:, 0]
                       for i in range(0, len(z), 1000)])  # [N, w_dim]
    w_avg = w.mean(dim=0, keepdim=True)
    return w_avg, float((w - w_avg).square().sum(dim=1).mean().sqrt())


def noise_buffers(G) -> dict[str, torch.Tensor]:
    """The generator's constant noise maps by name (what noise_mode="const" adds)."""
    return {name: buf for name, buf in G.synthesis.named_buffers() if name.endswith("noise_const")}


def noise_regularization(maps) -> torch.Tensor:
    """Squared autocorrelation at a one-pixel shift, both axes, at every scale down to 8 px: 0 for white
    noise. (Keeps optimised noise maps from taking over the image's structure.)"""
    total = torch.zeros([])
    for m in maps:
        x = m[None, None]  # [1, 1, H, W]
        while True:
            total = total + (x * torch.roll(x, 1, dims=3)).mean().square()
            total = total + (x * torch.roll(x, 1, dims=2)).mean().square()
            if x.shape[2] <= 8:
                break
            x = F.avg_pool2d(x, 2)
    return total


def check_generator_target(G, target: torch.Tensor) -> None:
    expected = (G.img_channels, G.img_resolution, G.img_resolution)
    if tuple(target.shape) != expected:
        raise ValueError(f"target must be {list(expected)} (the generator's channels and resolution), "
                         f"got {list(target.shape)}")


def to_model_range(image: torch.Tensor) -> torch.Tensor:
    """uint8 [C, H, W] (0..255) -> float in [-1, 1]; float input is taken to be in [-1, 1] already."""
    return image.float() / 127.5 - 1 if image.dtype == torch.uint8 else image.float()


def project(
    G,  # styleray.models.networks.Generator (not modified: a copy is optimised)
    target: torch.Tensor,  # [C, H, W], uint8 or float in [-1, 1], at G's resolution
    cfg: ProjectionConfig,
    distance: Distance,
    callback: Callable[[Progress], None] | None = None,  # after every step; may raise to cancel
) -> Projection:
    """Find the latent whose image is closest to ``target`` under ``distance`` (see the module docstring)."""
    check_generator_target(G, target)
    started = time.perf_counter()
    device = next(G.parameters()).device
    G = copy.deepcopy(G).eval().requires_grad_(False)
    distance = distance.to(device)
    target = to_model_range(target).to(device)[None]  # [1, C, H, W]
    target_emb = distance.embed(target)
    w_avg, w_std = w_statistics(G, cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    layers = G.num_ws if cfg.space == "w+" else 1
    w_opt = w_avg[:, None].repeat(1, layers, 1).requires_grad_(True)  # [1, layers, w_dim]
    maps = list(noise_buffers(G).values()) if cfg.optimize_noise else []  # else: G's own noise maps, fixed
    for m in maps:
        m.copy_(torch.randn(m.shape, generator=gen, device=device))
        m.requires_grad_(True)
    optimizer = torch.optim.Adam([w_opt] + maps, betas=(0.9, 0.999), lr=cfg.lr)
    history = []
    for step in range(cfg.steps):
        lr_factor, w_noise = schedule(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor
        explore = torch.randn(w_opt.shape, generator=gen, device=device) * (w_std * w_noise)
        ws = (w_opt + explore).expand(1, G.num_ws, -1)  # [1, num_ws, w_dim]
        image = G.synthesis(ws, noise_mode="const")
        dist = distance.compare(distance.embed(image), target_emb)[0]
        loss = dist + cfg.noise_weight * noise_regularization(maps) if maps else dist
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for m in maps:
                m -= m.mean()
                m *= m.square().mean().rsqrt()
            p = float(psnr(image.detach(), target)[0])
        history.append((step + 1, float(dist.detach()), p))
        if callback is not None:
            callback(Progress(step + 1, cfg.steps, history[-1][1], p, image.detach()[0]))
    return _result(G, w_opt.detach(), target, target_emb, distance, cfg, history, time.perf_counter() - started)


@torch.no_grad()
def _result(G, w_opt, target, target_emb, distance: Distance, cfg: ProjectionConfig, history, seconds) -> Projection:
    ws = w_opt.expand(1, G.num_ws, -1)
    image = G.synthesis(ws, noise_mode="const")
    return Projection(
        ws=ws[0].cpu().clone(),
        noise={k: v.detach().cpu().clone() for k, v in noise_buffers(G).items()},
        space=cfg.space,
        distance_name=distance.name,
        image=image[0].cpu(),
        distance=float(distance.compare(distance.embed(image), target_emb)[0]),
        psnr=float(psnr(image, target)[0]),
        history=history,
        seconds=seconds,
    )


def with_noise(G, noise: dict[str, torch.Tensor]):
    """A copy of G whose constant noise maps are ``noise`` (a projection's): its noise_mode="const" images
    are the projection's reconstruction."""
    G = copy.deepcopy(G)
    buffers = noise_buffers(G)
    missing = set(buffers) - set(noise)
    if missing or any(buffers[k].shape != v.shape for k, v in noise.items() if k in buffers):
        raise ValueError(f"noise maps do not fit this generator (missing {sorted(missing)[:3]})")
    with torch.no_grad():
        for k, buf in buffers.items():
            buf.copy_(noise[k].to(buf.device))
    return G
