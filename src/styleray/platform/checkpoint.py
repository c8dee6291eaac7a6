"""The checkpoint format: a folder of plain tensors and JSON, committed atomically.

    RUN/checkpoints/ckpt-000000012800/      (images seen, zero-padded: names sort by progress)
        state.pt      trainer state: G, D, G_ema, optimizers, ADA, pl_mean, counters, RNG (torch.save of
                      tensors and plain containers only; loaded with weights_only=True, no pickled code)
        config.json   the resolved RunSpec
        grid.png      samples of G_ema at fixed seeds (optional)
        meta.json     written last: kimg, tick, metrics, stable, and the SHA-256 of state.pt
    RUN/best.json                           which checkpoint is the best stable one (pruning keeps it)

A checkpoint counts only when meta.json exists and the hash of state.pt matches it. Locally the folder is
written under a temporary name and renamed; on object stores meta.json is the commit marker. A crash
therefore never leaves a checkpoint that looks whole, and a corrupt one is skipped in favour of the
previous one. Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from styleray import storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
BEST_FILE = "best.json"
_NAME = re.compile(r"^ckpt-(\d{12})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, partial or corrupt."""


@dataclass
class Checkpoint:
    uri: str  # the checkpoint folder
    state: dict[str, Any]  # trainer state_dict (tensors on CPU)
    config: dict[str, Any]  # RunSpec.to_dict()
    meta: dict[str, Any]  # kimg, tick, metrics, ...

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def kimg(self) -> float:
        return float(self.meta["kimg"])


def checkpoint_name(cur_nimg: int) -> str:
    return f"ckpt-{int(cur_nimg):012d}"


def checkpoints_dir(run_dir: str) -> str:
    return storage.join(run_dir, CHECKPOINTS_DIR)


def list_checkpoints(run_dir: str) -> list[str]:
    """URIs of the checkpoint folders of a run, oldest first (committed or not: loading checks)."""
    base = checkpoints_dir(run_dir)
    names = [n for n in storage.listdir(base) if _NAME.match(n)]
    return [storage.join(base, n) for n in sorted(names)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    run_dir: str,
    state: dict[str, Any],
    *,
    config: dict[str, Any],
    meta: dict[str, Any],
    grid_png: bytes | None = None,
) -> str:
    """Write a checkpoint for ``meta['cur_nimg']`` and return its URI. Atomic (see module doc)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    meta = {
        **meta,
        "format": FORMAT_VERSION,
        "created": time.time(),
        "sha256": {"state.pt": _sha256(blob)},
        "bytes": {"state.pt": len(blob)},
    }
    name = checkpoint_name(meta["cur_nimg"])
    final = storage.join(checkpoints_dir(run_dir), name)
    remote = storage.is_remote(run_dir)
    target = final if remote else storage.join(checkpoints_dir(run_dir), storage.unique_tmp_name())
    if remote and storage.exists(storage.join(final, "meta.json")):
        storage.remove(storage.join(final, "meta.json"))  # un-commit before overwriting
    storage.write_bytes(storage.join(target, "state.pt"), blob)
    storage.write_bytes(storage.join(target, "config.json"), json.dumps(config, indent=2, sort_keys=True).encode())
    if grid_png is not None:
        storage.write_bytes(storage.join(target, "grid.png"), grid_png)
    storage.write_bytes(storage.join(target, "meta.json"), json.dumps(meta, indent=2, sort_keys=True).encode())
    if not remote:
        if storage.exists(final):
            storage.remove(final)
        storage.rename_dir(target, final)
    log.info("checkpoint %s (%.3f kimg)", final, meta.get("kimg", 0.0))
    return final


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify one checkpoint folder; CheckpointError if it is partial or corrupt."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, "meta.json")))
    except FileNotFoundError as e:
        raise CheckpointError(f"{uri}: no meta.json (partial or not a checkpoint)") from e
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{uri}: unreadable meta.json: {e}") from e
    try:
        blob = storage.read_bytes(storage.join(uri, "state.pt"))
    except (FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{uri}: state.pt missing: {e}") from e
    expected = meta.get("sha256", {}).get("state.pt")
    if expected != _sha256(blob):
        raise CheckpointError(f"{uri}: state.pt is corrupt (SHA-256 does not match meta.json)")
    try:
        state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
        config = json.loads(storage.read_bytes(storage.join(uri, "config.json")))
    except Exception as e:  # noqa: BLE001 - any decode failure means this checkpoint is unusable
        raise CheckpointError(f"{uri}: cannot be decoded: {e}") from e
    return Checkpoint(uri=str(uri), state=state, config=config, meta=meta)


def load_latest(run_dir: str, map_location: str | torch.device = "cpu", before: str | None = None) -> Checkpoint | None:
    """The newest loadable checkpoint of a run (skipping broken ones with a warning); None if there is none.

    ``before``: only consider checkpoints older than this name (used to roll back past a bad one).
    """
    for uri in reversed(list_checkpoints(run_dir)):
        if before is not None and uri.rstrip("/").rsplit("/", 1)[-1] >= before:
            continue
        try:
            return load_checkpoint(uri, map_location)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def resolve(path: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint folder, or a run folder (its newest good checkpoint). CheckpointError if none."""
    if storage.exists(storage.join(path, "meta.json")):
        return load_checkpoint(path, map_location)
    if storage.exists(checkpoints_dir(path)):
        ckpt = load_latest(path, map_location)
        if ckpt is None:
            raise CheckpointError(f"{path}: no loadable checkpoint under {checkpoints_dir(path)}")
        return ckpt
    raise CheckpointError(f"{path}: neither a checkpoint folder (meta.json) nor a run folder (checkpoints/)")


