"""Shared by the projection tests: a tiny generator, targets, and a VGG16 weights file made here.

The VGG16 file has torchvision's format (a state_dict with ``features.N.weight`` keys and a classifier) and
random weights: the real ImageNet weights are never downloaded, and the tests check loading and the distance's
properties, not its perceptual quality.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from styleray.config import resolve_preset
from styleray.models.networks import Generator


def tiny_generator(resolution: int = 16, c_dim: int = 0, seed: int = 0) -> Generator:
    """A freshly initialised cpu-tiny generator (eval mode, no gradients)."""
    model, _ = resolve_preset("cpu-tiny", resolution=resolution, c_dim=c_dim)
    torch.manual_seed(seed)
    return Generator(model).eval().requires_grad_(False)


def figure(index: int, resolution: int) -> torch.Tensor:
    """A built-in sample figure on white, drawn as make_clean_training_set draws a prepared training image:
    uint8 [3, R, R]."""
    from styleray.datasets.synthetic import _render, make_spec

    pixels, _ = _render(make_spec(index, 0, background="solid", framing="upper-body"), resolution, resolution,
                        on_white=True)
    return torch.from_numpy(np.asarray(pixels)).permute(2, 0, 1).contiguous()


def write_random_vgg16(path: str, seed: int = 0) -> str:
    """A VGG16-shaped state_dict with random weights in torchvision's format (features + classifier)."""
    from styleray.models.projection.vgg16 import vgg16_features

    torch.manual_seed(seed)
    features = vgg16_features()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(8, 8)  # torchvision's file has a classifier; the loader ignores it
    torch.save(state, path)
    return path


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()
