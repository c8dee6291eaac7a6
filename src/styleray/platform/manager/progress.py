"""Where a run stands, read from its folder (local or s3://) the way training wrote it.

    metrics.jsonl             one JSON line per tick: "kimg", "time" (the manager reads the file's tail)
    checkpoints/ckpt-N/       meta.json is the commit marker: a checkpoint counts once it exists

The manager polls this every few seconds for every active request, so it reads only the commit marker of
the newest checkpoint (not its multi-MB state; the training side verifies the hash when it resumes).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from styleray import storage

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"  # as checkpoint.CHECKPOINTS_DIR (a test checks they agree)
_CKPT_NAME = re.compile(r"^ckpt-\d{12}$")
TAIL_BYTES = 256 * 1024  # the last ~500 ticks


@dataclass(frozen=True)
class Progress:
    kimg: float | None = None  # the newest tick's kimg
    tick_time: float | None = None  # when that tick was written (Unix seconds)
    checkpoint: str | None = None  # the newest committed checkpoint folder
    checkpoint_kimg: float | None = None
    ticks: list[dict[str, Any]] = field(default_factory=list)  # the tail of metrics.jsonl, oldest first

    def first_tick_after(self, t: float) -> dict[str, Any] | None:
        """The first tick written at or after time ``t`` (training has resumed when there is one)."""
        return next((r for r in self.ticks if float(r.get("time", 0.0)) >= t), None)


def read_ticks(run_dir: str, tail_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The tail of a run's metrics.jsonl as records, oldest first; [] if there is none yet."""
    uri = storage.join(run_dir, METRICS_FILE)
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            size = f.seek(0, 2)
            start = max(0, size - tail_bytes)
            f.seek(start)
            blob = f.read()
    except FileNotFoundError:
        return []
    lines = blob.decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # the first line was cut by the seek
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being appended right now
        if isinstance(rec, dict) and "kimg" in rec:
            records.append(rec)
    return records


def checkpoint_uris(run_dir: str) -> list[str]:
    """The run's checkpoint folders, oldest first: the names of ``checkpoint.py`` (``ckpt-`` and 12 digits),
    listed without importing it (it imports torch, which the manager does not need)."""
    base = storage.join(run_dir, CHECKPOINTS_DIR)
    return [storage.join(base, n) for n in sorted(storage.listdir(base)) if _CKPT_NAME.match(n)]


def newest_checkpoint(run_dir: str) -> tuple[str | None, float | None]:
    """(URI, kimg) of the newest checkpoint whose meta.json (the commit marker) is readable; (None, None)."""
    for uri in reversed(checkpoint_uris(run_dir)):
        try:
            meta = json.loads(storage.read_bytes(storage.join(uri, "meta.json")))
            return uri, float(meta["kimg"])
        except FileNotFoundError:
            continue  # not committed (yet)
        except (ValueError, KeyError, OSError) as e:
            log.warning("ignoring checkpoint %s: unreadable meta.json (%s)", uri, e)
    return None, None


def read_progress(run_dir: str) -> Progress:
    ticks = read_ticks(run_dir)
    uri, kimg = newest_checkpoint(run_dir)
    last = ticks[-1] if ticks else {}
    return Progress(
        kimg=float(last["kimg"]) if last else None,
        tick_time=float(last["time"]) if "time" in last else None,
        checkpoint=uri,
        checkpoint_kimg=kimg,
        ticks=ticks,
    )
