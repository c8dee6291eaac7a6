"""The models one sampler replica holds: at most K by name (Ray Serve's multiplexing evicts the least recently
used), each following the checkpoint its name's registry target says.

- ``open(name)`` is the replica's ``@serve.multiplexed`` loader (``sampler.py``): it loads the published
  target of ``name`` on a thread (never on the event loop), or, when that cannot be built, the newest good
  checkpoint the registry knows (a *fallback*, said in ``info`` and ``/healthz``). When nothing of the model
  can be built it raises ``ModelUnavailable`` (503, naming the model) and remembers the failure for a growing
  delay, so requests for a corrupt model are answered at once while the replica's other models keep serving.
- ``follow()`` runs every ``reload_poll_s``: each held model loads its new target beside the current one and
  swaps (requests in flight finish on the model they started with); a target that cannot be built leaves the
  model as it is, retried after a growing delay. Every held model is reported to the registry (a heartbeat);
  an evicted one is forgotten there.
- ``trial(name, target)`` builds and test-samples a checkpoint for ``POST /v1/reload`` before it is
  published, and keeps it, so this replica swaps without loading it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from styleray.serve.catalog import ModelUnavailable
from styleray.serve.loading import LoadedModel, LoadError, load_model
from styleray.serve.sources import SourcePolicy

log = logging.getLogger("ray.serve")

MAX_RETRY_S = 60.0  # longest wait between two attempts at a target this replica could not build


@dataclass(frozen=True)
class Fallback:
    """Why a model on this replica does not serve its published target."""

    wanted: str  # the target, as clients name it
    version: int  # its registry version
    error: str  # why it could not be built (no server paths)


class ModelSlot:
    """One named model held by the replica. Ray's multiplexing calls ``__del__`` when it evicts it."""

    def __init__(self, name: str, model: LoadedModel, target: str, version: int, fallback: Fallback | None):
        self.name = name
        self.model = model  # what requests use now (a request takes it once, at its start)
        self.target = target  # the registry target it follows (a run folder until pinned)
        self.version = version
        self.fallback = fallback
        self.evicted = False

    def __del__(self):
        self.evicted = True  # the replica's watcher forgets it in the registry; the weights go with the last request


