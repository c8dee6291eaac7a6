"""``styleray metrics``: FID, KID and the diversity ratio of a checkpoint's G_ema against a prepared dataset."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EvaluateOptions:
    metrics: str = "fid,kid"  # comma-separated: fid, kid
    num_gen: int = 50_000  # generated images (the papers' FID uses 50000)
    extractor: str = "inception-v3"  # registered feature extractor
    weights: str | None = None  # the extractor's weights (--inception); None: its own lookup
    batch: int = 32  # images per generator/extractor call
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    cache: bool = True  # read and write the dataset's statistics in DATA/.styleray-stats/
    device: str | None = None  # None: cuda if available


def evaluate_checkpoint(checkpoint: str, data: str, options: EvaluateOptions = EvaluateOptions()) -> dict[str, Any]:
    """The metrics of ``checkpoint`` (a checkpoint or run folder) against the images in ``data``; ValueError
    for a bad option, missing extractor weights, or data that does not match the generator."""
    import torch

    from styleray.models import metrics
    from styleray.platform.checkpoint import load_generator

    names = metrics.parse_metrics(options.metrics)
    if options.num_gen < 2:
        raise ValueError(f"--num-gen {options.num_gen} must be >= 2")
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = metrics.build_extractor(options.extractor, options.weights, device)  # fails fast without weights
    G, ckpt = load_generator(checkpoint, device)
    real = _dataset_stats(data, G, extractor, options, ckpt.uri)
    result = metrics.evaluate_generator(
        G, real, extractor, metrics=names, num_gen=options.num_gen, labels=_labels(data, G),
        batch_size=options.batch, kid_subsets=options.kid_subsets, kid_subset_size=options.kid_subset_size,
        device=device,
    )
    result.update(checkpoint=ckpt.uri, kimg=ckpt.kimg, data=os.path.abspath(data))
    return result


def _dataset_stats(data: str, G, extractor, options: EvaluateOptions, ckpt_uri: str):
    from PIL import Image

    from styleray.datasets.read.folder import list_image_files, load_image_folder
    from styleray.models import metrics
    from styleray.platform.train.metrics import FolderStatsCache

    if not os.path.isdir(data) or not (files := list_image_files(data)):
        raise ValueError(f"--data {data} is not a folder of images (run `styleray prepare` first)")
    res, ch = G.img_resolution, G.img_channels
    with Image.open(os.path.join(data, files[0])) as im:
        if im.size != (res, res):
            raise ValueError(
                f"--data {data} holds {im.width}x{im.height} images but {ckpt_uri} generates {res}x{res}; "
                f"metrics compare at the generator's resolution: prepare the data with --resolution {res}"
            )
    return metrics.dataset_stats(
        data, extractor, files=files, resolution=res, channels=ch, batch_size=options.batch,
        cache=FolderStatsCache(data) if options.cache else None,
        load_images=lambda: load_image_folder(data, resolution=res, use_labels=False, channels=ch).images,
    )


def _labels(data: str, G):
    """The dataset's classes, for a conditional G (generated classes follow them); None otherwise."""
    import numpy as np

    from styleray.datasets.read.folder import list_image_files, read_labels

    if G.c_dim == 0:
        return None
    label_map, _ = read_labels(data)
    return np.array([label_map[f] for f in list_image_files(data) if f in label_map]) if label_map else None
