"""The settings of a training run: one typed, frozen dataclass, ``TrainSettings``.

Every way of asking for a run is built from it, with one set of rules:

    styleray train --lr-g 0.002        the argparse flags are made from the fields (help and default
                                       declared once, next to the field): ``add_arguments``
    --config FILE.yaml                 ``TrainSettings.from_mapping(yaml)``: keys are the field names (dashes
                                       or underscores), at the top level or under ``train:``
    styleray tune                      ``dataclasses.replace(base, **hyperparameters)`` (Ray Tune's
                                       ``train_loop_config`` shape); every replaced value is checked again
    styleray queue add                 the queue stores ``to_json()``; the manager submits ``to_argv()``
    best_config.yaml                   ``changed()``: the settings that differ from the defaults

A value is checked where it enters (``__post_init__``), whatever the route: a bad one raises
``SettingsError`` (a ``ValueError``) naming the key, its flag, the value and what is allowed. Resolving the
settings against a dataset (``resolve``) gives the run's model and training configuration
(``config.RunSpec``); presets and the reference's ``auto`` rules live in ``config.py``.

A new train setting is one field below. Standard library and ``config`` only: nothing heavy is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from styleray.config import AUGMENT_PIPES, PRECISION_CHOICES, PRESETS, RunSpec, resolve_preset

QUEUE_KEYS = ("name", "priority", "max_attempts")  # what a queue request file may hold beside its settings


class SettingsError(ValueError):
    """A train setting with a value that is not allowed, an unknown key, or a missing required one."""


# ---------------------------------------------------------------------------------------------------------
# Declaring a setting
# ---------------------------------------------------------------------------------------------------------

Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Spec:
    """What the parser, the YAML reader and the checks need to know of one field."""

    help: str
    check: Check | None = None  # True when the (converted, non-None) value is allowed
    allowed: str = ""  # what `check` allows, in words, for the error message
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    portable: bool = True  # belongs in a reusable config (best_config.yaml); False: where/how this run goes


def setting(default: Any, help: str, **spec: Any) -> Any:
    """A TrainSettings field: its default and its Spec (help text, check, choices, ...)."""
    return field(default=default, metadata={"spec": Spec(help, **spec)})


def required(help: str, **spec: Any) -> Any:
    return field(metadata={"spec": Spec(help, **spec)})


def positive(v: float) -> bool:
    return v > 0


def at_least(n: float) -> Check:
    return lambda v: v >= n


def within(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Check:
    return lambda v: (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)


def _power_of_two(v: int) -> bool:
    return v >= 4 and v & (v - 1) == 0


# ---------------------------------------------------------------------------------------------------------
# The settings
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """Every setting of ``styleray train``. ``None`` means "the preset's (or the dataset's) value"."""

    # -- data and run folder
    data: str = required("prepared dataset: PNG folder or Parquet, local or s3://", portable=True)
    out: str = required("run folder: checkpoints, metrics.jsonl, grids (local or s3://)", portable=False)
    resume: str = setting(
        "latest", "'latest' (the run's newest good checkpoint, if any), 'none' (a new run), or a checkpoint "
        "or run path", portable=False)
    init_from: str | None = setting(
        None, "start a new run (kimg 0, fresh optimizers and ADA p) from the G, D and G_ema of a styleray run or "
        "checkpoint, or of an NVIDIA stylegan2-ada-pytorch .pkl; the source's model configuration is used, and a "
        "flag that contradicts it is an error. A resumed run continues from its own checkpoints",
        metavar="RUN_OR_PKL")
    # -- the model and the schedule
    preset: str = setting("auto", "a named configuration from the presets table (README: Training on one "
                          "machine); the settings below override it", choices=tuple(PRESETS))
    resolution: int | None = setting(None, "image size; default: the dataset's", check=_power_of_two,
                                     allowed="a power of two >= 4")
    kimg: float | None = setting(None, "train until this many thousand images (preset default)", check=positive,
                                 allowed="> 0")
    tick: float | None = setting(None, "progress report interval in kimg", check=positive, allowed="> 0")
    snap: int | None = setting(None, "checkpoint + sample grid every this many ticks", check=at_least(1),
                               allowed=">= 1")
    batch: int | None = setting(None, "total batch size over all workers (preset default)", check=at_least(1),
                                allowed=">= 1")
    batch_gpu: int | None = setting(
        None, "images per worker per round: each worker accumulates gradients over --batch / (--workers x "
        "--batch-gpu) rounds before a step (less memory, the same training); default: the preset's batch over the "
        "GPUs it was tuned for, as the reference (paper512: 8), or --batch / --workers when --batch is given",
        check=at_least(1), allowed=">= 1", metavar="N")
    map: int | None = setting(None, "mapping network depth in layers (preset default)", check=at_least(1),
                              allowed=">= 1")
    cond: bool = setting(False, "class-conditional training from dataset.json labels")
    # -- optimisation and regularisation
    lr: float | None = setting(None, "learning rate of G and D (preset default)", check=positive, allowed="> 0")
    lr_g: float | None = setting(None, "learning rate of G (default: --lr)", check=positive, allowed="> 0")
    lr_d: float | None = setting(None, "learning rate of D (default: --lr)", check=positive, allowed="> 0")
    gamma: float | None = setting(None, "R1 regularisation weight (preset default)", check=at_least(0),
                                  allowed=">= 0")
    freeze_d: int = setting(0, "FreezeD: do not train the discriminator's first N layers, counted from the image "
                            "(fromrgb, then conv0, conv1, skip of each block; the reference's --freezed)",
                            check=at_least(0), allowed=">= 0", metavar="N")
    # -- augmentation
    aug: str = setting("ada", "augmentation mode", choices=("ada", "fixed", "noaug"))
    augpipe: str = setting("bgc", "which augmentations, as the reference's --augpipe: blit (flips, 90-degree turns, "
                           "integer shifts), geom (scale, rotation, anisotropy, fractional shifts), color, filter, "
                           "noise, cutout, and their sums", choices=tuple(AUGMENT_PIPES))
    augment_p: float | None = setting(None, "initial (ada) or constant (fixed) augment probability",
                                      check=within(0, 1), allowed="in [0, 1]")
    target: float | None = setting(None, "ADA target for r_t", check=within(0, 1, open_lo=True, open_hi=True),
                                   allowed="in (0, 1)")
    mirror: bool = setting(False, "random x-flips of the data")
    seed: int = setting(0, "random seed", check=at_least(0), allowed=">= 0")
    # -- checkpoints and stability
    keep: int | None = setting(None, "keep this many latest checkpoints (plus the best one)", check=at_least(1),
                               allowed=">= 1")
    max_rollbacks: int | None = setting(None, "roll back unstable training (NaN/Inf, D collapse) at most this "
                                        "many times (default 3)", check=at_least(0), allowed=">= 0")
    # -- the cluster
    workers: int = setting(1, "training processes (Ray Train workers; one per GPU)", check=at_least(1),
                           allowed=">= 1")
    gpus: bool = setting(False, "one GPU per worker (NCCL); default: CPU workers (gloo)")
    precision: str = setting("auto", "type of the reduced-precision layers (the top resolutions, as the reference): "
                             "auto = bf16 on GPUs of compute capability >= 8.0 (A100, A10G, H100), fp16 below "
                             "(V100, T4), fp32 on CPU", choices=PRECISION_CHOICES)
    compile: bool = setting(False, "torch.compile the networks of the main phases and R1 (faster steps after a "
                            "warm-up of minutes; path length stays eager)")
    allow_tf32: bool = setting(False, "let CUDA matmuls and convolutions of the training step use TF32 (faster on "
                               "Ampere and later, less exact); off as in the reference")
    cpus_per_worker: float | None = setting(None, "CPUs reserved per worker (default: 1 with --gpus, 0.9 on CPU)",
                                            check=positive, allowed="> 0", portable=False)
    max_failures: int = setting(3, "restart failed workers from the last checkpoint this many times (-1: no "
                                "limit)", check=at_least(-1), allowed=">= -1", portable=False)
    placement_timeout: float = setting(300.0, "seconds to wait for room for the workers (at start, or after "
                                       "losing a node) before failing", check=positive, allowed="> 0",
                                       portable=False)
    autoscale: bool = setting(False, "the cluster can add nodes: wait for them instead of failing fast when "
                              "--workers do not fit", portable=False)
    no_ray: bool = setting(False, "train in this process without Ray (--workers 1, local --data)", portable=False)
    device: str | None = setting(None, "torch device with --no-ray (default: cuda if available)", portable=False)
    no_progress: bool = setting(False, "no progress bar (--no-ray)", portable=False)
    # -- quality metrics during training
    metrics: tuple[str, ...] | None = setting(
        None, "measure these during training (fid,kid) on G_ema; best.json then picks the lowest FID",
        metavar="LIST")
    metrics_every: int = setting(1, "measure every T ticks (and at the end)", check=at_least(1), allowed=">= 1",
                                 metavar="T")
    metrics_num_gen: int = setting(1000, "generated images per measurement", check=at_least(2), allowed=">= 2")
    extractor: str | None = setting(None, "feature extractor for --metrics (default inception-v3; pixels-8x8 is "
                                    "a weights-free proxy)")
    inception: str | None = setting(None, "pt_inception-2015-12-05-6726825d.pth (default: $STYLERAY_INCEPTION, "
                                    "then ~/.cache/styleray/)", metavar="PATH")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, convert(f.name, getattr(self, f.name)))
        if self.no_ray and self.workers != 1:
            raise SettingsError(
                f"no_ray (--no-ray) trains in this process: use --workers 1, or drop --no-ray for "
                f"{self.workers} Ray workers"
            )
        self._check_precision()
        if self.init_from is not None and self.resume not in ("latest", "none"):
            raise SettingsError(
                f"init_from (--init-from) starts a new run from a model, resume (--resume {self.resume}) continues a "
                "run from its checkpoint: give one of them"
            )

    def _check_precision(self) -> None:
        """bf16 and fp16 need CUDA: refuse them at once for workers that will train on the CPU."""
        on_cpu = (self.device or "").startswith("cpu") if self.no_ray else not self.gpus
        if self.precision in ("bf16", "fp16") and on_cpu:
            where = "--device cpu" if self.no_ray else "CPU workers (no --gpus)"
            raise SettingsError(f"precision (--precision {self.precision}) needs CUDA GPUs but this run trains on "
                                f"{where}: add --gpus, or use --precision auto (fp32 on CPU)")

    # -- building

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], source: str = "settings") -> "TrainSettings":
        """Settings from a mapping (a YAML file's, a queue request's, JSON): keys are field names, with dashes
        or underscores; a key that is not a setting is an error naming it and the known ones."""
        known = field_names()
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise SettingsError(f"{source}: unknown key {key!r}: not a train setting (known: "
                                    f"{', '.join(sorted(known))})")
            values[name] = value
        missing = [n for n in ("data", "out") if values.get(n) is None]
        if missing:
            raise SettingsError(f"{source}: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required "
                                f"({' and '.join(flag_of(m) for m in missing)}, or in a --config file)")
        try:
            return cls(**values)
        except SettingsError as e:
            raise SettingsError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "TrainSettings":
        return cls.from_mapping(json.loads(text), "stored settings")

    # -- writing

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON/YAML-friendly (tuples as lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """The settings as asked for (``changed()``): a later styleray fills in its own defaults."""
        return json.dumps(self.changed(), sort_keys=True)

    def changed(self, *, portable_only: bool = False) -> dict[str, Any]:
        """The fields that differ from their defaults (data and out always, unless not portable)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if portable_only and not f.metadata["spec"].portable:
                continue
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING or value != f.default:
                out[f.name] = _plain(value)
        return out

    def to_argv(self, *, include: tuple[str, ...] = ()) -> list[str]:
        """The `styleray train` flags that rebuild these settings exactly: the non-default ones, and those in
        ``include`` whatever their value (to show them in a job's command line)."""
        argv: list[str] = []
        values = {**self.changed(), **{n: _plain(getattr(self, n)) for n in include}}
        for name, value in values.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                argv += [flag] if value else []
            elif isinstance(value, list):
                argv += [flag, ",".join(value)]
            else:
                argv += [flag, repr(value) if isinstance(value, float) else str(value)]
        return argv

    # -- resolving

    @property
    def resume_from(self) -> str | None:
        """--resume as the platform takes it: None for 'none'."""
        return None if self.resume == "none" else self.resume

    def resolve(self, resolution: int, channels: int, num_classes: int, device: str = "cpu") -> RunSpec:
        """The run's model and training configuration, for a dataset of this resolution, channel count and
        number of classes (the preset, then these settings over it). With ``init_from`` the model is the
        source's: ``platform.train.transfer.resolve_run`` reads it and checks these settings against it."""
        if self.cond and num_classes == 0:
            raise SettingsError(f"cond (--cond): {self.data} has no labels in dataset.json (prepare with "
                                "--clusters K, or use its framing labels)")
        model, train = resolve_preset(
            self.preset,
            resolution=self.resolution or resolution,
            workers=self.workers,
            img_channels=channels,
            c_dim=num_classes if self.cond else 0,
            model_overrides=dict(mapping_layers=self.map),
            train_overrides=dict(
                batch=self.batch, batch_gpu=self.batch_gpu, kimg=self.kimg, tick_kimg=self.tick, snap=self.snap,
                r1_gamma=self.gamma, lr_g=self.lr_g or self.lr, lr_d=self.lr_d or self.lr, augment=self.aug,
                augment_pipe=self.augpipe, augment_p=self.augment_p, ada_target=self.target,
                mirror=self.mirror or None, allow_tf32=self.allow_tf32, precision=self.precision,
                compile=self.compile, seed=self.seed, keep_checkpoints=self.keep,
                max_rollbacks=self.max_rollbacks, freeze_d=self.freeze_d,
            ),
        )
        return RunSpec(model=model, train=train, preset=self.preset, data=self.data, out=self.out, device=device)


