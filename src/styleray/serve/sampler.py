"""SamplerDeployment: a checkpoint's EMA generator, loaded once per replica, behind typed methods.

(Named Sampler, not Generator: ``styleray.models.networks.Generator`` is the network it serves.)

- Single-image requests from concurrent clients are batched with ``@serve.batch`` (``ServeArgs.batching``);
  ``styleray.models.sampling`` runs the network on fixed-size chunks, so a seed gives the same bytes
  whether it was computed alone or in a batch of 32.
- Model work runs on one model thread per replica, scheduled fairly (``styleray.serve.scheduler``): samples
  first, grids, morphs and mixing grids in chunks that take turns. Heavy encoding (GIF, grids, zips) runs
  on its own thread, samples' encoding on the default pool, so neither waits for the other.
- Checkpoints: a replica serves the registry's published target. A new target is loaded beside the current
  model and swapped in; requests in flight finish on the model they started with. A target this replica
  cannot build (``LoadError``) leaves it on the model it has, or, when starting, on the newest good
  checkpoint the registry knows; either way it says so (``fallback`` in ``info``/``ping``) and retries with
  a growing delay, never crashing for want of a model. ``trial`` builds and test-samples a checkpoint for a
  reload before it is published, and keeps it for the swap.
- Projections of uploaded images run on threads of their own (``projection_runner.py``), at most
  ``max_running_projections`` per replica; a finished one (``proj:ID``) stands wherever a seed can in grids,
  morphs and mixing grids (its latent from the ProjectionStore).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
from ray import serve

from styleray.serve import encode, work
from styleray.serve.args import ServeArgs
from styleray.serve.loading import LoadedModel, LoadError, load_model
from styleray.serve.projection_runner import ProjectionRunner
from styleray.serve.projections import Conflict, ProjectionRequest, projection_limits
from styleray.serve.scheduler import BULK, INTERACTIVE, ModelScheduler
from styleray.serve.schemas import (
    MEDIA_TYPES,
    Encoded,
    GridRequest,
    InvalidRequest,
    MixRequest,
    MorphRequest,
    SampleRequest,
    Sampling,
    limits,
    projection_ids,
)

log = logging.getLogger("ray.serve")

# @serve.batch batches that may wait for the model at once (they are merged, see SamplerDeployment._coalesced);
# ServeArgs.max_ongoing_requests defaults to max_batch_size * this, which keeps Serve from warning.
SERVE_BATCHES_IN_FLIGHT = 8
MAX_RETRY_S = 60.0  # longest wait between two attempts at a target this replica could not build


@dataclass(frozen=True)
class Fallback:
    """Why a replica does not serve the published target."""

    wanted: str  # the target, as clients name it
    version: int  # its registry version
    error: str  # why it could not be built (no server paths)


def replica_device(args: ServeArgs) -> str:
    """auto: cuda only when the replica reserved a GPU (Ray then sets CUDA_VISIBLE_DEVICES) and sees one."""
    if args.device != "auto":
        return args.device
    import torch

    return "cuda" if args.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (unit use): any unique name will do
        return uuid.uuid4().hex[:8]


@serve.deployment(name="Sampler")
class SamplerDeployment:
    async def __init__(self, args: ServeArgs, registry, projections=None):
        self._args = args
        self._registry = registry  # DeploymentHandle of CheckpointRegistry
        self._projection_store = projections  # DeploymentHandle of ProjectionStore (None: no projections)
        self._projections = ProjectionRunner(projections, args.max_running_projections, args.max_projection_steps)
        self._policy = args.source_policy()
        self._device = replica_device(args)
        self._scheduler = ModelScheduler()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="styleray-encode")
        self._replica = _replica_id()
        self._waiting: deque[tuple[list[SampleRequest], asyncio.Future]] = deque()  # batches waiting for the model
        self._drainer: asyncio.Task | None = None
        self._candidate: LoadedModel | None = None  # built by trial(), swapped in once published
        self._retry: dict[str, tuple[float, int]] = {}  # failed target -> (next attempt, failures)
        self._sample_batched.set_max_batch_size(args.max_batch_size)
        self._sample_batched.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        await self._start()
        self._watcher = asyncio.get_running_loop().create_task(self._watch_registry())

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def _start(self) -> None:
        """Serve the published target, or the newest good checkpoint when it cannot be built."""
        version, target = await self._registry.target.remote()
        self._fallback: Fallback | None = None
        try:
            model = await self._load(target)
        except LoadError as e:
            self._model = await self._load_fallback(target, str(e))
            self._target = self._model.uri
            self._could_not_load(target, version, str(e))
        else:
            self._model, self._target, self._version = model, target, version
            await self._registry.pin.remote(version, target, model.uri)
        await self._report()
        log.info("sampler replica %s serves %s (%.1f kimg)", self._replica, self._model.uri, self._model.kimg)

    async def _load(self, target: str) -> LoadedModel:
        candidate, self._candidate = self._candidate, None
        if candidate is not None and target == candidate.uri:
            return candidate
        return await asyncio.to_thread(load_model, target, self._device, self._policy, self._args.max_checkpoint_bytes)

    async def _load_fallback(self, target: str, error: str) -> LoadedModel:
        for uri in await self._registry.fallbacks.remote():
            if uri == target:
                continue
            try:
                return await self._load(uri)
            except LoadError as e:
                log.error("replica %s: fallback %s cannot be built either: %s", self._replica, uri, e)
        raise RuntimeError(f"cannot build {target} ({error}) and there is no good checkpoint to fall back to")

    async def _watch_registry(self) -> None:
        """Poll the registry every ``reload_poll_s``: follow the target, report (a heartbeat too)."""
        while True:
            await asyncio.sleep(self._args.reload_poll_s)
            try:
                await self._follow_target()
                await self._report()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the registry restarting must not stop the watcher
                log.warning("replica %s: registry poll failed: %s", self._replica, e)

    async def _follow_target(self) -> None:
        version, target = await self._registry.target.remote()
        if target in (self._target, self._model.uri):
            self._version, self._fallback = version, None
            return
        if time.monotonic() < self._retry.get(target, (0.0, 0))[0]:
            self._version = version
            return
        started = time.perf_counter()
        try:
            model = await self._load(target)
        except LoadError as e:
            self._could_not_load(target, version, str(e))
            return
        self._model, self._target, self._version, self._fallback = model, target, version, None
        self._retry.pop(target, None)
        log.info("replica %s switched to %s in %.2f s", self._replica, model.uri, time.perf_counter() - started)

    def _could_not_load(self, target: str, version: int, error: str) -> None:
        """Keep serving the current model; say why; try again after a growing delay."""
        failures = self._retry.get(target, (0.0, 0))[1] + 1
        delay = min(MAX_RETRY_S, self._args.reload_poll_s * 2**failures)
        self._retry[target] = (time.monotonic() + delay, failures)
        self._version, self._fallback = version, Fallback(self._policy.public(target), version, error)
        log.error("replica %s cannot build %s (attempt %d, next in %.0f s), keeps serving %s: %s",
                  self._replica, target, failures, delay, self._model.uri, error)

    async def _report(self) -> None:
        fb = self._fallback
        await self._registry.report.remote(
            self._replica, self._version, self._model.uri, fb.error if fb else None, fb is not None
        )

    def check_health(self) -> None:
        if self._watcher.done():
            raise RuntimeError(f"checkpoint watcher stopped: {self._watcher.exception()!r}")

    def __del__(self):
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.cancel()
        if hasattr(self, "_scheduler"):
            self._scheduler.shutdown()
        if hasattr(self, "_encoder"):
            self._encoder.shutdown(wait=False, cancel_futures=True)
        if hasattr(self, "_projections"):
            self._projections.shutdown()

    # -- small calls ----------------------------------------------------------------------------------------

    async def trial(self, target: str) -> dict:
        """Reload, step 1: build and test-sample ``target`` beside the served model (LoadError if it cannot
        be served). Kept, so this replica swaps without loading it again once it is published."""
        model = await asyncio.to_thread(load_model, target, self._device, self._policy, self._args.max_checkpoint_bytes)
        self._candidate = model
        return {"uri": model.uri, "checkpoint": model.name, "checkpoint_uri": model.public_uri, "kimg": model.kimg}

    async def ping(self) -> dict:
        return {"checkpoint": self._model.name, "replica": self._replica, "fallback": self._fallback_info()}

    async def info(self) -> dict:
        a = self._args
        return {
            **self._model.info,
            "version": self._version,
            "replica": self._replica,
            "fallback": self._fallback_info(),
            "batching": a.batching,
            "max_batch_size": a.max_batch_size if a.batching else 1,
            "queue": self._scheduler.waiting(),  # model jobs waiting on this replica: interactive, bulk
            "limits": limits(),
            "projections": {**projection_limits(a.max_projection_steps, a.max_running_projections, a.projections_kept),
                            "running_here": self._projections.running},
        }

    def _fallback_info(self) -> dict | None:
        return asdict(self._fallback) if self._fallback else None

    # -- single samples (batched, interactive priority) -----------------------------------------------------

    async def sample(self, req: SampleRequest) -> Encoded:
        model = self._model
        work.check_sampling(model.G, req.sampling)
        if self._args.batching:
            result = await self._sample_batched(req)
        else:
            result = (await self._scheduler.run(INTERACTIVE, work.sample_group, model, [req]))[0]
        if isinstance(result, Exception):
            raise result
        image, batch_size, name = result
        data = await asyncio.to_thread(encode.encode_image, image, req.format, req.quality)
        headers = {"X-Seed": str(req.seed), "X-Batch-Size": str(batch_size)}
        return Encoded(data, MEDIA_TYPES[req.format], name, headers)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=SERVE_BATCHES_IN_FLIGHT)
    async def _sample_batched(self, reqs: list[SampleRequest]) -> list[Any]:
        return await self._coalesced(reqs)

    async def _coalesced(self, reqs: list[SampleRequest]) -> list[Any]:
        """Run a batch that @serve.batch formed, together with every other batch waiting for the model.

        @serve.batch closes a batch ``batch_wait_timeout_s`` after its first request, whether or not the model
        is free; under load several small batches then queue for the model thread. Here they wait in one
        list, and the model takes all that is waiting (up to ``max_batch_size`` rows) in a single call.
        """
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((reqs, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            group, rows = [], 0
            while self._waiting and (not group or rows + len(self._waiting[0][0]) <= self._args.max_batch_size):
                reqs, future = self._waiting.popleft()
                group.append((reqs, future))
                rows += len(reqs)
            flat = [r for reqs, _ in group for r in reqs]
            try:
                results = await self._scheduler.run(INTERACTIVE, work.sample_group, self._model, flat)
            except Exception as e:  # noqa: BLE001 - hand the failure to the waiting requests, keep draining
                for _, future in group:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for reqs, future in group:
                if not future.done():  # a cancelled request's future is already done
                    future.set_result(results[start : start + len(reqs)])
                start += len(reqs)

    # -- grids, morphs, mixing (bulk priority, in chunks) ---------------------------------------------------

    async def grid(self, req: GridRequest) -> Encoded:
        model = self._model
        work.check_sampling(model.G, req.sampling)
        seeds, left = list(req.seeds), _chunks(len(req.seeds)) + 1
        if projection_ids(seeds):
            fetched = await self._fetch_projections(model, seeds, req.sampling)
            ws = await self._scheduler.run(BULK, work.latents_ws, model, seeds, fetched, req.sampling, remaining=left)
            seeds = None  # noise: const or none (a projection has no seed to seed random noise)
        else:
            ws = await self._scheduler.run(BULK, work.seeds_ws, model, seeds, req.sampling, remaining=left)
        images = await self._synthesize(model, ws, seeds, req.sampling.noise)
        if req.format == "zip":
            named = [(_zip_name(ref), img) for ref, img in zip(req.seeds, images)]
            data = await self._encode(encode.encode_zip, named)
        else:
            data = await self._encode(work.encode_grid, images, req.cols, req.pad)
        return Encoded(data, MEDIA_TYPES[req.format], model.name, {"X-Images": str(len(req.seeds))})

    async def morph(self, req: MorphRequest) -> Encoded:
        model = self._model
        work.check_sampling(model.G, req.sampling)
        if projection_ids(req.seeds):
            if req.space != "w":
                raise InvalidRequest("space=z: a projected image has a latent in W, not in Z; use space=w")
            fetched = await self._fetch_projections(model, req.seeds, req.sampling)
            ws = await self._scheduler.run(BULK, work.morph_latents_ws, model, req, fetched,
                                           remaining=_chunks(req.frames) + 1)
        else:
            ws = await self._scheduler.run(BULK, work.morph_ws, model, req, remaining=_chunks(req.frames) + 1)
        frames = await self._synthesize(model, ws, None, req.sampling.noise)
        data = await self._encode(encode.encode_animation, frames, req.format, req.fps, req.quality)
        return Encoded(data, MEDIA_TYPES[req.format], model.name, {"X-Frames": str(len(frames))})

    async def mix(self, req: MixRequest) -> Encoded:
        from styleray.models.sampling import style_mix_grid

        model = self._model
        work.check_sampling(model.G, req.sampling)
        work.check_layers(model.G, req.layers)
        rows, cols = len(req.rows), len(req.cols)
        cell_chunks = _chunks(rows * cols)
        left = _chunks(rows + cols) + cell_chunks + 1
        if projection_ids(req.rows + req.cols):
            fetched = await self._fetch_projections(model, req.rows + req.cols, req.sampling)
            ws, mixed = await self._scheduler.run(BULK, work.mix_latents_ws, model, req, fetched, remaining=left)
        else:
            ws, mixed = await self._scheduler.run(BULK, work.mix_ws, model, req, remaining=left)
        singles = await self._synthesize(model, ws, None, req.sampling.noise, after=cell_chunks)
        cells = await self._synthesize(model, mixed, None, req.sampling.noise)
        grid = style_mix_grid(singles, cells, rows, cols)
        data = await self._encode(work.encode_grid, grid.reshape(-1, *grid.shape[2:]), cols + 1, 0)
        return Encoded(data, "image/png", model.name, {"X-Grid": f"{rows + 1}x{cols + 1}"})

    async def _synthesize(self, model: LoadedModel, ws, seeds: list[int] | None, noise: str, after: int = 0) -> np.ndarray:
        """ws -> images, one bulk job per chunk of rows: other requests get the model thread in between.
        ``after``: chunks the request has still to run after these (for the scheduler's order)."""
        from styleray.models.sampling import CHUNK

        parts = []
        starts = range(0, ws.shape[0], CHUNK)
        for k, i in enumerate(starts):
            part_seeds = seeds[i : i + CHUNK] if seeds is not None else None
            left = len(starts) - k + after
            parts.append(await self._scheduler.run(BULK, work.synthesize, model, ws[i : i + CHUNK], part_seeds, noise, remaining=left))
        return np.concatenate(parts)

    async def _encode(self, fn: Callable, *args: Any) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self._encoder, fn, *args)

    # -- projections (serve/projection_runner.py) ------------------------------------------------------------

    async def start_projection(self, req: ProjectionRequest) -> dict:
        """Start projecting an uploaded image on this replica; its record at once (429 when the slots are full)."""
        if self._projection_store is None:
            raise InvalidRequest("this application has no projection store")
        model = self._model
        if model.G.c_dim > 0 and req.class_idx is not None and not 0 <= req.class_idx < model.G.c_dim:
            raise InvalidRequest(
                f"class={req.class_idx} is out of range: this generator has classes 0-{model.G.c_dim - 1}")
        return await self._projections.start(model, req)

    async def _fetch_projections(self, model: LoadedModel, refs, sampling: Sampling) -> dict[str, np.ndarray]:
        """The latents of the proj:ID references, checked against the served model (409 when they do not fit)."""
        if sampling.noise == "random":
            raise InvalidRequest("noise=random: a projected image has no seed to seed its noise; use const or none")
        fetched = {}
        for pid in dict.fromkeys(projection_ids(refs)):
            ws, params = await self._projection_store.latent.remote(pid)
            if tuple(ws.shape) != (model.G.num_ws, model.G.w_dim):
                raise Conflict(
                    f"proj:{pid} was made with {params.get('checkpoint')} ({params.get('resolution')} px, w "
                    f"{list(ws.shape)}); this server now serves {model.name} ({model.G.img_resolution} px, w "
                    f"[{model.G.num_ws}, {model.G.w_dim}]): project the image again")
            fetched[pid] = ws
        return fetched


def _zip_name(ref) -> str:
    return f"seed{ref:010d}.png" if isinstance(ref, int) else f"{ref.replace(':', '-')}.png"


def _chunks(rows: int) -> int:
    """Network chunks (``sampling.CHUNK`` rows each) that ``rows`` images take."""
    from styleray.models.sampling import CHUNK

    return -(-rows // CHUNK)
