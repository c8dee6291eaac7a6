"""Projections over HTTP: the bounds, the request, and the errors with their status codes.

A finished projection is a *latent reference*, ``proj:ID``, wherever the API takes a seed (parsed in
``schemas.py``): ``GET /v1/morph?from=proj:ID&to=seed:42`` morphs a real image into a sample.

Pure Python (no torch, no Ray): the ingress validates with it before any work is queued.
"""

from __future__ import annotations

from dataclasses import dataclass

from styleray.serve.schemas import ID_PATTERN, InvalidRequest

# -- bounds -------------------------------------------------------------------------------------------------
UPLOAD_PATH = "/v1/projections"  # POST: the image file as the body
MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # POST /v1/projections: the image file, at most this many bytes (413)
MAX_UPLOAD_PIXELS = 16_000_000  # ... and at most this many pixels, read from its header before decoding (413)
PROJECTION_STEPS_DEFAULT = 300
PROJECTION_STEPS_MAX = 2000  # the most any server allows; ServeArgs.max_projection_steps may lower it


class NotFound(InvalidRequest):
    status = 404


class Conflict(InvalidRequest):
    """A projection that exists but cannot be used now (still running, failed, or made for another model)."""

    status = 409


class PayloadTooLarge(InvalidRequest):
    status = 413


class UnsupportedMedia(InvalidRequest):
    status = 415


class Busy(InvalidRequest):
    """Every projection slot of the replica is taken: 429 with Retry-After (seconds, the first argument)."""

    status = 429

    @property
    def retry_after(self) -> int:
        return int(self.args[1]) if len(self.args) > 1 else 5

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "busy"


def projection_limits(max_steps: int, running: int, kept: int) -> dict:
    """The projection bounds, as published by ``GET /v1/info``."""
    return {"max_upload_bytes": MAX_UPLOAD_BYTES, "max_upload_pixels": MAX_UPLOAD_PIXELS,
            "max_projection_steps": max_steps, "projections_running_per_replica": running, "projections_kept": kept}


def parse_projection_id(text: str) -> str:
    if not ID_PATTERN.fullmatch(text):
        raise NotFound(f"no projection {text[:40]!r}: projection ids are 12 hexadecimal characters")
    return text


@dataclass(frozen=True)
class ProjectionRequest:
    """POST /v1/projections: the image and how to search (the ingress checked the static bounds)."""

    image: bytes = b""
    steps: int = PROJECTION_STEPS_DEFAULT
    space: str = "w+"
    seed: int = 0
    class_idx: int | None = None  # a conditional model's class for the starting w (None: all classes)
    frame: str = "auto"  # as styleray project --frame