# ---------------------------------------------------------------------------------------------------------
# One set of rules for every value
# ---------------------------------------------------------------------------------------------------------


def field_names() -> set[str]:
    return set(_fields())


@functools.cache
def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainSettings)}


@functools.cache
def _hint(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field: int | None -> (int, True); tuple[str, ...] -> (tuple, ...)."""
    hint = typing.get_type_hints(TrainSettings)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and optional else hint
    return (typing.get_origin(base) or base), optional


def value_type(name: str) -> type:
    """The type of a setting's values: bool, int, float, str or tuple."""
    return _hint(name)[0]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _describe(name: str) -> str:
    return f"{name} ({flag_of(name)})"


def convert(name: str, value: Any) -> Any:
    """A field's value converted to its type and checked: text as the command line gives it ('0.002',
    'fid,kid') or a typed value (YAML, JSON, a sweep); SettingsError naming the key, value and what is
    allowed."""
    f = _fields()[name]
    spec: Spec = f.metadata["spec"]
    typ, optional = _hint(name)
    if value is None:
        if optional:
            return None
        if f.default is dataclasses.MISSING:
            raise SettingsError(f"{_describe(name)} is required")
        raise SettingsError(f"{_describe(name)} = None: give a value (default {f.default!r})")
    converted = _to_type(name, typ, value)
    if spec.choices is not None and converted not in spec.choices:
        raise SettingsError(f"{_describe(name)} = {value!r}: choose one of {', '.join(spec.choices)}")
    if spec.check is not None and not spec.check(converted):
        raise SettingsError(f"{_describe(name)} = {value!r}: must be {spec.allowed}")
    return converted


def _to_type(name: str, typ: type, value: Any) -> Any:
    bad = f"{_describe(name)} = {value!r}"
    if typ is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{bad}: a switch: write true or false")
        return value
    if typ is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise SettingsError(f"{bad}: expected a list of names (e.g. fid,kid)")
        names = tuple(v.strip().lower() for v in items if v.strip())
        if not names:
            raise SettingsError(f"{bad}: the list is empty")
        return names
    if typ is str:
        if not isinstance(value, str) or not value.strip():
            raise SettingsError(f"{bad}: expected text")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingsError(f"{bad}: expected {'a whole number' if typ is int else 'a number'}")
    if typ is int:
        return _whole(bad, value)
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"{bad}: expected a number") from None
    if not math.isfinite(number):
        raise SettingsError(f"{bad}: expected a finite number")
    return number


