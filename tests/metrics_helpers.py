"""What the metrics tests of every part share: a tiny feature extractor standing in for Inception (nothing is
downloaded) and a folder of random images."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from styleray.models import metrics

TINY = "test-tiny"


def tiny_extractor_spec(name: str = TINY, calls: list | None = None) -> metrics.ExtractorSpec:
    """A 16-feature conv extractor with fixed weights (uint8 [N, C, H, W] -> [N, 16]); ``calls`` collects one
    item per forward call. Defined inside a function so that Ray pickles it by value: the tests' modules are
    not importable in Ray's worker processes."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 3, stride=2)
            self.fc = nn.Linear(8 * 4, 16)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)

        def forward(self, images):
            if calls is not None:
                calls.append(images.shape[0])
            x = images.float() / 127.5 - 1
            x = torch.tanh(self.conv(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x))
            return self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))

    return metrics.ExtractorSpec(name, lambda weights: Tiny(), 16, "test extractor")


def register_tiny(name: str = TINY, calls: list | None = None):
    """Register the tiny extractor under ``name``; returns a function that removes it again."""
    metrics.register_extractor(tiny_extractor_spec(name, calls), replace=True)
    return lambda: metrics.EXTRACTORS.pop(name, None)


def write_dataset(root, n=10, res=16, seed=0) -> str:
    """A folder of ``n`` random RGB PNGs of ``res`` px, named 000000.png, ..."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, [res, res, 3], dtype=np.uint8)).save(os.path.join(root, f"{i:06d}.png"))
    return str(root)
