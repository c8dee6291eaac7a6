"""A generator made ready to serve: bounded reads, a build, a test sample; anything less is refused.

``load_model`` is what a replica (and the reload trial) calls. A checkpoint is served only after

1. its files are within the size caps (checked with a stat before anything is read: a reload cannot make
   the server read a huge file into memory),
2. ``state.pt`` matches the SHA-256 in ``meta.json`` and decodes as plain tensors (``weights_only``),
3. the generator is built from the checkpoint's own model config and its EMA weights load into it,
4. one test sample comes out with the right shape and finite values.

Every failure is a ``LoadError`` whose message names the checkpoint as the client knows it (server paths are
redacted by the ``SourcePolicy``) and says what was wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from styleray.serve.schemas import InvalidRequest
from styleray.serve.sources import SourcePolicy

log = logging.getLogger("ray.serve")

MAX_JSON_BYTES = 1 << 20  # meta.json / config.json are a few KiB
TEST_SEED = 0


class LoadError(InvalidRequest):
    """A checkpoint that cannot be served; the message is safe to show to clients."""


@dataclass(frozen=True)
class LoadedModel:
    G: Any  # styleray.models.networks.Generator (EMA weights, eval mode)
    uri: str  # the checkpoint folder actually loaded (server path or URI)
    public_uri: str  # how clients see it (relative to its reload root when local)
    name: str  # its folder name, e.g. ckpt-000000012800
    kimg: float
    device: str

    @property
    def info(self) -> dict:
        G = self.G
        return {
            "checkpoint": self.name,
            "checkpoint_uri": self.public_uri,
            "kimg": self.kimg,
            "resolution": G.img_resolution,
            "channels": G.img_channels,
            "classes": G.c_dim,
            "num_ws": G.num_ws,
            "z_dim": G.z_dim,
            "w_dim": G.w_dim,
            "device": self.device,
        }


def load_model(target: str, device: str, policy: SourcePolicy, max_bytes: int) -> LoadedModel:
    """The EMA generator of ``target`` (a checkpoint folder, or a run folder: its newest loadable one)."""
    try:
        return _load_model(target, device, policy, max_bytes)
    except LoadError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever else fails, the caller gets a LoadError it can show
        log.exception("loading %s failed", target)
        message = policy.redact(f"{type(e).__name__}: {e}")
        raise LoadError(f"checkpoint {policy.public(target)}: cannot be loaded: {message}") from None


def _load_model(target: str, device: str, policy: SourcePolicy, max_bytes: int) -> LoadedModel:
    from styleray.platform.checkpoint import CheckpointError

    shown = policy.public(target)
    problems = []
    for uri in _candidates(target, shown, policy):
        _check_sizes(uri, policy, max_bytes)
        try:
            G, ckpt = _build(uri, device, policy)
        except CheckpointError as e:  # partial or corrupt: an older checkpoint of the run may do
            problems.append(policy.redact(str(e)))
            log.warning("skipping checkpoint: %s", e)
            continue
        _test_sample(G, policy.public(uri), policy)
        kimg = float(ckpt.meta.get("kimg", 0.0))
        return LoadedModel(G, ckpt.uri, policy.public(ckpt.uri), ckpt.name, kimg, device)
    raise LoadError(f"checkpoint {shown}: no loadable checkpoint ({'; '.join(problems[-3:]) or 'none found'})")


def _candidates(target: str, shown: str, policy: SourcePolicy) -> list[str]:
    """The checkpoint folders to try, newest first."""
    from styleray import storage
    from styleray.platform.checkpoint import checkpoints_dir, list_checkpoints

    try:
        storage.filesystem(target)[0].invalidate_cache()  # s3fs caches listings: a new checkpoint must show
        if storage.exists(storage.join(target, "meta.json")):
            return [target]
        if storage.exists(checkpoints_dir(target)):
            return list(reversed(list_checkpoints(target)))
    except Exception as e:  # noqa: BLE001 - unreachable storage, missing credentials, bad bucket name ...
        raise LoadError(f"checkpoint {shown}: cannot be read: {type(e).__name__}: {policy.redact(str(e))}") from None
    raise LoadError(f"checkpoint {shown}: neither a checkpoint folder (meta.json) nor a run folder (checkpoints/)")


def _check_sizes(uri: str, policy: SourcePolicy, max_bytes: int) -> None:
    """Refuse files over the caps before reading them (a missing file is reported by the loader)."""
    from styleray import storage

    for name, cap in (("state.pt", max_bytes), ("meta.json", MAX_JSON_BYTES), ("config.json", MAX_JSON_BYTES)):
        fs, path = storage.filesystem(storage.join(uri, name))
        try:
            size = fs.size(path)
        except (FileNotFoundError, OSError):
            continue
        if size is not None and size > cap:
            raise LoadError(
                f"checkpoint {policy.public(uri)}: {name} is {size / 2**20:.1f} MiB, over the {cap / 2**20:.1f} MiB "
                "cap (ServeArgs.max_checkpoint_mb)"
            )


def _build(uri: str, device: str, policy: SourcePolicy):
    """(G, checkpoint): CheckpointError when unreadable, LoadError when the generator cannot be built."""
    from styleray.platform.checkpoint import CheckpointError, load_generator

    try:
        return load_generator(uri, device)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a config or weights that do not fit the network, an unknown key ...
        message = policy.redact(f"{type(e).__name__}: {e}")
        raise LoadError(f"checkpoint {policy.public(uri)}: cannot build the generator: {message}") from None


def _test_sample(G: Any, shown: str, policy: SourcePolicy) -> None:
    """One sample through the network: the right shape and finite values, or LoadError."""
    import torch

    from styleray.models.sampling import seeds_to_ws

    try:
        with torch.inference_mode():
            ws = seeds_to_ws(G, [TEST_SEED], class_idx=0 if G.c_dim else None)
            img = G.synthesis(ws, noise_mode="const")
    except Exception as e:  # noqa: BLE001 - any failure of the built network disqualifies it
        message = policy.redact(f"{type(e).__name__}: {e}")
        raise LoadError(f"checkpoint {shown}: the test sample failed: {message}") from None
    expected = (1, G.img_channels, G.img_resolution, G.img_resolution)
    if tuple(img.shape) != expected:
        raise LoadError(f"checkpoint {shown}: the test sample has shape {tuple(img.shape)}, expected {expected}")
    if not bool(torch.isfinite(img).all()):
        raise LoadError(f"checkpoint {shown}: the test sample has NaN or infinite values (diverged weights?)")
