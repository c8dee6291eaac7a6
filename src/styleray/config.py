"""Typed configuration shared by every part of styleray.

Frozen dataclasses per concern, validated in ``__post_init__`` with messages that name the flag and the fix,
and named presets in one typed mapping (the ``cfg_specs`` of stylegan2-ada-pytorch's ``train.py``, typed).

Nothing here imports torch or Ray, so the CLI can build and check a config instantly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

MixedPrecision = Literal["bf16", "fp16", "off"]
AugmentMode = Literal["ada", "fixed", "noaug"]
# --precision: "auto" picks bf16 on GPUs of compute capability >= 8.0, fp16 below, fp32 on CPU
# (models/precision.py decides, on the worker that knows its device).
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")

# The augmentation pipelines of the reference's ``--augpipe``: which ops of the augment pipe are on (each with
# probability multiplier 1). ``bgc`` (blit, geometric, color) is the ADA paper's default.
_BLIT = ("xflip", "rotate90", "xint")
_GEOM = ("scale", "rotate", "aniso", "xfrac")
_COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
AUGMENT_PIPES: dict[str, tuple[str, ...]] = {
    "blit": _BLIT,
    "geom": _GEOM,
    "color": _COLOR,
    "filter": ("imgfilter",),
    "noise": ("noise",),
    "cutout": ("cutout",),
    "bg": _BLIT + _GEOM,
    "bgc": _BLIT + _GEOM + _COLOR,
    "bgcf": _BLIT + _GEOM + _COLOR + ("imgfilter",),
    "bgcfn": _BLIT + _GEOM + _COLOR + ("imgfilter", "noise"),
    "bgcfnc": _BLIT + _GEOM + _COLOR + ("imgfilter", "noise", "cutout"),
}


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the generator and the discriminator (StyleGAN2, config F)."""

    resolution: int = 256  # Output image side in pixels; a power of two >= 4.
    img_channels: int = 3  # 3 for RGB, 1 for grayscale.
    c_dim: int = 0  # Number of classes for conditional training; 0 = unconditional.
    z_dim: int = 512  # Latent z dimensionality.
    w_dim: int = 512  # Intermediate latent w dimensionality.
    mapping_layers: int = 8  # Fully connected layers in the mapping network.
    channel_base: int = 32768  # Channels at a resolution are min(channel_base // res, channel_max).
    channel_max: int = 512  # Upper bound on channels per layer.
    num_fp16_res: int = 4  # Top resolutions run in reduced precision on CUDA (0 = none). fp32 on CPU.
    mixed_precision: MixedPrecision = "bf16"  # Reduced precision type on CUDA ("off": fp32); training runs what
    # --precision chooses for the card (models/precision.py), serving and sampling run this.
    conv_clamp: float | None = 256.0  # Clamp activations of reduced-precision layers; None = no clamp.
    mbstd_group: int = 4  # Minibatch standard deviation group size (per worker batch must be divisible).
    mbstd_channels: int = 1  # Features computed by the minibatch std layer.

    def __post_init__(self) -> None:
        if not (_is_power_of_two(self.resolution) and self.resolution >= 4):
            lo = 2 ** max(2, math.floor(math.log2(max(self.resolution, 1))))
            raise ValueError(
                f"--resolution {self.resolution} must be a power of two >= 4 (try {lo} or {lo * 2})"
            )
        if self.img_channels not in (1, 3):
            raise ValueError(f"img_channels {self.img_channels} must be 1 (grayscale) or 3 (RGB)")
        for name in ("z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max", "mbstd_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.c_dim < 0:
            raise ValueError(f"c_dim must be >= 0, got {self.c_dim}")
        if self.mbstd_group < 1:
            raise ValueError(f"mbstd_group must be >= 1, got {self.mbstd_group}")
        if self.num_fp16_res < 0:
            raise ValueError(f"num_fp16_res must be >= 0, got {self.num_fp16_res}")
        if self.mixed_precision not in ("bf16", "fp16", "off"):
            raise ValueError(f"mixed_precision {self.mixed_precision!r} must be one of bf16, fp16, off")

    @property
    def log2_resolution(self) -> int:
        return int(math.log2(self.resolution))

    def channels_at(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, regularisation, augmentation and schedule (StyleGAN2-ADA's defaults)."""

    batch: int = 32  # Total batch over all workers.
    workers: int = 1  # Training processes (one per GPU); batch is split evenly.
    # Images per worker per round: each worker accumulates gradients over batch / (workers * batch_gpu) rounds
    # before an optimizer step (the reference's batch_gpu). None = one round of the whole per-worker batch.
    batch_gpu: int | None = None
    lr_g: float = 0.002  # Generator learning rate (before lazy-regularisation correction).
    lr_d: float = 0.002  # Discriminator learning rate.
    betas: tuple[float, float] = (0.0, 0.99)  # Adam betas (before lazy-regularisation correction).
    eps: float = 1e-8  # Adam epsilon.
    r1_gamma: float = 10.0  # R1 regularisation weight.
    r1_interval: int = 16  # Lazy R1: every this many minibatches (D reg).
    pl_weight: float = 2.0  # Path length regularisation weight; 0 disables it.
    pl_interval: int = 4  # Lazy path length reg: every this many minibatches (G reg).
    pl_batch_shrink: int = 2  # Path length reg runs on batch // this.
    pl_decay: float = 0.01  # Decay of the path length running mean.
    style_mixing: float = 0.9  # Probability of style mixing regularisation.
    ema_kimg: float = 10.0  # Half-life of the G_ema weights, in thousands of images.
    ema_rampup: float | None = None  # Ramp-up of the EMA half-life (fraction of images seen); None = off.
    augment: AugmentMode = "ada"  # ada = adaptive p, fixed = constant augment_p, noaug = off.
    augment_p: float = 0.0  # Initial (ada) or constant (fixed) augmentation probability.
    augment_pipe: str = "bgc"  # Which augmentations (the reference's --augpipe): a key of AUGMENT_PIPES.
    ada_target: float = 0.6  # Target value of r_t = E[sign(D(real))].
    ada_interval: int = 4  # Adjust p every this many minibatches.
    ada_kimg: float = 500.0  # p can go from 0 to 1 in this many kimg.
    kimg: float = 25000.0  # Total training length in thousands of images.
    tick_kimg: float = 4.0  # Progress report interval in kimg.
    snap: int = 50  # Checkpoint and sample grid every this many ticks.
    seed: int = 0  # Global random seed.
    mirror: bool = False  # Add x-flipped copies of the data (done on the fly).
    allow_tf32: bool = False  # Let CUDA matmuls and convolutions use TF32 in the training step (reference: off).
    precision: str = "auto"  # Reduced-precision layers' type: auto, fp32, bf16 or fp16 (models/precision.py).
    compile: bool = False  # torch.compile G's synthesis and D (main phases) and D with its input gradient (R1).
    keep_checkpoints: int = 3  # Keep this many latest checkpoints (plus the best one).
    unstable_ticks: int = 3  # Roll back after this many consecutive collapsed ticks (NaN/Inf losses: at once).
    collapse_d_loss: float = 0.05  # A tick is collapsed when the D loss is below this while the G loss climbs.
    max_rollbacks: int = 3  # Roll back to the last stable checkpoint at most this many times; 0 = never.
    freeze_d: int = 0  # FreezeD: the discriminator's first this many layers (from the image) are not trained.

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers} must be >= 1")
        if self.batch < 1:
            raise ValueError(f"--batch {self.batch} must be >= 1")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"--precision {self.precision!r} must be one of {', '.join(PRECISION_CHOICES)}")
        if self.batch % self.workers != 0:
            fix = max(self.workers, round(self.batch / self.workers) * self.workers)
            raise ValueError(
                f"--batch {self.batch} must be a multiple of --workers {self.workers} (try --batch {fix})"
            )
        self._check_batch_gpu()
        for name in ("lr_g", "lr_d", "ema_kimg", "ada_kimg", "tick_kimg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.kimg < 0:
            raise ValueError(f"--kimg must be >= 0, got {self.kimg}")
        if self.r1_gamma < 0 or self.pl_weight < 0:
            raise ValueError("--gamma and pl_weight must be >= 0")
        for name in ("r1_interval", "pl_interval", "pl_batch_shrink", "ada_interval", "snap", "keep_checkpoints",
                     "unstable_ticks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_rollbacks < 0:
            raise ValueError(f"--max-rollbacks {self.max_rollbacks} must be >= 0 (0 = stop at the first instability)")
        if self.freeze_d < 0:
            raise ValueError(f"--freeze-d {self.freeze_d} must be >= 0 (0 = train every discriminator layer)")
        if not self.collapse_d_loss >= 0:
            raise ValueError(f"collapse_d_loss {self.collapse_d_loss} must be >= 0 (0 = only NaN/Inf counts)")
        if not 0.0 <= self.style_mixing <= 1.0:
            raise ValueError(f"style_mixing {self.style_mixing} must lie in [0, 1]")
        if not 0.0 <= self.augment_p <= 1.0:
            raise ValueError(f"--augment-p {self.augment_p} must lie in [0, 1]")
        if self.augment not in ("ada", "fixed", "noaug"):
            raise ValueError(f"--augment {self.augment!r} must be one of ada, fixed, noaug")
        if self.augment_pipe not in AUGMENT_PIPES:
            raise ValueError(f"--augpipe {self.augment_pipe!r} must be one of {', '.join(AUGMENT_PIPES)}")
        if not 0.0 < self.ada_target < 1.0:
            raise ValueError(f"--target {self.ada_target} must lie in (0, 1) (the paper uses 0.6)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas {self.betas} must be two values in [0, 1)")

    def _check_batch_gpu(self) -> None:
        if self.batch_gpu is None:
            return
        if self.batch_gpu < 1:
            raise ValueError(f"--batch-gpu {self.batch_gpu} must be >= 1 (images per worker per round)")
        step = self.workers * self.batch_gpu
        if self.batch % step != 0:
            per_worker = self.batch // self.workers
            divisor = max(d for d in range(1, min(self.batch_gpu, per_worker) + 1) if per_worker % d == 0)
            raise ValueError(
                f"--batch {self.batch} must be a multiple of --workers {self.workers} x --batch-gpu {self.batch_gpu} "
                f"= {step} (each worker accumulates rounds of --batch-gpu images); "
                f"try --batch {max(step, round(self.batch / step) * step)} or --batch-gpu {divisor}"
            )

    @property
    def batch_per_worker(self) -> int:
        return self.batch // self.workers

    @property
    def round_batch(self) -> int:
        """Images per worker per round (--batch-gpu; the whole per-worker batch when unset)."""
        return self.batch_gpu or self.batch_per_worker

    @property
    def rounds(self) -> int:
        """Rounds each worker accumulates gradients over before an optimizer step."""
        return self.batch_per_worker // self.round_batch


@dataclass(frozen=True)
class RunSpec:
    """A resolved training run: model + training schedule + where data and results live (written as
    config.json into every run folder and checkpoint). Named apart from ``ray.train.RunConfig`` and
    ``ray.tune.RunConfig`` on purpose."""

    model: ModelConfig
    train: TrainConfig
    preset: str = "custom"
    data: str | None = None  # Prepared dataset: folder, zip or s3:// URI.
    out: str | None = None  # Run folder (checkpoints, metrics, grids): local path or s3:// URI.
    device: str = "cpu"  # torch device for single-process training.
    init_from: str | None = None  # A new run starts from these weights (a checkpoint URI or an NVIDIA .pkl).

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunSpec":
        train = dict(d["train"])
        train["betas"] = tuple(train.get("betas", (0.0, 0.99)))
        return cls(
            model=ModelConfig(**d["model"]),
            train=TrainConfig(**train),
            preset=d.get("preset", "custom"),
            data=d.get("data"),
            out=d.get("out"),
            device=d.get("device", "cpu"),
            init_from=d.get("init_from"),
        )


# ---------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PresetSpec:
    """One row of the reference's cfg_specs table; ``None`` fields are computed (``auto``)."""

    description: str
    ref_workers: int | None  # Number of GPUs the figures were tuned for (None = any).
    batch: int | None  # Total batch (None = auto).
    mbstd: int | None  # Minibatch std group (None = auto).
    fmaps: float | None  # channel_base = fmaps * 32768 (None = auto).
    lr: float | None  # Learning rate of G and D (None = auto).
    gamma: float | None  # R1 weight (None = auto).
    ema_kimg: float | None  # G_ema half-life (None = auto).
    ramp: float | None  # G_ema ramp-up.
    map: int  # Mapping layers.
    channel_max: int = 512
    z_dim: int = 512
    w_dim: int = 512
    extra_model: Mapping[str, Any] = field(default_factory=dict)
    extra_train: Mapping[str, Any] = field(default_factory=dict)


PRESETS: dict[str, PresetSpec] = {
    "auto": PresetSpec(
        "Reference --cfg auto: sizes computed from resolution and worker count.",
        None, None, None, None, None, None, None, 0.05, map=2,
    ),
    "stylegan2": PresetSpec(
        "StyleGAN2 config F at 1024 (mixed precision on the top resolutions).",
        8, 32, 4, 1.0, 0.002, 10.0, 10.0, None, map=8,
    ),
    "paper256": PresetSpec("ADA paper, 256x256 datasets.", 8, 64, 8, 0.5, 0.0025, 1.0, 20.0, None, map=8),
    "paper512": PresetSpec("ADA paper, 512x512 datasets.", 8, 64, 8, 1.0, 0.0025, 0.5, 20.0, None, map=8),
    "paper1024": PresetSpec("ADA paper, 1024x1024 datasets.", 8, 32, 4, 1.0, 0.002, 2.0, 10.0, None, map=8),
    "cpu-tiny": PresetSpec(
        "A few channels, for tests and the CPU demo (16-32 px; trains in minutes on 2 cores).",
        None, 16, 4, 2048 / 32768, 0.0025, 0.1, 1.0, 0.05, map=2,
        channel_max=64, z_dim=64, w_dim=64,
        extra_train={"tick_kimg": 0.5, "snap": 4, "ada_kimg": 20.0},
    ),
}


def auto_batch(resolution: int, workers: int) -> int:
    """The reference's auto batch: max(min(workers * min(4096 // res, 32), 64), workers)."""
    return max(min(workers * min(4096 // resolution, 32), 64), workers)


def filled_spec(spec: PresetSpec, resolution: int, workers: int) -> PresetSpec:
    """The preset with its computed (``None``) fields filled in as the reference's ``train.py`` does: from the
    resolution and the worker count only, never from an overriding ``--batch`` (which changes the batch alone)."""
    batch = spec.batch if spec.batch is not None else auto_batch(resolution, workers)
    ref_workers = spec.ref_workers if spec.ref_workers is not None else workers
    return dataclasses.replace(
        spec,
        ref_workers=ref_workers,
        batch=batch,
        mbstd=spec.mbstd if spec.mbstd is not None else min(max(batch // workers, 1), 4),
        fmaps=spec.fmaps if spec.fmaps is not None else (1.0 if resolution >= 512 else 0.5),
        lr=spec.lr if spec.lr is not None else (0.002 if resolution >= 1024 else 0.0025),
        gamma=spec.gamma if spec.gamma is not None else 0.0002 * resolution**2 / batch,
        ema_kimg=spec.ema_kimg if spec.ema_kimg is not None else batch * 10 / 32,
    )


def default_batch_gpu(spec: PresetSpec, batch: int, workers: int, batch_given: bool) -> int:
    """The reference's batch_gpu: ``--batch / --workers`` when --batch is given, else the preset's batch over the
    GPUs it was tuned for (paper512 on one GPU: 8 rounds of 8), never more than this worker's share."""
    per_worker = max(batch // workers, 1)
    if batch_given or spec.batch is None or spec.ref_workers is None:
        return per_worker
    return min(max(spec.batch // spec.ref_workers, 1), per_worker)


def resolve_preset(
    name: str,
    *,
    resolution: int,
    workers: int = 1,
    img_channels: int = 3,
    c_dim: int = 0,
    model_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Model and training configs for a named preset, as the reference's ``train.py --cfg NAME``.

    ``auto`` derives batch, minibatch std group, channels, learning rate, gamma and EMA from the resolution
    and the worker count exactly as the reference does; an explicit ``batch`` changes the batch only.
    Overrides (e.g. from CLI flags) apply last.
    """
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is unknown; choose one of: {', '.join(PRESETS)}")
    if not (_is_power_of_two(resolution) and resolution >= 4):
        ModelConfig(resolution=resolution)  # raises the standard message
    if workers < 1:
        raise ValueError(f"--workers {workers} must be >= 1")
    spec = filled_spec(PRESETS[name], resolution, workers)
    train_overrides = {k: v for k, v in (train_overrides or {}).items() if v is not None}
    batch = int(train_overrides.get("batch", spec.batch))
    batch_gpu = int(train_overrides.get("batch_gpu", default_batch_gpu(spec, batch, workers, "batch" in train_overrides)))
    model_kwargs = _preset_model(spec, resolution, img_channels, c_dim, batch_gpu)
    model_kwargs.update({k: v for k, v in (model_overrides or {}).items() if v is not None})
    train_kwargs = {**_preset_train(spec, batch, workers, batch_gpu), **train_overrides}
    if "betas" in train_kwargs:
        train_kwargs["betas"] = tuple(train_kwargs["betas"])
    model = ModelConfig(**model_kwargs)
    train = TrainConfig(**train_kwargs)
    check_mbstd_round(model, train, name)
    return model, train


def _preset_model(spec: PresetSpec, resolution: int, img_channels: int, c_dim: int, batch_gpu: int) -> dict[str, Any]:
    """ModelConfig's arguments from a filled preset."""
    return dict(
        resolution=resolution,
        img_channels=img_channels,
        c_dim=c_dim,
        z_dim=spec.z_dim,
        w_dim=spec.w_dim,
        mapping_layers=spec.map,
        channel_base=int(spec.fmaps * 32768),
        channel_max=spec.channel_max,
        mbstd_group=min(spec.mbstd, max(batch_gpu, 1)),  # D groups min(group, round) samples anyway
        **dict(spec.extra_model),
    )


def _preset_train(spec: PresetSpec, batch: int, workers: int, batch_gpu: int) -> dict[str, Any]:
    """TrainConfig's arguments from a filled preset."""
    return dict(
        batch=batch,
        workers=workers,
        batch_gpu=batch_gpu,
        lr_g=spec.lr,
        lr_d=spec.lr,
        r1_gamma=spec.gamma,
        ema_kimg=spec.ema_kimg,
        ema_rampup=spec.ramp,
        **dict(spec.extra_train),
    )


def check_mbstd_round(model: ModelConfig, train: TrainConfig, preset: str = "custom") -> None:
    """The discriminator's minibatch std layer splits each round's images into groups of
    min(mbstd_group, round) samples: a round must hold a whole number of groups."""
    group = min(model.mbstd_group, train.round_batch)
    if train.round_batch % group != 0:
        raise ValueError(
            f"a round of {train.round_batch} images per worker (--batch {train.batch} / --workers {train.workers}"
            f" / {train.rounds} round(s) of --batch-gpu) must be divisible by the minibatch std group {group} of "
            f"--preset {preset}; make --batch-gpu a multiple of {group} (or change --batch)"
        )