def _whole(bad: str, value: int | float | str) -> int:
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text[:1] in "+-" else text
        if not (digits.isascii() and digits.isdigit()):
            raise SettingsError(f"{bad}: expected a whole number")
        return int(text)
    if isinstance(value, float) and not value.is_integer():
        raise SettingsError(f"{bad}: expected a whole number")
    return int(value)


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def read_yaml(path: str, flag: str = "--config") -> Any:
    """The document in a local YAML file; SettingsError naming `flag` and the file when unreadable."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise SettingsError(f"{flag} {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"{flag} {path} is not valid YAML: {e}") from None


def split_request(doc: Any, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(queue fields, train settings mapping) of a settings document. One schema for a train YAML and a
    queue request: the settings at the top level or under ``train:``, with ``name``, ``priority`` and
    ``max_attempts`` allowed beside them (a train run ignores those)."""
    if doc is None:
        return {}, {}
    if not isinstance(doc, dict):
        raise SettingsError(f"{source}: expected a mapping of train settings (data:, out:, kimg:, ...)")
    queue = {k: doc[k] for k in QUEUE_KEYS if k in doc}
    if "train" not in doc:
        return queue, {k: v for k, v in doc.items() if k not in QUEUE_KEYS}
    extra = sorted(set(doc) - set(QUEUE_KEYS) - {"train"})
    if extra:
        raise SettingsError(f"{source}: unknown key(s) {', '.join(map(str, extra))} beside `train:` (allowed: "
                            f"{', '.join(QUEUE_KEYS)}, train)")
    train = doc["train"] if doc["train"] is not None else {}
    if not isinstance(train, dict):
        raise SettingsError(f"{source}: `train:` must be a mapping of train settings")
    return queue, dict(train)


