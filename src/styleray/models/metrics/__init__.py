"""Quality metrics: FID and KID against a dataset, and a diversity check for mode collapse. Pure PyTorch.

- ``extractors``: the registry of feature extractors (``inception-v3``, the FID standard, loaded from a local
  file; tests register small ones).
- ``inception``: the FID Inception-v3 network and where its weights are looked for.
- ``pixels``: ``pixels-8x8``, a weights-free proxy extractor (named as a proxy wherever it is reported).
- ``distances``: Fréchet distance, unbiased kernel MMD (KID), mean pairwise distance.
- ``features``: features of images, of a generator and of a dataset (cached), split across ranks.
- ``evaluate``: the metrics from two sets of statistics, or for a generator end to end.

Typical use::

    ex = build_extractor("inception-v3", weights=None, device="cuda")
    real = dataset_stats(root, ex, files=files, load_images=lambda: data.images, resolution=256, cache=None)
    print(evaluate_generator(G_ema, real, ex, metrics=("fid", "kid"), num_gen=50_000))
"""

from styleray.models.metrics.distances import (
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_distance,
    mmd2_unbiased,
)
from styleray.models.metrics.evaluate import METRICS, compare_stats, evaluate_generator, parse_metrics
from styleray.models.metrics.extractors import (
    DEFAULT_EXTRACTOR,
    EXTRACTORS,
    Extractor,
    ExtractorSpec,
    build_extractor,
    get_extractor_spec,
    register_extractor,
)
from styleray.models.metrics.features import (
    FeatureStats,
    StatsCache,
    dataset_stats,
    extract_features,
    gather_rows,
    generator_features,
    shard_bounds,
    stats_cache_key,
    torch_all_gather,
)
from styleray.models.metrics.inception import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    INCEPTION_URL,
    FIDInceptionV3,
    MissingWeightsError,
    find_inception_weights,
    load_fid_inception,
)
from styleray.models.metrics.pixels import PIXELS_EXTRACTOR, PixelGrid

__all__ = [
    "DEFAULT_EXTRACTOR", "EXTRACTORS", "INCEPTION_ENV", "INCEPTION_FILE", "INCEPTION_URL", "METRICS",
    "Extractor", "ExtractorSpec", "FIDInceptionV3", "FeatureStats", "MissingWeightsError",
    "build_extractor", "compare_stats", "dataset_stats", "evaluate_generator", "extract_features",
    "find_inception_weights", "frechet_distance", "gather_rows", "generator_features", "get_extractor_spec",
    "kernel_inception_distance", "load_fid_inception", "mean_pairwise_distance", "mmd2_unbiased",
    "PIXELS_EXTRACTOR", "PixelGrid", "parse_metrics", "register_extractor", "shard_bounds", "stats_cache_key", "StatsCache", "torch_all_gather",
]
