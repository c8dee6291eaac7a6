"""A tiny feature extractor standing in for Inception in the tests (nothing is downloaded), shared by the
metrics tests of every part."""

from __future__ import annotations

import torch
import torch.nn as nn

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
