"""SamplerDeployment: replicas holding the EMA generators of up to K models each, behind typed methods.

(Named Sampler, not Generator: ``styleray.models.networks.Generator`` is the network it serves.)

- Models by name (``slots.py``): every request comes with a model name (the ingress routes it with
  ``handle.options(multiplexed_model_id=NAME)``); ``@serve.multiplexed`` loads a model on first use, keeps at
  most ``ServeArgs.models_per_replica`` per replica (the least recently used is evicted), and tells Ray's
  router which replica holds which, so requests go where their model is already loaded. The loader runs the
  checkpoint read and the network build on a thread, never on the event loop.
- Single-image requests from concurrent clients are batched with ``@serve.batch`` (``ServeArgs.batching``);
  Ray splits batches by model, and the network runs one model per call (``work.sample_group``).
  ``styleray.models.sampling`` runs the network on fixed-size chunks, so a seed gives the same bytes
  whether it was computed alone or in a batch of 32, on this replica or another.
- Model work runs on one model thread per replica, whichever model it is for, scheduled fairly
  (``styleray.serve.scheduler``): samples first, grids, morphs and mixing grids in chunks that take turns.
  Heavy encoding (GIF, grids, zips) runs on its own thread, samples' encoding on the default pool.
- Checkpoints: each held model follows its registry target, falls back to a good checkpoint when the target
  cannot be built, and ``trial`` tests a reload before it is published (``slots.py``).
- Projections of uploaded images run on threads of their own (``projection_runner.py``), at most
  ``max_running_projections`` per replica; a finished one (``proj:ID``) stands wherever a seed can in grids,
  morphs and mixing grids of the model that made it (its latent from the ProjectionStore).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from ray import serve

from styleray.serve import encode, work
from styleray.serve.args import ServeArgs
from styleray.serve.loading import LoadedModel
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
from styleray.serve.slots import ModelSlot, ReplicaModels

log = logging.getLogger("ray.serve")

# @serve.batch batches that may wait for the model at once (they are merged, see SamplerDeployment._coalesced);
# ServeArgs.max_ongoing_requests defaults to max_batch_size * this, which keeps Serve from warning.
SERVE_BATCHES_IN_FLIGHT = 8


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


def _model_name() -> str:
    """The model this request is for (the ingress always names one)."""
    name = serve.get_multiplexed_model_id()
    if not name:
        raise InvalidRequest("no model named: route requests with multiplexed_model_id=NAME")
    return name


@serve.deployment(name="Sampler")
class SamplerDeployment:
    def __init__(self, args: ServeArgs, registry, projections=None):
        self._args = args
        self._projection_store = projections  # DeploymentHandle of ProjectionStore (None: no projections)
        self._projections = ProjectionRunner(projections, args.max_running_projections, args.max_projection_steps)
        self._replica = _replica_id()
        self._models = ReplicaModels(registry, self._replica, replica_device(args), args.source_policy(),
                                     args.max_checkpoint_bytes, args.reload_poll_s)
        self._scheduler = ModelScheduler()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="styleray-encode")
        self._waiting: deque[tuple[list, asyncio.Future]] = deque()  # batches waiting for the model thread
        self._drainer: asyncio.Task | None = None
        self._sample_batched.set_max_batch_size(args.max_batch_size)
        self._sample_batched.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

        async def build_named_model(name: str) -> ModelSlot:  # Ray keeps at most K of these, LRU
            return await self._models.open(name)

        self._slot_for = serve.multiplexed(max_num_models_per_replica=args.models_per_replica)(build_named_model)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_registry())

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def _model(self) -> tuple[str, LoadedModel]:
        """The request's model name and the generator to use for the whole request."""
        name = _model_name()
        await self._models.refuse_if_failing(name)
        slot = await self._slot_for(name)
        return name, slot.model  # taken once: a swap meanwhile does not change this request's model

    async def _watch_registry(self) -> None:
        """Poll the registry every ``reload_poll_s``: follow each held model's target, report (a heartbeat)."""
        while True:
            await asyncio.sleep(self._args.reload_poll_s)
            try:
                await self._models.follow()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the registry restarting must not stop the watcher
                log.warning("replica %s: registry poll failed: %s", self._replica, e)

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

    async def trial(self, name: str, target: str) -> dict:
        """Reload, step 1: build and test-sample ``target`` for model ``name`` (LoadError if it cannot be served)."""
        return await self._models.trial(name, target)

    async def ping(self) -> dict:
        return {"replica": self._replica, "models": list(self._models.slots), "fallback": self._models.fallbacks()}

    async def info(self) -> dict:
        a = self._args
        name, model = await self._model()
        slot = self._models.slots.get(name)
        return {
            "model": name,
            **model.info,
            "version": slot.version if slot else None,
            "replica": self._replica,
            "fallback": self._models.fallbacks().get(name),
            "models_here": [n for n, s in self._models.slots.items() if not s.evicted],
            "models_per_replica": a.models_per_replica,
            "batching": a.batching,
            "max_batch_size": a.max_batch_size if a.batching else 1,
            "queue": self._scheduler.waiting(),  # model jobs waiting on this replica: interactive, bulk
            "limits": limits(),
            "projections": {**projection_limits(a.max_projection_steps, a.max_running_projections, a.projections_kept),
                            "running_here": self._projections.running},
        }

    # -- single samples (batched, interactive priority) -----------------------------------------------------

    async def sample(self, req: SampleRequest) -> Encoded:
        name, model = await self._model()
        work.check_sampling(model.G, req.sampling)
        if self._args.batching:
            result = await self._sample_batched((model, req))
        else:
            result = (await self._scheduler.run(INTERACTIVE, work.sample_group, [(model, req)]))[0]
        if isinstance(result, Exception):
            raise result
        image, batch_size = result
        data = await asyncio.to_thread(encode.encode_image, image, req.format, req.quality)
        return self._encoded(name, model, data, MEDIA_TYPES[req.format],
                             {"X-Seed": str(req.seed), "X-Batch-Size": str(batch_size)})

    def _encoded(self, name: str, model: LoadedModel, data: bytes, media_type: str, headers: dict) -> Encoded:
        return Encoded(data, media_type, model.name, {"X-Model": name, "X-Replica": self._replica, **headers})

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=SERVE_BATCHES_IN_FLIGHT)
    async def _sample_batched(self, items: list[tuple[LoadedModel, SampleRequest]]) -> list[Any]:
        return await self._coalesced(items)

    async def _coalesced(self, items: list[tuple[LoadedModel, SampleRequest]]) -> list[Any]:
        """Run a batch that @serve.batch formed, together with every other batch waiting for the model thread.

        @serve.batch closes a batch ``batch_wait_timeout_s`` after its first request, whether or not the model
        is free; under load several small batches then queue for the model thread. Here they wait in one
        list, and the thread takes all that is waiting (up to ``max_batch_size`` rows) in one job, which runs
        the network once per model among them (``work.sample_group``): batches of several models are merged
        for the thread's turn, never within a network call.
        """
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            group, rows = [], 0
            while self._waiting and (not group or rows + len(self._waiting[0][0]) <= self._args.max_batch_size):
                items, future = self._waiting.popleft()
                group.append((items, future))
                rows += len(items)
            flat = [item for items, _ in group for item in items]
            try:
                results = await self._scheduler.run(INTERACTIVE, work.sample_group, flat)
            except Exception as e:  # noqa: BLE001 - hand the failure to the waiting requests, keep draining
                for _, future in group:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for items, future in group:
                if not future.done():  # a cancelled request's future is already done
                    future.set_result(results[start : start + len(items)])
                start += len(items)

    # -- grids, morphs, mixing (bulk priority, in chunks) ---------------------------------------------------

    async def grid(self, req: GridRequest) -> Encoded:
        name, model = await self._model()
        work.check_sampling(model.G, req.sampling)
        seeds, left = list(req.seeds), _chunks(len(req.seeds)) + 1
        if projection_ids(seeds):
            fetched = await self._fetch_projections(name, model, seeds, req.sampling)
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
        return self._encoded(name, model, data, MEDIA_TYPES[req.format], {"X-Images": str(len(req.seeds))})

    async def morph(self, req: MorphRequest) -> Encoded:
        name, model = await self._model()
        work.check_sampling(model.G, req.sampling)
        if projection_ids(req.seeds):
            if req.space != "w":
                raise InvalidRequest("space=z: a projected image has a latent in W, not in Z; use space=w")
            fetched = await self._fetch_projections(name, model, req.seeds, req.sampling)
            ws = await self._scheduler.run(BULK, work.morph_latents_ws, model, req, fetched,
                                           remaining=_chunks(req.frames) + 1)
        else:
            ws = await self._scheduler.run(BULK, work.morph_ws, model, req, remaining=_chunks(req.frames) + 1)
        frames = await self._synthesize(model, ws, None, req.sampling.noise)
        data = await self._encode(encode.encode_animation, frames, req.format, req.fps, req.quality)
        return self._encoded(name, model, data, MEDIA_TYPES[req.format], {"X-Frames": str(len(frames))})

    async def mix(self, req: MixRequest) -> Encoded:
        from styleray.models.sampling import style_mix_grid

        name, model = await self._model()
        work.check_sampling(model.G, req.sampling)
        work.check_layers(model.G, req.layers)
        rows, cols = len(req.rows), len(req.cols)
        cell_chunks = _chunks(rows * cols)
        left = _chunks(rows + cols) + cell_chunks + 1
        if projection_ids(req.rows + req.cols):
            fetched = await self._fetch_projections(name, model, req.rows + req.cols, req.sampling)
            ws, mixed = await self._scheduler.run(BULK, work.mix_latents_ws, model, req, fetched, remaining=left)
        else:
            ws, mixed = await self._scheduler.run(BULK, work.mix_ws, model, req, remaining=left)
        singles = await self._synthesize(model, ws, None, req.sampling.noise, after=cell_chunks)
        cells = await self._synthesize(model, mixed, None, req.sampling.noise)
        grid = style_mix_grid(singles, cells, rows, cols)
        data = await self._encode(work.encode_grid, grid.reshape(-1, *grid.shape[2:]), cols + 1, 0)
        return self._encoded(name, model, data, "image/png", {"X-Grid": f"{rows + 1}x{cols + 1}"})

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
        name, model = await self._model()
        if model.G.c_dim > 0 and req.class_idx is not None and not 0 <= req.class_idx < model.G.c_dim:
            raise InvalidRequest(
                f"class={req.class_idx} is out of range: this generator has classes 0-{model.G.c_dim - 1}")
        return await self._projections.start(name, model, req)

    async def _fetch_projections(self, name: str, model: LoadedModel, refs, sampling: Sampling) -> dict[str, np.ndarray]:
        """The latents of the proj:ID references, checked against the model (409 when made by another model, or
        when they do not fit its checkpoint)."""
        if sampling.noise == "random":
            raise InvalidRequest("noise=random: a projected image has no seed to seed its noise; use const or none")
        fetched = {}
        for pid in dict.fromkeys(projection_ids(refs)):
            ws, params = await self._projection_store.latent.remote(pid)
            made_by = params.get("model")
            if made_by is not None and made_by != name:
                raise Conflict(f"proj:{pid} was made with model {made_by!r}, not {name!r}: use it with "
                               f"model={made_by}, or project the image again with model={name}")
            if tuple(ws.shape) != (model.G.num_ws, model.G.w_dim):
                raise Conflict(
                    f"proj:{pid} was made with {params.get('checkpoint')} ({params.get('resolution')} px, w "
                    f"{list(ws.shape)}); model {name} now serves {model.name} ({model.G.img_resolution} px, w "
                    f"[{model.G.num_ws}, {model.G.w_dim}]): project the image again")
            fetched[pid] = ws
        return fetched


def _zip_name(ref) -> str:
    return f"seed{ref:010d}.png" if isinstance(ref, int) else f"{ref.replace(':', '-')}.png"


def _chunks(rows: int) -> int:
    """Network chunks (``sampling.CHUNK`` rows each) that ``rows`` images take."""
    from styleray.models.sampling import CHUNK

    return -(-rows // CHUNK)
