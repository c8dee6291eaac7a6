"""Pivotal tuning (Roich et al., "Pivotal Tuning for Latent-based Editing of Real Images", 2021).

After the latent search, the projected w is the *pivot*: a copy of the generator's synthesis network is
fine-tuned for a few hundred steps so that G(pivot) becomes the target almost exactly, while the rest of the
latent space moves little (few steps, small learning rate). Loss: the projection's distance plus
``l2_weight`` times the pixel MSE, as in the paper (LPIPS + L2, Adam at 3e-4). The mapping network is not
touched, so seeds still map to the same w; the noise maps are the projection's optimised ones, frozen, and
become the tuned generator's constant noise: its ``noise_mode="const"`` image of the pivot is the
reconstruction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from styleray.models.projection.distances import Distance, psnr
from styleray.models.projection.search import Progress, Projection, check_generator_target, to_model_range, with_noise

MAX_PTI_STEPS = 10_000


@dataclass(frozen=True)
class PivotalConfig:
    steps: int = 350  # --pti-steps: fine-tuning steps (the paper's 350)
    lr: float = 3e-4  # Adam learning rate
    l2_weight: float = 1.0  # weight of the pixel MSE (images in [-1, 1]) beside the distance

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_PTI_STEPS:
            raise ValueError(f"--pti-steps {self.steps} must be within 1..{MAX_PTI_STEPS} (0: no pivotal tuning)")
        if not self.lr > 0 or self.l2_weight < 0:
            raise ValueError(f"pivotal tuning: lr {self.lr} must be > 0 and l2_weight {self.l2_weight} >= 0")


@dataclass
class Tuned:
    G: torch.nn.Module  # the tuned generator (eval mode, no gradients), its noise_const = the projection's maps
    image: torch.Tensor  # [C, H, W] in [-1, 1] on CPU: its image of the pivot
    distance: float
    psnr: float
    history: list[tuple[int, float, float]]  # (step, distance, psnr) per step
    seconds: float


def pivotal_tuning(
    G,  # styleray.models.networks.Generator (not modified: a copy is tuned)
    projection: Projection,  # the pivot: its ws and noise maps
    target: torch.Tensor,  # [C, H, W], uint8 or float in [-1, 1]
    cfg: PivotalConfig,
    distance: Distance,
    callback: Callable[[Progress], None] | None = None,
) -> Tuned:
    check_generator_target(G, target)
    started = time.perf_counter()
    device = next(G.parameters()).device
    G = with_noise(G, projection.noise).eval().requires_grad_(False)
    G.synthesis.requires_grad_(True)
    distance = distance.to(device)
    target = to_model_range(target).to(device)[None]
    target_emb = distance.embed(target)
    ws = projection.ws.to(device)[None]  # [1, num_ws, w_dim]
    optimizer = torch.optim.Adam(G.synthesis.parameters(), lr=cfg.lr)
    history = []
    for step in range(cfg.steps):
        image = G.synthesis(ws, noise_mode="const")
        dist = distance.compare(distance.embed(image), target_emb)[0]
        loss = dist + cfg.l2_weight * (image - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        p = float(psnr(image.detach(), target)[0])
        history.append((step + 1, float(dist.detach()), p))
        if callback is not None:
            callback(Progress(step + 1, cfg.steps, history[-1][1], p, image.detach()[0]))
    G.requires_grad_(False)
    with torch.no_grad():
        image = G.synthesis(ws, noise_mode="const")
        final = float(distance.compare(distance.embed(image), target_emb)[0])
        return Tuned(G, image[0].cpu(), final, float(psnr(image, target)[0]), history, time.perf_counter() - started)
