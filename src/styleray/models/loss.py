"""StyleGAN2 losses and regularisers as small named functions; the training step composes them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def nonsaturating_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator's non-saturating logistic loss, per sample: softplus(-D(G(z)))."""
    return F.softplus(-fake_logits)


def d_fake_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator's logistic loss on generated images, per sample: softplus(D(G(z)))."""
    return F.softplus(fake_logits)


def d_real_loss(real_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator's logistic loss on real images, per sample: softplus(-D(x))."""
    return F.softplus(-real_logits)


def r1_penalty(real_img: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """R1: squared norm of dD(x)/dx per sample, with a graph so its gradient reaches D ([N])."""
    (grads,) = torch.autograd.grad(real_logits.sum(), real_img, create_graph=True)
    return r1_from_input_grad(grads)


def r1_from_input_grad(grads: torch.Tensor) -> torch.Tensor:
    """R1 from dD(x)/dx [N, C, H, W] (with a graph): its squared norm per sample ([N])."""
    return grads.square().sum(dim=[1, 2, 3])


def path_length_penalty(
    img: torch.Tensor,  # [N, C, H, W] generated from ws
    ws: torch.Tensor,  # [N, num_ws, w_dim], requires grad
    pl_mean: torch.Tensor,  # running mean of path lengths (scalar, no grad)
    decay: float,  # how fast pl_mean follows the batch mean
) -> tuple[torch.Tensor, torch.Tensor]:
    """Path length regularisation: (|J_w^T y| - a)^2 per sample, and the updated running mean a.

    a = lerp(pl_mean, mean of this batch's lengths, decay) keeps the batch mean in the graph, as the reference
    does: the penalty's gradient also flows through the decay-weighted batch mean."""
    noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    (grads,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)  # [N, num_ws, w_dim]
    lengths = grads.square().sum(dim=2).mean(dim=1).sqrt()  # [N]
    new_mean = pl_mean.lerp(lengths.mean(), decay)
    return (lengths - new_mean).square(), new_mean
