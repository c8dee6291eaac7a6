"""A training request: the arguments of `styleray train` (given as flags or a YAML file), checked on arrival.

The train flags are defined once, by the `train` command of the CLI; a request is checked against exactly
those, so anything `styleray train` would reject is rejected here, before it waits in the queue. The run's
config is resolved now when the data can be read from this machine (the target kimg then defaults to the
preset's); ``check_data=False`` skips that for data only the cluster can see.

A YAML request names the train flags without dashes, at the top level or under ``train:``::

    name: heroes-256        # optional (--name wins)
    priority: 5             # optional (--priority wins)
    train:
      data: s3://bucket/heroes
      out: s3://bucket/runs/heroes-256
      preset: paper256
      kimg: 5000
      workers: 8
      gpus: true            # a switch: true = given, false = left out
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from styleray.platform import storage

QUEUE_KEYS = ("name", "priority", "max_attempts")


@dataclass(frozen=True)
class RequestSpec:
    """A checked request, ready for Queue.add (``error`` set: rejected, with the reason)."""

    name: str
    train_args: tuple[str, ...]
    out: str
    target_kimg: float
    data: str | None = None
    config: dict[str, Any] | None = None
    priority: int = 0
    max_attempts: int = 5
    error: str | None = None


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise ValueError(message)


def train_parser() -> argparse.ArgumentParser:
    """The parser of `styleray train` (the CLI owns the flags)."""
    from styleray import cli

    root = _RaisingParser(prog="styleray", add_help=False)
    sub = root.add_subparsers(dest="command", parser_class=_RaisingParser)
    cli._add_train(sub)
    return sub.choices["train"]


def load_yaml(path: str) -> tuple[dict[str, Any], list[str]]:
    """(queue fields: name, priority, max_attempts; train arguments) from a request YAML file."""
    from styleray.config_file import read_yaml

    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise ValueError(f"--config {path}: expected a mapping of train flags (data:, out:, kimg:, ...)")
    queue = {k: doc[k] for k in QUEUE_KEYS if k in doc}
    train = doc.get("train", {k: v for k, v in doc.items() if k not in QUEUE_KEYS})
    if not isinstance(train, dict):
        raise ValueError(f"--config {path}: `train:` must be a mapping of train flags")
    extra = set(doc) - set(QUEUE_KEYS) - {"train"} if "train" in doc else set()
    if extra:
        raise ValueError(f"--config {path}: unknown key(s) {', '.join(sorted(extra))} beside `train:` "
                         f"(allowed: {', '.join(QUEUE_KEYS)}, train)")
    return queue, flags_from_mapping(train)


def flags_from_mapping(train: dict[str, Any]) -> list[str]:
    """Train flags from a mapping: {"data": "d", "mirror": True, "cpus_per_worker": 0.5} ->
    ["--data", "d", "--mirror", "--cpus-per-worker", "0.5"] (False and None: left out)."""
    args: list[str] = []
    for key, value in train.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple, dict)):
            raise ValueError(f"train flag {key}: expected a single value, got {value!r}")
        else:
            args += [flag, str(value)]
    return args


def _set_flag(args: list[str], flag: str, value: str) -> list[str]:
    """Replace the value of ``flag`` (``--flag V`` or ``--flag=V``) in an argument list."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == flag and i + 1 < len(args):
            out += [flag, value]
            i += 2
            continue
        out.append(f"{flag}={value}" if a.startswith(flag + "=") else a)
        i += 1
    return out


def with_resume(args: tuple[str, ...] | list[str], resume: str) -> list[str]:
    """The train arguments with ``--resume`` set (added if absent)."""
    args = list(args)
    if any(a == "--resume" or a.startswith("--resume=") for a in args):
        return _set_flag(args, "--resume", resume)
    return args + ["--resume", resume]


def check_request(
    name: str,
    train_args: list[str],
    *,
    priority: int = 0,
    max_attempts: int = 5,
    check_data: bool = True,
) -> RequestSpec:
    """Check a request; problems come back as a RequestSpec with ``error`` (the queue records rejections).

    ValueError only when the request cannot be recorded at all (no --out to name its run folder)."""
    if not name or not name.strip():
        raise ValueError("--name is required: a short label for the request (e.g. heroes-256)")
    if max_attempts < 1:
        raise ValueError(f"--max-attempts {max_attempts} must be >= 1")
    args = list(train_args)
    out = _raw_flag(args, "--out")
    if out is None:
        raise ValueError("a request needs --out: the run folder its checkpoints and metrics go to")
    base = dict(name=name, priority=priority, max_attempts=max_attempts, out=storage.absolute(out))
    if any(a in ("-h", "--help") for a in args):
        return RequestSpec(**base, train_args=tuple(args), target_kimg=0.0,
                           error="--help is not a train flag for a request")
    try:
        ns = train_parser().parse_args(args)
    except ValueError as e:
        return RequestSpec(**base, train_args=tuple(args), target_kimg=_float_or_zero(_raw_flag(args, "--kimg")),
                           error=f"bad train flags: {e} (see `styleray train --help`)")
    args = _set_flag(_set_flag(args, "--out", base["out"]), "--data", storage.absolute(ns.data))
    ns.data, ns.out = storage.absolute(ns.data), base["out"]
    spec = dict(base, train_args=tuple(args), data=ns.data, target_kimg=float(ns.kimg or 0.0))
    if not check_data:
        if ns.kimg is None:
            return RequestSpec(**spec, error="--kimg is required when the data is not checked (the target of the run)")
        return RequestSpec(**spec)
    try:
        config = resolve_config(ns)
    except (ValueError, OSError) as e:
        return RequestSpec(**spec, error=str(e))
    return RequestSpec(**dict(spec, target_kimg=float(config["train"]["kimg"])), config=config)


def _float_or_zero(text: str | None) -> float:
    try:
        return float(text) if text is not None else 0.0
    except ValueError:
        return 0.0


def _raw_flag(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def resolve_config(ns: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig `styleray train` would build from these flags (reads the dataset's header)."""
    from styleray.cli import build_run_config
    from styleray.datasets.ray_reader import inspect_dataset

    if not storage.is_remote(ns.data) and not os.path.exists(ns.data):
        raise ValueError(f"--data {ns.data} does not exist (prepare it with `styleray prepare`, or fix the path)")
    info = inspect_dataset(ns.data, storage.pyarrow_filesystem(ns.data)[0])
    if info.num_images < (ns.batch or 0):
        raise ValueError(f"--data {ns.data} holds {info.num_images} images, fewer than one batch (--batch {ns.batch})")
    return build_run_config(ns, info.resolution, info.channels, info.num_classes).to_dict()