class ReplicaModels:
    """The slots of one replica and the protocol with the registry (see the module doc)."""

    def __init__(self, registry: Any, replica: str, device: str, policy: SourcePolicy, max_bytes: int, poll_s: float):
        self._registry = registry  # DeploymentHandle of CheckpointRegistry
        self.replica = replica
        self._device = device
        self._policy = policy
        self._max_bytes = max_bytes
        self._poll_s = poll_s
        self.slots: dict[str, ModelSlot] = {}  # held models in load order (Ray's LRU has the use order)
        self._candidates: dict[str, LoadedModel] = {}  # built by trial(), swapped in once published
        self._retry: dict[tuple[str, str], tuple[float, int, str]] = {}  # (name, target) -> (next try, failures, why)
        self._failing: dict[str, str] = {}  # name -> the target that could not be loaded (no slot either)

    # -- loading -------------------------------------------------------------------------------------------

    async def refuse_if_failing(self, name: str) -> None:
        """ModelUnavailable at once for a model that could not be loaded a moment ago (and whose target has not
        changed since). Checked before Ray's multiplexed loader is asked: on a miss it evicts the least recently
        used model first, so every request for a corrupt model would cost a good one its place."""
        failing = self._failing.get(name)
        if failing is None:
            return
        _, target = await self._registry.target.remote(name)
        waiting = self._retry.get((name, target))
        if target == failing and waiting is not None and time.monotonic() < waiting[0]:
            raise ModelUnavailable(f"model {name} cannot be served: {waiting[2]}")
        del self._failing[name]

    async def open(self, name: str) -> ModelSlot:
        """The multiplexed loader: a slot serving ``name`` (ModelUnavailable when nothing of it can be built)."""
        version, target = await self._registry.target.remote(name)
        if target is None:
            raise ModelUnavailable(f"model {name}: its run has no committed checkpoint yet; it is rescanned "
                                   "every scan_interval_s")
        started = time.perf_counter()
        try:
            model = await self._load(name, target)
        except LoadError as e:
            slot = await self._open_fallback(name, target, version, str(e))
        else:
            slot = ModelSlot(name, model, target, version, None)
            await self._registry.pin.remote(name, version, target, model.uri)
            self._retry.pop((name, target), None)
            self._failing.pop(name, None)
        self.slots[name] = slot
        await self._report(slot)
        log.info("replica %s loaded model %s (%s, %.1f kimg) in %.2f s", self.replica, name, slot.model.uri,
                 slot.model.kimg, time.perf_counter() - started)
        return slot

    async def _open_fallback(self, name: str, target: str, version: int, error: str) -> ModelSlot:
        for uri in await self._registry.fallbacks.remote(name):
            if uri == target:
                continue
            try:
                model = await self._load(name, uri)
            except LoadError as e:
                log.error("replica %s: model %s: fallback %s cannot be built either: %s", self.replica, name, uri, e)
                continue
            slot = ModelSlot(name, model, uri, version, None)
            self._could_not_load(slot, target, version, error)
            return slot
        failures = self._retry.get((name, target), (0.0, 0, ""))[1] + 1
        delay = min(MAX_RETRY_S, self._poll_s * 2**failures)
        self._retry[(name, target)] = (time.monotonic() + delay, failures, error)
        self._failing[name] = target
        await self._registry.failed.remote(self.replica, name, error)
        log.error("replica %s: model %s cannot be served (attempt %d, next in %.0f s): %s",
                  self.replica, name, failures, delay, error)
        raise ModelUnavailable(f"model {name} cannot be served: {error}")

    async def _load(self, name: str, target: str) -> LoadedModel:
        candidate = self._candidates.pop(name, None)
        if candidate is not None and target == candidate.uri:
            return candidate
        return await asyncio.to_thread(load_model, target, self._device, self._policy, self._max_bytes)

    async def trial(self, name: str, target: str) -> dict:
        """Reload, step 1: build and test-sample ``target`` beside what is served (LoadError if it cannot be
        served); kept for the swap."""
        model = await asyncio.to_thread(load_model, target, self._device, self._policy, self._max_bytes)
        self._candidates[name] = model
        return {"uri": model.uri, "checkpoint": model.name, "checkpoint_uri": model.public_uri, "kimg": model.kimg}

    # -- following the registry ------------------------------------------------------------------------------

    async def follow(self) -> None:
        """One poll: forget evicted slots, follow every held slot's target, report each."""
        for name, slot in list(self.slots.items()):
            if slot.evicted:
                del self.slots[name]
                self._candidates.pop(name, None)
                await self._registry.forget.remote(self.replica, name)
                log.info("replica %s evicted model %s", self.replica, name)
                continue
            await self._follow(slot)
            await self._report(slot)

    async def _follow(self, slot: ModelSlot) -> None:
        try:
            version, target = await self._registry.target.remote(slot.name)
        except Exception as e:  # noqa: BLE001 - UnknownModel: the run is gone; keep serving until evicted
            log.debug("model %s: no target: %s", slot.name, e)
            return
        if target is None or target in (slot.target, slot.model.uri):
            slot.version, slot.fallback = version, None
            return
        if time.monotonic() < self._retry.get((slot.name, target), (0.0, 0, ""))[0]:
            slot.version = version
            return
        started = time.perf_counter()
        try:
            model = await self._load(slot.name, target)
        except LoadError as e:
            self._could_not_load(slot, target, version, str(e))
            return
        slot.model, slot.target, slot.version, slot.fallback = model, target, version, None
        self._retry.pop((slot.name, target), None)
        log.info("replica %s: model %s switched to %s in %.2f s", self.replica, slot.name, model.uri,
                 time.perf_counter() - started)

    def _could_not_load(self, slot: ModelSlot, target: str, version: int, error: str) -> None:
        """Keep serving the slot's model; say why; try again after a growing delay."""
        failures = self._retry.get((slot.name, target), (0.0, 0, ""))[1] + 1
        delay = min(MAX_RETRY_S, self._poll_s * 2**failures)
        self._retry[(slot.name, target)] = (time.monotonic() + delay, failures, error)
        slot.version, slot.fallback = version, Fallback(self._policy.public(target), version, error)
        log.error("replica %s cannot build %s for model %s (attempt %d, next in %.0f s), keeps serving %s: %s",
                  self.replica, target, slot.name, failures, delay, slot.model.uri, error)

    async def _report(self, slot: ModelSlot) -> None:
        fb = slot.fallback
        await self._registry.report.remote(self.replica, slot.name, slot.version, slot.model.uri,
                                           fb.error if fb else None, fb is not None)

    def fallbacks(self) -> dict[str, dict]:
        """The held models that serve a fallback: name -> why."""
        return {n: asdict(s.fallback) for n, s in self.slots.items() if s.fallback and not s.evicted}
