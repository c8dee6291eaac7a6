"""The record a serve application writes next to the runs it watches: which run it serves under which name.

``styleray serve --runs ROOT`` writes ``ROOT/.styleray-served.json`` whenever the names or the checkpoints it
serves change; ``styleray queue show ID`` reads it from above a request's run folder to print the name the
finished run is served under. Serve and the manager never import each other: this small format is all they
share.

    {"format": 1, "root": "s3://b/runs", "updated": 1764460800.0, "scan_interval_s": 10.0,
     "models": {"heroes": {"run": "s3://b/runs/heroes", "checkpoint": "ckpt-000000025000", "kimg": 25.0}}}
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from styleray import storage

log = logging.getLogger(__name__)

RECORD_FILE = ".styleray-served.json"
FORMAT = 1
LEVELS_UP = 3  # a run folder is looked up in the records of its parent, grandparent and great-grandparent


def record_uri(root: str) -> str:
    return storage.join(root, RECORD_FILE)


def write_record(root: str, models: dict[str, dict[str, Any]], scan_interval_s: float) -> None:
    """Write (atomically) the record of what is served from ``root``; ``models``: name -> {run, checkpoint, kimg}."""
    record = {"format": FORMAT, "root": root, "updated": time.time(), "scan_interval_s": scan_interval_s,
              "models": models}
    storage.write_bytes(record_uri(root), json.dumps(record, indent=2, sort_keys=True).encode())


def read_record(root: str) -> dict[str, Any] | None:
    """The record under ``root``, or None when there is none (or it cannot be read: logged)."""
    try:
        record = json.loads(storage.read_bytes(record_uri(root)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", record_uri(root), e)
        return None
    return record if isinstance(record, dict) and isinstance(record.get("models"), dict) else None


@dataclass(frozen=True)
class Served:
    """Where a run is served: under ``name`` by the application watching ``root`` (as of ``updated``)."""

    name: str | None  # None: the application watches root but does not serve this run (yet)
    root: str
    updated: float
    scan_interval_s: float
    checkpoint: str | None = None


def served_as(run: str) -> Served | None:
    """How the serve application watching one of ``run``'s parent folders serves it; None when no application
    watches them (no record)."""
    run = run.rstrip("/")
    parent = run
    for _ in range(LEVELS_UP):
        parent = _parent(parent)
        if parent is None:
            return None
        record = read_record(parent)
        if record is None:
            continue
        for name, entry in record["models"].items():
            if isinstance(entry, dict) and str(entry.get("run", "")).rstrip("/") == run:
                return Served(name, parent, float(record.get("updated", 0)), float(record.get("scan_interval_s", 0)),
                              entry.get("checkpoint"))
        return Served(None, parent, float(record.get("updated", 0)), float(record.get("scan_interval_s", 0)))
    return None


def _parent(uri: str) -> str | None:
    head, sep, rest = uri.partition("://")
    path = rest if sep else uri
    if "/" not in path.strip("/"):
        return None  # a bucket or the filesystem root
    parent = path.rstrip("/").rsplit("/", 1)[0] or "/"
    return f"{head}://{parent}" if sep else parent
