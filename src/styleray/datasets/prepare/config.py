"""The typed configuration of ``styleray prepare``: one frozen dataclass, validated on construction.

Light on purpose (standard library only), so that the CLI can read its defaults without importing numpy, scipy
or Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from styleray.datasets.prepare.sources import Location, parse_location

FRAMINGS = ("upper-body", "full-body")  # class order of the framing labels
HASH_BITS = 192  # perceptual hash length (checks.phash)
DEFAULT_REMBG_MODEL = "u2net"
REMOVERS = ("auto", "classic", "rembg")
FRAMING_CHOICES = ("all",) + FRAMINGS
ENGINES = ("ray", "local")


@dataclass(frozen=True)
class PrepareConfig:
    source: str  # SOURCE: folder (recursive), .zip, or s3://bucket/prefix
    out: str  # OUT: folder or s3://bucket/prefix
    resolution: int = 512  # --resolution: output side, pixels
    remover: str = "auto"  # --remover: classic, rembg, or auto (rembg when its u2net file is present)
    rembg_model: str = DEFAULT_REMBG_MODEL  # --rembg-model: rembg model NAME or PATH to an .onnx file
    framing: str = "all"  # --framing: keep all, upper-body or full-body images
    clusters: int = 0  # --clusters: k-means classes; 0 = framing classes
    workers: int | None = None  # --workers: parallel tasks / rembg actors; None = the cluster's CPUs
    engine: str = "ray"  # --engine: ray (Ray Data) or local (a plain loop in this process)
    margin: float = 0.05  # --margin: crop margin around the figure, fraction of its longer side
    min_size: int = 64  # --min-size: reject images whose shorter side is smaller, pixels
    max_pixels: int = 40_000_000  # --max-pixels: refuse larger images before decoding (decompression bombs)
    min_confidence: float = 0.9  # --min-confidence: mask confidence (0..1) below which an image is rejected
    min_foreground: float = 0.03  # --min-foreground: smallest foreground share of the image
    max_frame_touch: float = 0.3  # --max-frame-touch: largest share of the image's edge pixels in the foreground
    min_cartoon: float = 0.3  # --min-cartoon: smallest cartoon score (top-16 colour share), 0 = off
    dup_distance: int = 20  # --dup-distance: near-duplicate hash distance in bits; -1 = off
    seed: int = 0  # --seed: k-means seed
    batch_size: int | None = None  # images per Ray Data task; None = from the files' mean size (see prepare.py)
    examples: int = 24  # contact-sheet examples per section
    progress: bool = True  # show a progress bar
    work_size: int | None = None  # decode large images down to this longer side; None = max(1024, 2 x resolution)

    def __post_init__(self):
        parse_location(self.source, "SOURCE", allow_zip=True)
        parse_location(self.out, "OUT", allow_zip=False)
        if not 16 <= self.resolution <= 4096:
            raise ValueError(f"--resolution {self.resolution} must be within 16..4096 (e.g. --resolution 512)")
        if self.resolution & (self.resolution - 1):
            raise ValueError(f"--resolution {self.resolution} must be a power of two for StyleGAN2 "
                             f"(try --resolution {2 ** round(math.log2(self.resolution))})")
        _choice(self.remover, REMOVERS, "--remover")
        _choice(self.framing, FRAMING_CHOICES, "--framing")
        _choice(self.engine, ENGINES, "--engine")
        if self.clusters < 0:
            raise ValueError(f"--clusters {self.clusters} must be >= 0 (0: label by framing)")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers {self.workers} must be >= 1 (or leave it out for all CPUs)")
        if not 0 <= self.margin <= 1:
            raise ValueError(f"--margin {self.margin} must be within 0..1 (a fraction of the figure's size)")
        if self.min_size < 1:
            raise ValueError(f"--min-size {self.min_size} must be >= 1 pixel")
        if self.max_pixels < self.min_size ** 2:
            raise ValueError(f"--max-pixels {self.max_pixels} is below --min-size squared ({self.min_size ** 2})")
        for flag, value in (("--min-confidence", self.min_confidence), ("--min-foreground", self.min_foreground),
                            ("--max-frame-touch", self.max_frame_touch), ("--min-cartoon", self.min_cartoon)):
            if not 0 <= value <= 1:
                raise ValueError(f"{flag} {value} must be within 0..1")
        if self.dup_distance < -1 or self.dup_distance > HASH_BITS:
            raise ValueError(f"--dup-distance {self.dup_distance} must be within -1..{HASH_BITS} (-1: off)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size} must be >= 1")
        if self.work_size is not None and self.work_size < self.resolution:
            raise ValueError(f"work_size {self.work_size} must be >= --resolution {self.resolution}")

    @property
    def source_location(self) -> Location:
        return parse_location(self.source, "SOURCE", allow_zip=True)

    @property
    def out_location(self) -> Location:
        return parse_location(self.out, "OUT", allow_zip=False)


def _choice(value: str, options: tuple[str, ...], flag: str) -> None:
    if value not in options:
        raise ValueError(f"{flag} {value!r} must be one of {', '.join(options)}")
