"""Which distance a projection minimises: ``--distance auto|vgg16|pixel-msssim``.

``auto`` takes the VGG16 distance when its weights file is found (``--vgg16 PATH``, ``$STYLERAY_VGG16``,
the cache folder) and otherwise the weights-free ``pixel-msssim``, saying which and why. A path that was
given explicitly (flag or variable) and is missing is an error even under ``auto``: the user asked for it.
"""

from __future__ import annotations

import logging
import os

from styleray.models.projection.distances import PIXEL_MSSSIM, Distance, PixelMSSSIM
from styleray.models.projection.vgg16 import VGG16, VGG16_WEIGHTS, VGG16Distance, load_vgg16
from styleray.models.weights import MissingWeightsError

log = logging.getLogger(__name__)

AUTO = "auto"
DISTANCE_CHOICES = (AUTO, VGG16, PIXEL_MSSSIM)


def build_distance(choice: str = AUTO, vgg16: str | None = None) -> tuple[Distance, str]:
    """(the distance, one line saying which one and why)."""
    if choice not in DISTANCE_CHOICES:
        raise ValueError(f"--distance {choice!r} must be one of {', '.join(DISTANCE_CHOICES)}")
    if choice == PIXEL_MSSSIM:
        if vgg16:
            raise ValueError(f"--distance {PIXEL_MSSSIM} uses no weights; drop --vgg16 {vgg16}")
        return PixelMSSSIM(), f"distance: {PixelMSSSIM.description}"
    explicit = bool(vgg16 or os.environ.get(VGG16_WEIGHTS.env))
    try:
        net = load_vgg16(vgg16)
    except MissingWeightsError as e:
        if choice == VGG16 or explicit:
            raise
        return PixelMSSSIM(), f"distance: {PixelMSSSIM.description}; the VGG16 distance needs {e}"
    file = VGG16_WEIGHTS.find(vgg16)
    return VGG16Distance(net), f"distance: {VGG16Distance.description}, weights {file}"