def load_file(path: str, flag: str = "--config") -> tuple[dict[str, Any], dict[str, Any]]:
    """(queue fields, settings mapping) of a YAML file (see split_request)."""
    return split_request(read_yaml(path, flag), f"{flag} {path}")


# ---------------------------------------------------------------------------------------------------------
# The command line, built from the fields
# ---------------------------------------------------------------------------------------------------------


# --help shows the settings in these groups, each starting at the named field
GROUPS = {"data": "data and run folder", "preset": "model and schedule", "lr": "optimisation and regularisation",
          "aug": "augmentation", "keep": "checkpoints and stability", "workers": "the cluster",
          "metrics": "quality metrics during training"}


def _arg_type(name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return convert(name, text)
        except SettingsError as e:  # "lr_g (--lr-g) = '-1': must be > 0" -> "'-1': must be > 0"
            raise argparse.ArgumentTypeError(str(e).split(" = ", 1)[-1]) from None

    parse.__name__ = name
    return parse


def add_arguments(parser: argparse.ArgumentParser, *, only: tuple[str, ...] | None = None,
                  skip: tuple[str, ...] = (), convert_values: bool = True) -> None:
    """One flag per field (``--lr-g`` for ``lr_g``), with the field's help and default. Flags not given stay
    out of the namespace (``argparse.SUPPRESS``), so a file's values can sit under the explicit ones.
    ``convert_values=False`` keeps the values as text, for a caller that records bad ones instead of
    exiting (``queue add``); ``from_mapping`` converts them later with the same rules."""
    target: Any = parser
    for f in dataclasses.fields(TrainSettings):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        if f.name in GROUPS and isinstance(parser, argparse.ArgumentParser):
            target = parser.add_argument_group(GROUPS[f.name])
        _add_argument(target, f, convert_values)


def _add_argument(parser, f: dataclasses.Field, convert_values: bool) -> None:
    spec: Spec = f.metadata["spec"]
    typ, _ = _hint(f.name)
    default = "" if f.default in (dataclasses.MISSING, None, False) else f" (default: {_plain(f.default)})"
    required = " (required, here or in --config)" if f.default is dataclasses.MISSING else ""
    kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=spec.help + default + required)
    if typ is bool:
        parser.add_argument(flag_of(f.name), action="store_true", **kwargs)
        return
    kwargs.update(type=_arg_type(f.name) if convert_values else str,
                  metavar=spec.metavar or (None if spec.choices else f.name.upper()))
    if spec.choices and convert_values:
        kwargs["choices"] = spec.choices
    parser.add_argument(flag_of(f.name), **kwargs)


