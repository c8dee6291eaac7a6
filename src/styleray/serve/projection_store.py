"""ProjectionStore: every projection of the application, whichever generator replica runs it.

A Serve deployment (one replica, no CPU, like the CheckpointRegistry) holding one record per projection:
status (running, done, failed), progress (step, steps, distance, PSNR), the target as the model sees it, the
latest reconstruction (a preview while running), and when done the latent (w per layer) and the checkpoint it
was made with. The replica running a projection reports into it; the ingress reads it for
``GET /v1/projections/{id}`` and the generator replicas for latent references (``proj:ID``).

Bounded: at most ``kept`` records. A new projection evicts the oldest finished one; when all kept records
are still running, it is refused (429).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve

from styleray.serve.projections import Busy, Conflict, NotFound


@dataclass
class ProjectionRecord:
    id: str
    status: str  # running, done, failed
    created: float
    params: dict  # steps, space, seed, framing, source size, model, checkpoint name/uri, num_ws, w_dim, resolution
    target_png: bytes
    progress: dict = field(default_factory=dict)  # step, steps, distance, psnr, seconds
    reconstruction_png: bytes | None = None  # the latest preview; the final reconstruction when done
    ws: np.ndarray | None = None  # [num_ws, w_dim] float32, when done
    result: dict = field(default_factory=dict)  # psnr, distance, seconds, when done
    error: str | None = None  # when failed

    def public(self) -> dict:
        """The JSON of GET /v1/projections/{id} (the latent as nested lists once done)."""
        out = {"id": self.id, "status": self.status, "created": self.created, **self.params,
               "progress": self.progress, **self.result}
        if self.error is not None:
            out["error"] = self.error
        if self.ws is not None:
            out["latent"] = {"w": self.ws.tolist(), "shape": list(self.ws.shape), "ref": f"proj:{self.id}"}
        return out


@serve.deployment(name="ProjectionStore", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=1000, logging_config={"enable_access_log": False})
class ProjectionStore:
    def __init__(self, kept: int = 32):
        self._kept = kept  # most records held
        self._records: dict[str, ProjectionRecord] = {}  # insertion order = age

    def create(self, pid: str, params: dict, target_png: bytes) -> dict:
        if len(self._records) >= self._kept:
            finished = [k for k, r in self._records.items() if r.status != "running"]
            if not finished:
                raise Busy(f"all {self._kept} kept projections are still running; try again shortly", 10)
            del self._records[finished[0]]
        record = ProjectionRecord(pid, "running", time.time(), params, target_png,
                                  progress={"step": 0, "steps": params.get("steps")})
        self._records[pid] = record
        return record.public()

    def progress(self, pid: str, progress: dict, preview_png: bytes | None = None) -> None:
        record = self._records.get(pid)
        if record is not None and record.status == "running":
            record.progress = progress
            if preview_png is not None:
                record.reconstruction_png = preview_png

    def finish(self, pid: str, ws: np.ndarray, reconstruction_png: bytes, result: dict) -> None:
        record = self._records.get(pid)
        if record is not None:
            record.status, record.ws, record.reconstruction_png, record.result = "done", ws, reconstruction_png, result
            record.progress = {**record.progress, "step": record.progress.get("steps")}

    def fail(self, pid: str, error: str) -> None:
        record = self._records.get(pid)
        if record is not None:
            record.status, record.error = "failed", error

    def _get(self, pid: str) -> ProjectionRecord:
        try:
            return self._records[pid]
        except KeyError:
            message = f"no projection {pid}: unknown, or evicted (the server keeps the newest {self._kept})"
            raise NotFound(message) from None

    def get(self, pid: str) -> dict:
        return self._get(pid).public()

    def image(self, pid: str, which: str) -> bytes:
        record = self._get(pid)
        if which == "target":
            return record.target_png
        if record.reconstruction_png is None:
            raise Conflict(f"projection {pid} has no reconstruction yet (step {record.progress.get('step', 0)})")
        return record.reconstruction_png

    def latent(self, pid: str) -> tuple[np.ndarray, dict]:
        """(w [num_ws, w_dim], params) of a finished projection; Conflict while it runs or when it failed."""
        record = self._get(pid)
        if record.status == "running":
            p = record.progress
            raise Conflict(f"projection {pid} is still running (step {p.get('step', 0)}/{p.get('steps')}); "
                           f"wait until GET /v1/projections/{pid} says done")
        if record.status == "failed":
            raise Conflict(f"projection {pid} failed: {record.error}")
        return record.ws, record.params

    def list(self) -> list[dict[str, Any]]:
        return [{"id": r.id, "status": r.status, "created": r.created, "progress": r.progress}
                for r in reversed(self._records.values())]
