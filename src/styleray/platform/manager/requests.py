"""A training request: the settings of `styleray train` (flags or a YAML file), checked on arrival.

A request's settings are a ``settings.TrainSettings``, checked by the same rules as ``styleray train``, so
anything the train command would reject is rejected here, before it waits in the queue. The run's config is
resolved now when the data can be read from this machine (the target kimg then defaults to the preset's);
``check_data=False`` skips that for data only the cluster can see. The queue stores the settings as JSON;
the manager submits ``styleray train`` with ``TrainSettings.to_argv()``.

A YAML request is the train settings file of ``styleray train --config`` (same schema: settings at the top
level or under ``train:``), with the queue's fields beside them::

    name: heroes-256        # optional (--name wins)
    priority: 5             # optional (--priority wins)
    train:
      data: s3://bucket/heroes
      out: s3://bucket/runs/heroes-256
      preset: paper256
      kimg: 5000
      workers: 8
      gpus: true
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from styleray import storage
from styleray.settings import SettingsError, TrainSettings, flag_of


@dataclass(frozen=True)
class RequestSpec:
    """A checked request, ready for Queue.add (``error`` set: rejected, with the reason)."""

    name: str
    settings: dict[str, Any]  # TrainSettings.changed(); as given when rejected
    out: str
    target_kimg: float
    data: str | None = None
    config: dict[str, Any] | None = None
    priority: int = 0
    max_attempts: int = 5
    error: str | None = None


def check_request(
    name: str,
    settings: dict[str, Any],  # train settings by field name (values as text from flags, or typed from YAML)
    *,
    priority: int = 0,
    max_attempts: int = 5,
    check_data: bool = True,
    unknown_flags: list[str] | None = None,  # command-line words that are no train flag
) -> RequestSpec:
    """Check a request; problems come back as a RequestSpec with ``error`` (the queue records rejections).

    ValueError only when the request cannot be recorded at all (no name, no out to name its run folder)."""
    if not name or not str(name).strip():
        raise ValueError("--name is required: a short label for the request (e.g. heroes-256)")
    if max_attempts < 1:
        raise ValueError(f"--max-attempts {max_attempts} must be >= 1")
    if not settings.get("out"):
        raise ValueError("a request needs --out: the run folder its checkpoints and metrics go to")
    base = dict(name=str(name), priority=int(priority), max_attempts=int(max_attempts),
                out=storage.absolute(str(settings["out"])))
    as_given = {k: v for k, v in settings.items() if v is not None}
    if unknown_flags:
        return RequestSpec(**base, settings=as_given, target_kimg=_kimg_or_zero(settings),
                           error=f"bad train settings: unknown {' '.join(unknown_flags)} (see `styleray train --help`)")
    try:
        train = TrainSettings.from_mapping(settings, "request")
    except SettingsError as e:
        return RequestSpec(**base, settings=as_given, target_kimg=_kimg_or_zero(settings),
                           error=f"bad train settings: {e} (see `styleray train --help`)")
    train = dataclasses.replace(train, data=storage.absolute(train.data), out=base["out"])
    spec = dict(base, settings=train.changed(), data=train.data, target_kimg=float(train.kimg or 0.0))
    if not check_data:
        if train.kimg is None:
            return RequestSpec(**spec, error=f"{flag_of('kimg')} is required when the data is not checked "
                                             "(the target of the run)")
        return RequestSpec(**spec)
    try:
        config = resolve_config(train)
    except (ValueError, OSError) as e:
        return RequestSpec(**spec, error=str(e))
    return RequestSpec(**dict(spec, target_kimg=float(config["train"]["kimg"])), config=config)


def _kimg_or_zero(settings: dict[str, Any]) -> float:
    try:
        return float(settings.get("kimg") or 0.0)
    except (TypeError, ValueError):
        return 0.0


def resolve_config(settings: TrainSettings) -> dict[str, Any]:
    """The RunSpec `styleray train` would build from these settings (reads the dataset's header)."""
    from styleray.datasets.read.ray_data import inspect_dataset
    from styleray.platform.train.transfer import resolve_run

    if not storage.is_remote(settings.data) and not os.path.exists(settings.data):
        raise ValueError(f"--data {settings.data} does not exist (prepare it with `styleray prepare`, or fix the path)")
    info = inspect_dataset(settings.data, storage.pyarrow_filesystem(settings.data)[0])
    if info.num_images < (settings.batch or 0):
        raise ValueError(f"--data {settings.data} holds {info.num_images} images, fewer than one batch "
                         f"(--batch {settings.batch})")
    return resolve_run(settings, info.resolution, info.channels, info.num_classes).to_dict()


def train_argv(settings: dict[str, Any], *, resume: str | None = None) -> list[str]:
    """The `styleray train` arguments of a stored request (``resume``: with --resume set to it);
    SettingsError for settings that no longer check (a request rejected on arrival, or an old queue's)."""
    train = TrainSettings.from_mapping(settings, "stored request")
    if resume is None:
        return train.to_argv()
    return dataclasses.replace(train, resume=resume).to_argv(include=("resume",))
