"""FID, KID and the diversity check from two sets of feature statistics, and for a generator end to end."""

from __future__ import annotations

import logging
import time
from typing import Iterable

import numpy as np
import torch

from styleray.models.metrics.distances import frechet_distance, kernel_inception_distance, mean_pairwise_distance
from styleray.models.metrics.extractors import Extractor
from styleray.models.metrics.features import AllGather, FeatureStats, generator_features

log = logging.getLogger(__name__)

METRICS = ("fid", "kid")
DIVERSITY_WARNING = 0.7  # diversity_ratio below this is logged as possible mode collapse


def parse_metrics(names: str | Iterable[str]) -> tuple[str, ...]:
    """'fid,kid' or ['fid'] -> ('fid', 'kid'); ValueError naming the known metrics for anything else."""
    items = [n.strip().lower() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in items if n not in METRICS]
    if unknown or not items:
        raise ValueError(f"--metrics {','.join(items) or repr(names)}: choose from {', '.join(METRICS)} (comma-separated)")
    return tuple(dict.fromkeys(items))


def compare_stats(
    real: FeatureStats,
    gen: FeatureStats,
    metrics: Iterable[str] = METRICS,
    *,
    kid_subsets: int = 100,  # KID subset pairs.
    kid_subset_size: int = 1000,  # KID subset size (capped by both set sizes).
    diversity_samples: int = 2000,  # Samples per side for the mean pairwise distance.
    seed: int = 0,
    device: torch.device | str = "cpu",  # Where KID's kernels and the pairwise distances are computed.
) -> dict:
    """{fid, kid, diversity_gen, diversity_real, diversity_ratio, num_gen, num_real, extractor}.

    diversity_* is the mean pairwise feature distance of the generated images and of the data; their ratio
    falls well below 1 when the generator covers only a few modes (FID rises too, but does not say why).
    """
    metrics = parse_metrics(metrics)
    if real.extractor != gen.extractor:
        raise ValueError(f"statistics come from different extractors: data {real.extractor!r}, generated {gen.extractor!r}")
    out: dict = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(gen.mu, gen.sigma, real.mu, real.sigma)
    if "kid" in metrics:
        out["kid"] = kernel_inception_distance(
            real.features, gen.features, kid_subsets, kid_subset_size, seed=seed, device=device
        )
    div_gen = mean_pairwise_distance(gen.features, diversity_samples, seed=seed, device=device)
    div_real = mean_pairwise_distance(real.features, diversity_samples, seed=seed, device=device)
    ratio = div_gen / div_real if div_real > 0 else float("nan")
    out.update(diversity_gen=div_gen, diversity_real=div_real, diversity_ratio=ratio)
    out.update(num_gen=gen.num, num_real=real.num, extractor=real.extractor)
    if ratio < DIVERSITY_WARNING:
        log.warning(
            "generated images are less varied than the data (diversity ratio %.3f < %.2f): possible mode collapse",
            ratio, DIVERSITY_WARNING,
        )
    return out


def evaluate_generator(
    G: torch.nn.Module,  # a styleray Generator (G_ema), eval mode
    real: FeatureStats,  # the dataset's statistics (features.dataset_stats), same extractor
    extractor: Extractor,
    *,
    metrics: Iterable[str] = METRICS,
    num_gen: int = 50_000,  # Generated images (seeds 0 .. num_gen - 1), the papers' "50k".
    labels: np.ndarray | None = None,  # Dataset labels, for a conditional G.
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    all_gather: AllGather | None = None,  # Default: torch.distributed's (only used when world_size > 1).
    **compare_kwargs,
) -> dict:
    """Generate num_gen images (this rank's share), gather their features, and compare with the data.

    Every rank returns the same dict: call it from every rank of the process group (the gather is
    collective). Adds ``seconds`` (wall time of the whole evaluation).
    """
    metrics = parse_metrics(metrics)
    if real.extractor != extractor.name:
        raise ValueError(f"dataset statistics come from {real.extractor!r}, but the extractor is {extractor.name!r}")
    t0 = time.time()
    feats = generator_features(
        G, extractor, num_gen, labels=labels, batch_size=batch_size, rank=rank, world_size=world_size, all_gather=all_gather
    )
    gen = FeatureStats(feats, extractor.name, {"num": num_gen})
    out = compare_stats(real, gen, metrics, **compare_kwargs)
    out["seconds"] = time.time() - t0
    return out
