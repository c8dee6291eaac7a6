"""Projections on a generator replica: at most ``slots`` at once, each on a thread of its own.

``start`` frames the uploaded image (as ``styleray project`` does: safe decode, framed like prepare), records
the projection in the ProjectionStore and returns at once; the search then runs on a projection thread
(not the model thread, so samples and morphs keep flowing) and reports its progress and a preview of the
reconstruction to the store a few times a second, then the latent.

Projections here keep the model's own noise maps (``optimize_noise=False``): the latent alone then stands for
the image, so ``proj:ID`` in a morph, a mix or a grid starts from exactly the reconstruction shown.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from styleray.serve import encode
from styleray.serve.projections import MAX_UPLOAD_PIXELS, Busy, PayloadTooLarge, ProjectionRequest
from styleray.serve.schemas import InvalidRequest

log = logging.getLogger("ray.serve")

REPORT_EVERY_S = 0.3  # progress (and a preview PNG) at most this often
MAX_PSNR = 100.0  # identical images have an infinite PSNR, which JSON cannot carry: reported as this


@dataclass
class _Running:
    started: float  # time.monotonic()
    steps: int
    step: int = 0

    def seconds_left(self) -> float:
        if self.step == 0:
            return float(self.steps)  # unknown pace: a second a step is a safe guess on a CPU
        return (time.monotonic() - self.started) / self.step * (self.steps - self.step)


class ProjectionRunner:
    def __init__(self, store, slots: int, max_steps: int):
        self._store = store  # DeploymentHandle of ProjectionStore
        self._slots = slots  # projections at once on this replica
        self._max_steps = max_steps
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="styleray-projection")
        self._running: dict[str, _Running] = {}
        self._tasks: set[asyncio.Task] = set()
        self._distance: Any = None  # built on first use (the VGG16 distance when its weights are found)

    @property
    def running(self) -> int:
        return len(self._running)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def start(self, name: str, model, req: ProjectionRequest) -> dict:
        """Frame the image, record the projection (made by model ``name``), start it; its record (running)."""
        if req.steps > self._max_steps:
            raise InvalidRequest(f"steps={req.steps}: this server allows at most {self._max_steps} projection steps")
        if len(self._running) >= self._slots:
            wait = max(1, round(min(r.seconds_left() for r in self._running.values())))
            raise Busy(f"{len(self._running)} projection(s) running on this replica, the most it runs at once; "
                       f"retry in about {wait} s", wait)
        pid = uuid.uuid4().hex[:12]
        self._running[pid] = _Running(time.monotonic(), req.steps)  # the slot is taken before any await
        try:
            target = await asyncio.to_thread(_frame, model.G, req)
            params = {"steps": req.steps, "space": req.space, "seed": req.seed, "framing": target.framing,
                      "source": {"width": target.width, "height": target.height, "mode": target.mode},
                      "model": name, "checkpoint": model.name, "checkpoint_uri": model.public_uri,
                      "resolution": model.G.img_resolution, "num_ws": model.G.num_ws, "w_dim": model.G.w_dim}
            png = await asyncio.to_thread(encode.encode_image, target.image, "png")
            record = await self._store.create.remote(pid, params, png)
        except BaseException:
            self._running.pop(pid, None)
            raise
        task = asyncio.get_running_loop().create_task(self._run(pid, model, target.image, req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    async def _run(self, pid: str, model, target, req: ProjectionRequest) -> None:
        loop = asyncio.get_running_loop()
        reporter = _Reporter(pid, self._store, loop, self._running[pid])
        try:
            ws, png, result = await loop.run_in_executor(self._pool, self._project, model, target, req, reporter)
            await self._store.finish.remote(pid, ws, png, result)
            log.info("projection %s done: PSNR %.2f dB in %.1f s", pid, result["psnr"], result["seconds"])
        except Exception as e:  # noqa: BLE001 - a failed projection is recorded, never a crashed replica
            log.warning("projection %s failed: %s: %s", pid, type(e).__name__, e)
            await self._store.fail.remote(pid, f"{type(e).__name__}: {e}")
        finally:
            self._running.pop(pid, None)

    def _project(self, model, target, req: ProjectionRequest, reporter) -> tuple[Any, bytes, dict]:
        """The search (on a projection thread): (w [num_ws, w_dim] float32, reconstruction PNG, result)."""
        import torch

        from styleray.models.projection.choose import build_distance
        from styleray.models.projection.distances import psnr_uint8
        from styleray.models.projection.search import ProjectionConfig, project
        from styleray.models.sampling import to_uint8

        if self._distance is None:
            self._distance, note = build_distance("auto")
            log.info("projections: %s", note)
        cfg = ProjectionConfig(steps=req.steps, space=req.space, seed=req.seed, class_idx=req.class_idx,
                               optimize_noise=False)
        target_t = torch.from_numpy(target.copy()).permute(2, 0, 1).contiguous()
        with torch.inference_mode(False), torch.enable_grad():
            p = project(model.G, target_t, cfg, self._distance, callback=reporter)
        image = to_uint8(p.image[None])[0]
        result = {"psnr": round(min(psnr_uint8(image, target), MAX_PSNR), 3), "distance": self._distance.name,
                  "distance_value": p.distance, "seconds": round(p.seconds, 3)}
        return p.ws.numpy(), encode.encode_image(image, "png"), result


class _Reporter:
    """The search's callback (on the projection thread): progress and a preview to the store, throttled."""

    def __init__(self, pid: str, store, loop: asyncio.AbstractEventLoop, state: _Running):
        self.pid, self.store, self.loop, self.state = pid, store, loop, state
        self.last = 0.0

    def __call__(self, p) -> None:
        from styleray.models.sampling import to_uint8

        self.state.step = p.step
        now = time.monotonic()
        if now - self.last < REPORT_EVERY_S and p.step < p.steps:
            return
        self.last = now
        preview = encode.encode_image(to_uint8(p.image[None])[0], "png")
        progress = {"step": p.step, "steps": p.steps, "distance": round(p.distance, 5),
                    "psnr": round(min(p.psnr, MAX_PSNR), 3), "seconds": round(now - self.state.started, 2)}
        asyncio.run_coroutine_threadsafe(self._send(progress, preview), self.loop)

    async def _send(self, progress: dict, preview: bytes) -> None:
        try:
            await self.store.progress.remote(self.pid, progress, preview)
        except Exception as e:  # noqa: BLE001 - a lost progress report is not worth failing the projection
            log.warning("projection %s: progress report failed: %s", self.pid, e)


def _frame(G, req: ProjectionRequest):
    """The upload as the model sees it; bad images become 413 (too large) or 422 with decode's reason."""
    from styleray.datasets.prepare.target import BadTarget, frame_target

    try:
        return frame_target(req.image, G.img_resolution, frame=req.frame, channels=G.img_channels,
                            max_pixels=MAX_UPLOAD_PIXELS)
    except BadTarget as e:
        if e.code == "too-large":
            raise PayloadTooLarge(f"image: {e.detail}") from None
        raise InvalidRequest(f"image: {e}") from None
