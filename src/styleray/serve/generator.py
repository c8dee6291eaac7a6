"""The Generator deployment: a checkpoint's EMA generator, loaded once per replica, behind typed methods.

Single-image requests from concurrent clients are batched with ``@serve.batch`` (switchable with
``ServeArgs.batching``). ``styleray.models.sampling`` runs the network on fixed-size chunks, so a seed gives
the same bytes whether it was computed alone or in a batch of 32.

Model work runs on one dedicated thread per replica: the event loop stays free to accept and batch requests
while the network runs, and encoding (PNG, GIF) runs on other threads so it overlaps the next batch.
Checkpoint reloads load the new generator beside the old one and swap a reference: requests in flight finish
on the model they started with, none is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from ray import serve

from styleray.serve import encode
from styleray.serve.args import ServeArgs
from styleray.serve.projection_runner import ProjectionRunner
from styleray.serve.projections import Conflict, ProjectionRequest, projection_limits
from styleray.serve.schemas import (
    MEDIA_TYPES,
    Encoded,
    GridRequest,
    InvalidRequest,
    LatentRef,
    MixRequest,
    MorphRequest,
    SampleRequest,
    Sampling,
    limits,
    projection_ids,
)

log = logging.getLogger("ray.serve")

# @serve.batch batches that may wait for the model at once (they are merged, see Generator._coalesced);
# ServeArgs.max_ongoing_requests defaults to max_batch_size * this, which keeps Serve from warning.
SERVE_BATCHES_IN_FLIGHT = 8


@dataclass(frozen=True)
class LoadedModel:
    G: Any  # styleray.models.networks.Generator (EMA weights, eval mode)
    target: str  # what was asked for (a checkpoint or a run folder)
    uri: str  # the checkpoint folder actually loaded
    name: str  # its folder name, e.g. ckpt-000000012800
    kimg: float
    device: str

    @property
    def info(self) -> dict:
        G = self.G
        return {
            "checkpoint": self.name,
            "checkpoint_uri": self.uri,
            "kimg": self.kimg,
            "resolution": G.img_resolution,
            "channels": G.img_channels,
            "classes": G.c_dim,
            "num_ws": G.num_ws,
            "z_dim": G.z_dim,
            "w_dim": G.w_dim,
            "device": self.device,
        }


def replica_device(args: ServeArgs) -> str:
    """auto: cuda only when the replica reserved a GPU (Ray then sets CUDA_VISIBLE_DEVICES) and sees one."""
    if args.device != "auto":
        return args.device
    import torch

    return "cuda" if args.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"


def load_model(target: str, device: str) -> LoadedModel:
    """Load the EMA generator of ``target`` (checkpoint or run folder, local or s3://) onto ``device``."""
    from styleray.platform.checkpoint import load_generator

    G, ckpt = load_generator(target, device)
    return LoadedModel(G=G, target=target, uri=ckpt.uri, name=ckpt.name, kimg=float(ckpt.meta.get("kimg", 0.0)), device=device)


def check_sampling(G: Any, s: Sampling) -> None:
    """Model-dependent checks (the ingress already checked the static bounds)."""
    if G.c_dim == 0 and s.class_idx is not None:
        raise InvalidRequest(f"class={s.class_idx}: this generator is unconditional; omit class")
    if G.c_dim > 0 and s.class_idx is None:
        raise InvalidRequest(f"class: this generator is conditional; give class in [0, {G.c_dim - 1}]")
    if G.c_dim > 0 and not 0 <= s.class_idx < G.c_dim:
        raise InvalidRequest(f"class={s.class_idx} is out of range: this generator has classes 0-{G.c_dim - 1}")


@serve.deployment(name="Generator")
class Generator:
    async def __init__(self, args: ServeArgs, registry, projections=None):
        self._args = args
        self._registry = registry  # DeploymentHandle of CheckpointRegistry
        self._projection_store = projections  # DeploymentHandle of ProjectionStore (None: no projections)
        self._projections = ProjectionRunner(projections, args.max_running_projections, args.max_projection_steps)
        self._batching = args.batching
        self._device = replica_device(args)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="styleray-model")
        try:
            self._replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (unit use): any unique name will do
            self._replica = uuid.uuid4().hex[:8]
        self._waiting: deque[tuple[list[SampleRequest], asyncio.Future]] = deque()  # batches waiting for the model
        self._drainer: asyncio.Task | None = None
        self._sample_batched.set_max_batch_size(args.max_batch_size)
        self._sample_batched.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

        version, target = await registry.target.remote()
        self._model = await asyncio.to_thread(load_model, target, self._device)
        self._version = version
        await registry.pin.remote(version, target, self._model.uri)
        await registry.report.remote(self._replica, version, self._model.uri)
        log.info("generator replica %s serves %s (%.1f kimg)", self._replica, self._model.uri, self._model.kimg)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_registry())

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def _watch_registry(self) -> None:
        """Poll the registry; load a new target beside the current model, swap, report (a heartbeat too)."""
        while True:
            await asyncio.sleep(self._args.reload_poll_s)
            try:
                version, target = await self._registry.target.remote()
                error = None
                if target not in (self._model.target, self._model.uri):
                    started = time.perf_counter()
                    try:
                        model = await asyncio.to_thread(load_model, target, self._device)
                    except Exception as e:  # noqa: BLE001 - keep serving the old model; report why
                        log.error("replica %s cannot load %s: %s", self._replica, target, e)
                        error = f"{type(e).__name__}: {e}"
                    else:
                        self._model = model  # requests in flight keep their reference to the old one
                        self._version = version
                        log.info(
                            "replica %s switched to %s in %.2f s", self._replica, model.uri, time.perf_counter() - started
                        )
                elif version != self._version:
                    self._version = version  # same checkpoint under a new version: nothing to load
                await self._registry.report.remote(self._replica, self._version if error is None else version, self._model.uri, error)
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
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        projections = getattr(self, "_projections", None)
        if projections is not None:
            projections.shutdown()

    async def _run(self, fn: Callable, *args) -> Any:
        """Run model work on the replica's model thread (one at a time, off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- small calls ----------------------------------------------------------------------------------------

    async def ping(self) -> str:
        return self._model.name

    async def info(self) -> dict:
        a = self._args
        return {
            **self._model.info,
            "version": self._version,
            "replica": self._replica,
            "batching": self._batching,
            "max_batch_size": a.max_batch_size if self._batching else 1,
            "limits": limits(),
            "projections": {**projection_limits(a.max_projection_steps, a.max_running_projections, a.projections_kept),
                            "running_here": self._projections.running},
        }

    # -- single samples (batched) ---------------------------------------------------------------------------

    async def sample(self, req: SampleRequest) -> Encoded:
        model = self._model
        check_sampling(model.G, req.sampling)
        if self._batching:
            result = await self._sample_batched(req)
        else:
            result = await self._run(_sample_group, model, [req])
            result = result[0]
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
                results = await self._run(_sample_group, self._model, flat)
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

    # -- grids, morphs, mixing (already batches of their own) -----------------------------------------------

    async def grid(self, req: GridRequest) -> Encoded:
        model = self._model
        check_sampling(model.G, req.sampling)
        if projection_ids(req.seeds):
            fetched = await self._fetch_projections(model, req.seeds, req.sampling)
            images = await self._run(_synthesize_refs, model, req.seeds, fetched, req.sampling)
        else:
            images = await self._run(_generate, model, list(req.seeds), req.sampling)
        if req.format == "zip":
            named = [(_zip_name(seed), img) for seed, img in zip(req.seeds, images)]
            data = await asyncio.to_thread(encode.encode_zip, named)
        else:
            data = await asyncio.to_thread(_encode_grid, images, req.cols, req.pad)
        return Encoded(data, MEDIA_TYPES[req.format], model.name, {"X-Images": str(len(req.seeds))})

    async def morph(self, req: MorphRequest) -> Encoded:
        model = self._model
        check_sampling(model.G, req.sampling)
        if req.sampling.noise == "random":
            raise InvalidRequest("noise=random: morphs use noise const or none (random noise flickers between frames)")
        if projection_ids(req.seeds):
            if req.space != "w":
                raise InvalidRequest("space=z: a projected image has a latent in W, not in Z; use space=w")
            fetched = await self._fetch_projections(model, req.seeds, req.sampling)
            frames = await self._run(_morph_refs, model, req, fetched)
        else:
            frames = await self._run(_morph, model, req)
        data = await asyncio.to_thread(encode.encode_animation, frames, req.format, req.fps, req.quality)
        return Encoded(data, MEDIA_TYPES[req.format], model.name, {"X-Frames": str(len(frames))})

    async def mix(self, req: MixRequest) -> Encoded:
        model = self._model
        check_sampling(model.G, req.sampling)
        if req.layers is not None:
            bad = [i for i in req.layers if i >= model.G.num_ws]
            if bad:
                raise InvalidRequest(f"layers {bad} out of range: this generator has layers 0-{model.G.num_ws - 1}")
        if projection_ids(req.rows + req.cols):
            fetched = await self._fetch_projections(model, req.rows + req.cols, req.sampling)
            grid = await self._run(_mix_refs, model, req, fetched)
        else:
            grid = await self._run(_mix, model, req)
        rows, cols = grid.shape[:2]
        data = await asyncio.to_thread(_encode_grid, grid.reshape(rows * cols, *grid.shape[2:]), cols, 0)
        return Encoded(data, "image/png", model.name, {"X-Grid": f"{rows}x{cols}"})

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


# -- model work (runs on the model thread) ------------------------------------------------------------------


def _zip_name(ref: LatentRef) -> str:
    return f"seed{ref:010d}.png" if isinstance(ref, int) else f"{ref.replace(':', '-')}.png"


def _latents(model: LoadedModel, refs, fetched: dict[str, np.ndarray], s: Sampling):
    """[N, num_ws, w_dim] on the model's device: seeds through the mapping (truncation, class), projections
    as they were found."""
    import torch

    from styleray.models.sampling import seeds_to_ws

    seeds = [r for r in refs if isinstance(r, int)]
    seed_ws = iter(seeds_to_ws(model.G, seeds, s.truncation, class_idx=s.class_idx)) if seeds else iter(())
    device = next(model.G.parameters()).device
    return torch.stack([next(seed_ws) if isinstance(r, int) else torch.from_numpy(fetched[r[5:]]).to(device)
                        for r in refs])


def _synthesize_refs(model: LoadedModel, refs, fetched, s: Sampling) -> np.ndarray:
    import torch

    from styleray.models.sampling import synthesize

    with torch.inference_mode():
        return synthesize(model.G, _latents(model, refs, fetched, s), noise_mode=s.noise)


def _morph_refs(model: LoadedModel, req: MorphRequest, fetched) -> np.ndarray:
    import torch

    from styleray.models.sampling import morph_ws

    with torch.inference_mode():
        ws = _latents(model, req.seeds, fetched, req.sampling)
        return morph_ws(model.G, ws, steps=req.steps, loop=req.loop, noise_mode=req.sampling.noise)


def _mix_refs(model: LoadedModel, req: MixRequest, fetched) -> np.ndarray:
    import torch

    from styleray.models.sampling import style_mix_ws

    with torch.inference_mode():
        ws = _latents(model, req.rows + req.cols, fetched, req.sampling)
        layers = list(req.layers) if req.layers is not None else None
        return style_mix_ws(model.G, ws[: len(req.rows)], ws[len(req.rows):], layers, req.sampling.noise)


def _generate(model: LoadedModel, seeds: list[int], s: Sampling) -> np.ndarray:
    import torch

    from styleray.models.sampling import generate_images

    with torch.inference_mode():
        return generate_images(model.G, seeds, truncation_psi=s.truncation, class_idx=s.class_idx, noise_mode=s.noise)


def _sample_group(model: LoadedModel, reqs: list[SampleRequest]) -> list[Any]:
    """One image per request; requests sharing sampling settings run as one batch. A request the model
    rejects gets its exception back instead of failing the others."""
    groups: dict[Sampling, list[int]] = defaultdict(list)
    for i, r in enumerate(reqs):
        groups[r.sampling].append(i)
    out: list[Any] = [None] * len(reqs)
    for sampling, idx in groups.items():
        try:
            check_sampling(model.G, sampling)  # the model may have been swapped since the request was checked
            images = _generate(model, [reqs[i].seed for i in idx], sampling)
        except InvalidRequest as e:
            for i in idx:
                out[i] = e
            continue
        for k, i in enumerate(idx):
            out[i] = (images[k], len(reqs), model.name)
    return out


def _morph(model: LoadedModel, req: MorphRequest) -> np.ndarray:
    import torch

    from styleray.models.sampling import morph

    s = req.sampling
    with torch.inference_mode():
        return morph(
            model.G, list(req.seeds), steps=req.steps, space=req.space, loop=req.loop,
            truncation_psi=s.truncation, class_idx=s.class_idx, noise_mode=s.noise,
        )


def _mix(model: LoadedModel, req: MixRequest) -> np.ndarray:
    import torch

    from styleray.models.sampling import style_mix

    s = req.sampling
    with torch.inference_mode():
        return style_mix(
            model.G, list(req.rows), list(req.cols), layers=list(req.layers) if req.layers is not None else None,
            truncation_psi=s.truncation, class_idx=s.class_idx, noise_mode=s.noise,
        )


def _encode_grid(images: np.ndarray, cols: int | None, pad: int) -> bytes:
    from styleray.models.sampling import image_grid

    return encode.encode_image(image_grid(images, cols=cols, pad=pad), "png")