def load_preferred(uri: str, run_dir: str, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """Checkpoint ``uri`` (e.g. the one Ray Train last registered) or, if it is corrupt or gone, the newest
    loadable one older than it, with a warning. None if there is none."""
    try:
        return load_checkpoint(uri, map_location)
    except CheckpointError as e:
        log.warning("skipping checkpoint: %s; falling back to an older one", e)
    return load_latest(run_dir, map_location, before=uri.rstrip("/").rsplit("/", 1)[-1])


def discard_newer(run_dir: str, name: str) -> list[str]:
    """Delete the checkpoints newer than ``name`` (after a rollback they describe a discarded future, and
    a restart must not resume from them); returns the deleted URIs."""
    deleted = []
    for uri in list_checkpoints(run_dir):
        if uri.rstrip("/").rsplit("/", 1)[-1] > name:
            storage.remove(uri)
            deleted.append(uri)
    return deleted


def read_best(run_dir: str) -> dict[str, Any] | None:
    """The run's best.json ({"checkpoint": name, "uri", "kimg", "tick", "criterion", "value"}), or None."""
    try:
        return json.loads(storage.read_bytes(storage.join(run_dir, BEST_FILE)))
    except FileNotFoundError:
        return None
    except ValueError as e:
        log.warning("ignoring unreadable %s: %s", storage.join(run_dir, BEST_FILE), e)
        return None


def write_best(run_dir: str, best: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(run_dir, BEST_FILE), json.dumps(best, indent=2, sort_keys=True).encode())


def prune(run_dir: str, keep: int, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints, never those named in ``protect``; returns the deleted."""
    uris = list_checkpoints(run_dir)
    deleted = []
    for uri in uris[: max(len(uris) - keep, 0)]:
        if uri.rstrip("/").rsplit("/", 1)[-1] in protect:
            continue
        storage.remove(uri)
        deleted.append(uri)
    return deleted


def load_generator(path: str, device: str | torch.device = "cpu"):
    """The EMA generator of a checkpoint (or of a run's newest checkpoint), in eval mode, and the checkpoint."""
    from styleray.config import ModelConfig
    from styleray.models.networks import Generator

    ckpt = resolve(path, map_location="cpu")
    cfg = ModelConfig(**ckpt.state["model_cfg"])
    G = Generator(cfg)
    G.load_state_dict(ckpt.state["G_ema"])
    G = G.to(device).eval().requires_grad_(False)
    return G, ckpt
