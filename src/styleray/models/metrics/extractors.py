"""The feature extractors metrics can use, in one explicit registry.

An extractor is an ``nn.Module`` that maps uint8 images [N, C, H, W] (C = 1 or 3, any size; it does its own
resizing and scaling) to float features [N, D]. The ``build`` function of its :class:`ExtractorSpec` makes it
from an optional weights path; :func:`build_extractor` wraps it with its name as an :class:`Extractor`.
Statistics are cached under the spec's name, so a spec whose weights change must change its name.

The standard one is ``inception-v3`` (the FID network, see ``inception.py``); ``pixels-8x8`` (``pixels.py``)
needs no weights and stands in as a named proxy; tests and experiments add their own with
:func:`register_extractor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from styleray.models.metrics.inception import FEATURE_DIM, load_fid_inception
from styleray.models.metrics.pixels import PIXEL_FEATURE_DIM, PIXELS_EXTRACTOR, build_pixel_grid

DEFAULT_EXTRACTOR = "inception-v3"


@dataclass(frozen=True)
class ExtractorSpec:
    name: str  # Registry key; part of every statistics cache key.
    build: Callable[[str | None], nn.Module]  # weights path (None = the extractor's default lookup) -> module
    feature_dim: int  # D, the length of one feature vector.
    description: str = ""


EXTRACTORS: dict[str, ExtractorSpec] = {
    DEFAULT_EXTRACTOR: ExtractorSpec(
        DEFAULT_EXTRACTOR,
        load_fid_inception,
        FEATURE_DIM,
        "Inception-v3 pool features with the TF 2015-12-05 weights (the FID standard)",
    ),
    PIXELS_EXTRACTOR: ExtractorSpec(
        PIXELS_EXTRACTOR,
        build_pixel_grid,
        PIXEL_FEATURE_DIM,
        "RGB averaged to 8x8, no weights: a named proxy for FID (layout, colour, variety; not texture)",
    ),
}


def register_extractor(spec: ExtractorSpec, *, replace: bool = False) -> ExtractorSpec:
    """Add an extractor to EXTRACTORS; ValueError if the name is taken (unless replace)."""
    if spec.name in EXTRACTORS and not replace:
        raise ValueError(f"extractor {spec.name!r} is already registered (pass replace=True to override it)")
    EXTRACTORS[spec.name] = spec
    return spec


def get_extractor_spec(name: str) -> ExtractorSpec:
    try:
        return EXTRACTORS[name]
    except KeyError:
        raise ValueError(f"--extractor {name!r} is not registered; choose one of {', '.join(sorted(EXTRACTORS))}") from None


@dataclass
class Extractor:
    """A built extractor: its registry name (for cache keys and reports) and its module."""

    name: str
    module: nn.Module  # uint8 [N, C, H, W] -> float [N, feature_dim]; eval mode, no gradients
    feature_dim: int

    @property
    def device(self) -> torch.device:
        p = next(iter(self.module.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # uint8 [N, C, H, W] -> float32 [N, D]
        feats = self.module(images)
        if feats.ndim != 2 or feats.shape != (images.shape[0], self.feature_dim):
            raise ValueError(
                f"extractor {self.name!r} returned {tuple(feats.shape)}, expected [{images.shape[0]}, {self.feature_dim}]"
            )
        return feats.float()


def build_extractor(name: str = DEFAULT_EXTRACTOR, weights: str | None = None, device: torch.device | str = "cpu") -> Extractor:
    """The named extractor with its weights, in eval mode, without gradients, on ``device``."""
    spec = get_extractor_spec(name)
    module = spec.build(weights).to(device).eval().requires_grad_(False)
    return Extractor(spec.name, module, spec.feature_dim)