def given(namespace: argparse.Namespace, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The settings flags present on a command line parsed by a parser with ``add_arguments`` (``only``: the
    fields that parser was given, when its other flags may share a setting's name)."""
    names = set(only) if only is not None else field_names()
    return {k: v for k, v in vars(namespace).items() if k in names}


def from_command_line(namespace: argparse.Namespace, config: str | None = None) -> TrainSettings:
    """Settings from parsed flags over an optional --config file's (the flags win)."""
    file_settings: dict[str, Any] = {}
    source = "train flags"
    if config:
        _, file_settings = load_file(config)
        source = f"--config {config} and the flags"
    return TrainSettings.from_mapping({**file_settings, **given(namespace)}, source)


def from_argv(argv: list[str]) -> TrainSettings:
    """Settings from `styleray train` flags (``--config FILE`` included), SettingsError when they are bad:
    the inverse of ``to_argv`` (the queue's older requests, tests)."""

    class Raising(argparse.ArgumentParser):
        def error(self, message: str):  # noqa: D401 - argparse's hook
            raise SettingsError(message)

    parser = Raising(prog="styleray train", add_help=False)
    add_arguments(parser)
    parser.add_argument("--config", default=None)
    ns = parser.parse_args(argv)
    return from_command_line(ns, ns.config)
