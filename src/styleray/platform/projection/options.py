"""The settings of ``styleray project``: one frozen dataclass, checked on construction (messages name flags).

Light on purpose (torch, numpy and Pillow are imported when a configuration is built, not with this module),
so that the CLI can read the defaults and ``styleray --help`` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from styleray.datasets.prepare.sources import RAW_IMAGE_EXTENSIONS, parse_location

if TYPE_CHECKING:
    from styleray.models.projection.pivotal import PivotalConfig
    from styleray.models.projection.search import ProjectionConfig


@dataclass(frozen=True)
class ProjectOptions:
    checkpoint: str  # --checkpoint: a checkpoint folder, or a run folder (its newest checkpoint)
    target: str  # --target: an image file, a folder (recursive), a .zip or s3://bucket/prefix (or an object)
    out: str  # --out: a folder or s3://bucket/prefix; one sub-folder per target for a folder of targets
    steps: int = 1000  # --steps
    space: str = "w"  # --space: w or w+
    seed: int = 0  # --seed
    distance: str = "auto"  # --distance: auto, vgg16 or pixel-msssim
    vgg16: str | None = None  # --vgg16: VGG16 weights file (default: $STYLERAY_VGG16, then the cache folder)
    pti_steps: int = 0  # --pti-steps: pivotal tuning steps after the search; 0 = none
    frame: str = "auto"  # --frame: auto, prepare or resize
    class_idx: int | None = None  # --class: a conditional model's class for the starting w
    device: str | None = None  # --device: torch device; None = cuda when available
    workers: int | None = None  # --workers: projection actors for a folder (default: the cluster's CPUs or GPUs)
    gpus: bool = False  # --gpus: one GPU per actor
    gif_frames: int = 50  # frames of progress.gif
    progress: bool = True  # a progress bar

    def __post_init__(self) -> None:
        from styleray.datasets.prepare.target import FRAMES
        from styleray.models.projection.choose import DISTANCE_CHOICES

        self.search_config()  # checks --steps, --space
        if self.pti_steps:
            self.pivotal_config()
        if self.pti_steps < 0:
            raise ValueError(f"--pti-steps {self.pti_steps} must be >= 0 (0: no pivotal tuning)")
        if self.distance not in DISTANCE_CHOICES:
            raise ValueError(f"--distance {self.distance!r} must be one of {', '.join(DISTANCE_CHOICES)}")
        if self.frame not in FRAMES:
            raise ValueError(f"--frame {self.frame!r} must be one of {', '.join(FRAMES)}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers {self.workers} must be >= 1")
        if self.gif_frames < 2:
            raise ValueError(f"gif_frames {self.gif_frames} must be >= 2")
        parse_location(self.out, "--out", allow_zip=False)
        parse_location(self.target, "--target", allow_zip=True)

    def search_config(self) -> "ProjectionConfig":
        from styleray.models.projection.search import ProjectionConfig

        return ProjectionConfig(steps=self.steps, space=self.space, seed=self.seed, class_idx=self.class_idx)

    def pivotal_config(self) -> "PivotalConfig | None":
        from styleray.models.projection.pivotal import PivotalConfig

        return PivotalConfig(steps=self.pti_steps) if self.pti_steps else None

    @property
    def single_image(self) -> bool:
        """--target names one image file (by its extension), not a folder, zip or prefix of images."""
        return self.target.lower().endswith(RAW_IMAGE_EXTENSIONS)
