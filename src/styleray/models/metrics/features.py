"""Features of images, of a generator and of a dataset, optionally split across the ranks of a process group.

Work is split in contiguous shards (rank r takes items [N r / W, N (r+1) / W)), each rank extracts its
shard, and an all-gather puts the rows back in order on every rank. Networks always run on batches of exactly
``batch_size`` rows (the last one padded with copies of its first row), so a row's features do not depend on
which other rows share its batch: W ranks give the features one process gives.

Dataset statistics can be cached (``StatsCache``: the platform keeps them next to the dataset) as ``.npz``
under a key of extractor name, resolution, channels and a hash of the file list (names, sizes, modification
times): any changed, added or removed file changes the key. This module never imports the dataset reader nor
the storage layer (``models`` depends on nothing but ``config``): callers pass the file list, a function
that loads the images, and the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from styleray.models.metrics.extractors import Extractor
from styleray.models.sampling import seeds_to_z

log = logging.getLogger(__name__)

AllGather = Callable[[torch.Tensor], Sequence[torch.Tensor]]  # local [k, D] -> one tensor per rank, rank order
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class FeatureStats:
    """Features of a set of images and their Gaussian fit (the covariance is the unbiased one, N - 1)."""

    features: np.ndarray  # [N, D] float32, kept for KID and the diversity check
    extractor: str  # registry name of the extractor that made them
    meta: dict = field(default_factory=dict)  # resolution, channels, source, ...
    mu: np.ndarray | None = None  # [D] float64; None = computed from the features
    sigma: np.ndarray | None = None  # [D, D] float64; None = computed from the features

    def __post_init__(self) -> None:
        f = np.asarray(self.features, dtype=np.float32)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"feature statistics need at least 2 feature rows [N, D], got shape {f.shape}")
        self.features = f
        if self.mu is None or self.sigma is None:
            f64 = f.astype(np.float64)
            self.mu = f64.mean(axis=0)
            self.sigma = np.cov(f64, rowvar=False)
        d = f.shape[1]
        if self.mu.shape != (d,) or self.sigma.shape != (d, d):
            raise ValueError(f"mu {self.mu.shape} / sigma {self.sigma.shape} do not match {d}-d features")

    @property
    def num(self) -> int:
        return int(self.features.shape[0])

    def to_bytes(self) -> bytes:
        """The statistics as an ``.npz`` (features, mu, sigma and a JSON header)."""
        buf = io.BytesIO()
        header = json.dumps({"version": CACHE_VERSION, "extractor": self.extractor, "meta": self.meta})
        np.savez(buf, features=self.features, mu=self.mu, sigma=self.sigma, header=np.array(header))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "statistics") -> "FeatureStats":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            if header.get("version") != CACHE_VERSION:
                raise ValueError(f"{source}: cache version {header.get('version')} != {CACHE_VERSION}")
            return cls(z["features"], header["extractor"], header.get("meta", {}), z["mu"], z["sigma"])


class StatsCache(Protocol):
    """Where dataset statistics are kept between runs (the platform stores them next to the dataset)."""

    def read(self, key: str) -> bytes | None: ...  # None: not cached

    def write(self, key: str, data: bytes) -> None: ...  # atomic; OSError when it cannot be kept


# ---------------------------------------------------------------------------------------------------------
# Sharding and gathering
# ---------------------------------------------------------------------------------------------------------


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's contiguous share [start, stop) of n items; shares differ in size by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size {world_size})")
    return n * rank // world_size, n * (rank + 1) // world_size


def torch_all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """all_gather over the default torch.distributed process group (NCCL needs t on the rank's GPU)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("world_size > 1 needs an initialized torch.distributed process group, or pass all_gather=")
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def gather_rows(local: torch.Tensor, n: int, rank: int, world_size: int, all_gather: AllGather | None = None) -> torch.Tensor:
    """The [n, D] rows of every rank's shard (see shard_bounds), in order, on every rank."""
    start, stop = shard_bounds(n, rank, world_size)
    if local.shape[0] != stop - start:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows but its shard of {n} is {stop - start}")
    if world_size == 1:
        return local
    counts = [b - a for a, b in (shard_bounds(n, r, world_size) for r in range(world_size))]
    padded = local.new_zeros([max(counts), *local.shape[1:]])
    padded[: local.shape[0]] = local
    parts = list((all_gather or torch_all_gather)(padded))
    if len(parts) != world_size:
        raise ValueError(f"all_gather returned {len(parts)} tensors for world_size {world_size}")
    return torch.cat([p[:c].to(local.device) for p, c in zip(parts, counts)])


def _fixed_batches(n: int, batch_size: int):
    """(start, stop) of consecutive batches; callers pad each to exactly batch_size rows."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be >= 1")
    for i in range(0, n, batch_size):
        yield i, min(i + batch_size, n)


def _pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[0] == size else torch.cat([x, x[:1].expand(size - x.shape[0], *x.shape[1:])])


# ---------------------------------------------------------------------------------------------------------
# Features of images and of a generator
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    images,  # uint8 [N, H, W, C] (NumPy or torch)
    extractor: Extractor,
    *,
    batch_size: int = 64,  # Rows per extractor call (fixed; the last batch is padded).
    rank: int = 0,
    world_size: int = 1,
    all_gather: AllGather | None = None,  # Default: torch.distributed's (only used when world_size > 1).
) -> np.ndarray:  # [N, D] float32, on every rank
    images = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {tuple(images.shape)}")
    n = images.shape[0]
    start, stop = shard_bounds(n, rank, world_size)
    device = extractor.device
    out = []
    for a, b in _fixed_batches(stop - start, batch_size):
        batch = images[start + a : start + b].to(device).permute(0, 3, 1, 2)  # [B, C, H, W]
        out.append(extractor(_pad_rows(batch, batch_size))[: b - a])
    local = torch.cat(out) if out else torch.zeros([0, extractor.feature_dim], device=device)
    return gather_rows(local, n, rank, world_size, all_gather).cpu().numpy()


def class_indices_for(G: torch.nn.Module, num_images: int, labels: np.ndarray | None = None, seed: int = 0) -> np.ndarray | None:
    """The class of each generated image of a conditional G: drawn from the dataset's labels (so classes keep
    their frequency), or uniformly when there are none. None for an unconditional G. Same on every rank."""
    c_dim = int(getattr(G, "c_dim", 0))
    if c_dim == 0:
        return None
    rng = np.random.default_rng(seed)
    if labels is not None and len(labels):
        return np.asarray(labels, dtype=np.int64)[rng.integers(len(labels), size=num_images)]
    return rng.integers(c_dim, size=num_images)


@torch.no_grad()
def generate_uint8(
    G: torch.nn.Module, seeds: Sequence[int], classes: Sequence[int] | None = None, noise_mode: str = "random"
) -> torch.Tensor:
    """Images of G for the seeds at truncation 1: uint8 [N, C, H, W] on G's device.

    z comes from the seed (sampling.seeds_to_z) and random noise from a torch generator seeded by it, so an
    image depends on its seed only, not on the batch or the rank that made it.
    """
    device = next(G.parameters()).device
    z = seeds_to_z(seeds, G.z_dim, device)  # [N, z_dim]
    c = None
    if G.c_dim > 0:
        if classes is None:
            raise ValueError("a conditional generator needs a class per image")
        c = torch.nn.functional.one_hot(torch.as_tensor(list(classes), device=device), G.c_dim).float()
    ws = G.mapping(z, c, truncation_psi=1.0)
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds] if noise_mode == "random" else None
    img = G.synthesis(ws, noise_mode=noise_mode, generators=gens)  # [N, C, H, W] in about [-1, 1]
    return (img.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def generator_features(
    G: torch.nn.Module,  # a styleray Generator (mapping + synthesis), eval mode
    extractor: Extractor,
    num_images: int,
    *,
    first_seed: int = 0,  # Images come from seeds first_seed .. first_seed + num_images - 1.
    labels: np.ndarray | None = None,  # Dataset class labels, for a conditional G (see class_indices_for).
    batch_size: int = 32,  # Images per generator and extractor call (fixed; the last batch is padded).
    noise_mode: str = "random",
    rank: int = 0,
    world_size: int = 1,
    all_gather: AllGather | None = None,  # Default: torch.distributed's (only used when world_size > 1).
) -> np.ndarray:  # [num_images, D] float32, on every rank
    """Features of num_images generated images; each rank makes its shard of the seeds, all get all rows."""
    if num_images < 1:
        raise ValueError(f"--num-gen {num_images} must be >= 1")
    seeds = np.arange(first_seed, first_seed + num_images)
    classes = class_indices_for(G, num_images, labels, seed=first_seed)
    start, stop = shard_bounds(num_images, rank, world_size)
    out = []
    for a, b in _fixed_batches(stop - start, batch_size):
        idx = list(range(start + a, start + b))
        idx += [idx[0]] * (batch_size - len(idx))  # pad (see the module doc)
        imgs = generate_uint8(G, seeds[idx].tolist(), None if classes is None else classes[idx].tolist(), noise_mode)
        out.append(extractor(imgs.to(extractor.device))[: b - a])
    local = torch.cat(out) if out else torch.zeros([0, extractor.feature_dim], device=extractor.device)
    return gather_rows(local, num_images, rank, world_size, all_gather).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------
# Dataset statistics, cached
# ---------------------------------------------------------------------------------------------------------


def files_fingerprint(root: str, files: Sequence[str]) -> str:
    """SHA-256 over (relative name, size, mtime_ns) of each file: changes when any file changes."""
    h = hashlib.sha256()
    for rel in files:
        st = os.stat(os.path.join(root, rel))
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def stats_cache_key(root: str, files: Sequence[str], extractor: str, resolution: int, channels: int = 3) -> str:
    """The name under which the statistics of this dataset, extractor and resolution are cached."""
    return f"{extractor}-{resolution}px-{channels}ch-{files_fingerprint(root, files)[:20]}.npz"


def _cached(cache: StatsCache, key: str, extractor: Extractor) -> FeatureStats | None:
    try:
        data = cache.read(key)
        if data is None:
            return None
        stats = FeatureStats.from_bytes(data, key)
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unreadable statistics cache %s: %s", key, e)
        return None
    if stats.extractor == extractor.name and stats.features.shape[1] == extractor.feature_dim:
        log.info("dataset statistics from cache %s (%d images)", key, stats.num)
        return stats
    log.warning("ignoring %s: made by %s, not %s", key, stats.extractor, extractor.name)
    return None


def dataset_stats(
    root: str,  # the prepared dataset folder (its files are part of the cache key)
    extractor: Extractor,
    *,
    files: Sequence[str],  # image files relative to root (datasets.read.folder.list_image_files)
    load_images: Callable[[], np.ndarray],  # -> uint8 [N, H, W, C] in files' order; only called on a cache miss
    resolution: int,  # the images' side (part of the key; the loaded images are checked against it)
    channels: int = 3,
    cache: StatsCache | None = None,  # None: neither read nor write a cache
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    all_gather: AllGather | None = None,
) -> FeatureStats:
    """Reference statistics of a dataset, from the cache when it holds them (rank 0 writes the cache)."""
    key = stats_cache_key(root, files, extractor.name, resolution, channels) if cache is not None else None
    stats = _cached(cache, key, extractor) if cache is not None else None
    if stats is not None:
        return stats
    t0 = time.time()
    images = load_images()
    if images.ndim != 4 or images.shape[1:] != (resolution, resolution, channels) or len(images) != len(files):
        raise ValueError(
            f"--data {root}: loaded images {images.shape} but expected [{len(files)}, {resolution}, {resolution}, {channels}]"
        )
    feats = extract_features(images, extractor, batch_size=batch_size, rank=rank, world_size=world_size, all_gather=all_gather)
    meta = {"source": os.path.abspath(root) if root else "", "resolution": resolution, "channels": channels,
            "num": len(files)}
    stats = FeatureStats(feats, extractor.name, meta)
    log.info("dataset statistics of %d images in %.1f s", stats.num, time.time() - t0)
    if cache is not None and rank == 0:
        try:
            cache.write(key, stats.to_bytes())
            log.info("cached dataset statistics as %s", key)
        except OSError as e:
            log.warning("could not cache dataset statistics as %s (%s); they will be recomputed next time", key, e)
    return stats
