"""``styleray train --config FILE.yaml``: a YAML file of train settings, applied as defaults of the flags.

The keys are the names of the train flags without their dashes (``lr_g`` or ``lr-g`` for ``--lr-g``), at
the top level or under ``train:`` (the shape ``styleray queue add --config`` reads too)::

    data: data/heroes
    preset: cpu-tiny
    lr_g: 0.002
    gamma: 0.5
    mirror: true          # a switch: true = given, false = left out
    metrics: [fid, kid]   # a list becomes fid,kid

The file becomes flags placed before the command line's own, so flags given explicitly win and every value
is checked exactly as the flag would be. A key that is not a train flag is an error naming it. The train
command's parser does the expansion itself (``cli._ConfigFileParser``), so every caller of the parser gets
it. Standard library and PyYAML only.
"""

from __future__ import annotations

import argparse
from typing import Any


def _option_dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{"lr_g": action of --lr-g, ...} for the parser's long options."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public list of a parser's actions
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:].replace("-", "_")] = action
    return out


def read_yaml(path: str, flag: str = "--config") -> Any:
    """The document in a local YAML file; ValueError naming `flag` and the file when unreadable or invalid."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{flag} {path} is not valid YAML: {e}") from None


def load_settings(path: str) -> dict[str, Any]:
    """The mapping of settings in a YAML file (top level, or under ``train:``); ValueError when unreadable."""
    doc = read_yaml(path)
    if doc is None:
        return {}
    if isinstance(doc, dict) and set(doc) == {"train"}:
        doc = doc["train"]
    if not isinstance(doc, dict):
        raise ValueError(f"--config {path}: expected a mapping of train settings (data:, preset:, kimg:, ...)")
    return doc


def settings_to_flags(settings: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> list[str]:
    """["--lr-g", "0.002", "--mirror", ...] from a settings mapping, checked against the parser's flags."""
    actions = _option_dests(parser)
    refused = {"config", "help"}
    flags: list[str] = []
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        action = actions.get(name)
        if action is None or name in refused:
            known = ", ".join(sorted(k for k in actions if k not in refused))
            raise ValueError(f"--config {source}: unknown key {key!r}: not a train setting (known: {known})")
        flag = "--" + name.replace("_", "-")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ValueError(f"--config {source}: {key} is a switch: write true or false, not {value!r}")
            if value:
                flags.append(flag)
            continue
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            raise ValueError(f"--config {source}: {key} must be a single value, got a mapping")
        flags += [flag, str(value)]
    return flags


def expand_args(args: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """The train command's arguments with ``--config FILE`` replaced by the file's flags, placed first so
    that the flags given explicitly (which come later) win."""
    paths: list[str] = []
    kept: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config":
            if i + 1 >= len(args):
                raise ValueError("--config needs a file: --config FILE.yaml")
            paths.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            paths.append(a.split("=", 1)[1])
        else:
            kept.append(a)
        i += 1
    if len(paths) > 1:
        raise ValueError(f"--config given {len(paths)} times ({', '.join(paths)}): give one file")
    if not paths:
        return list(args)
    return settings_to_flags(load_settings(paths[0]), parser, paths[0]) + kept
