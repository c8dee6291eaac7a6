"""The HTTP API: a FastAPI app built per ingress replica around a backend (the ingress deployment).

    create_api(backend, api_key) = error handlers (errors.py) + the routes (routes.py, one function per
                                   route: a new route goes there) + the middleware below

Every request passes, outermost first: ``SecurityHeaders`` (nosniff, no framing, CSP: headers.py),
``ClientLimits`` (header size, requests in flight per client: limits.py), ``ApiKeyGuard`` (the API key:
auth.py) and ``BodyReader`` (a complete, bounded body within a time limit: limits.py). Every error is JSON
``{"error": "..."}`` that says what was wrong and what is allowed, and no input gives a 5xx.
"""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import FastAPI

from styleray.serve import errors
from styleray.serve.args import DEFAULT_API_KEY_ENV
from styleray.serve.auth import ApiKey, ApiKeyGuard
from styleray.serve.headers import SecurityHeaders
from styleray.serve.limits import BodyReader, ClientLimits, HttpLimits
from styleray.serve.routes import ROUTES
from styleray.serve.schemas import MAX_FRAMES, MAX_MIX_SIDE, MAX_SEED, MAX_SEEDS, TRUNCATION_RANGE


class Backend(Protocol):
    """What the routes call; the ingress deployment implements it with the sampler and registry handles."""

    async def call(self, method: str, request: Any = None, model: str | None = None) -> Any: ...

    async def models(self) -> dict: ...  # GET /v1/models

    async def health(self) -> tuple[int, dict]: ...

    async def reload(self, model: str | None, checkpoint: str | None, wait_s: float) -> tuple[int, dict]: ...

    async def projections(self, method: str, *args: Any) -> Any: ...  # the ProjectionStore (serve/projections.py)


def create_api(
    backend: Backend, api_key: str | None, *, key_env: str = DEFAULT_API_KEY_ENV, limits: HttpLimits | None = None
) -> FastAPI:
    """The FastAPI app of one ingress replica. ``key_env``: the variable the key came from (for messages)."""
    api = FastAPI(
        title="styleray",
        version="1",
        description="StyleGAN2-ADA samples, morphs and style mixing from trained models served by name (model=NAME on "
        "every route; GET /v1/models lists them), and projections of real images into a model's latent space "
        "(proj:ID stands for a projected image wherever a seed can, with the model that made it). "
        f"Bounds: seeds in [0, {MAX_SEED}], at most {MAX_SEEDS} seeds per request, {MAX_FRAMES} frames per "
        f"morph, {MAX_MIX_SIDE}x{MAX_MIX_SIDE} style-mixing grids, truncation in {list(TRUNCATION_RANGE)}.",
        docs_url=None,  # routes.add_docs serves an offline page instead of Swagger UI from a CDN
        redoc_url=None,
    )
    key = ApiKey(api_key, key_env)
    errors.install(api)
    for add_route in ROUTES:
        add_route(api, backend, key)
    limits = limits or HttpLimits()
    api.add_middleware(BodyReader, limits=limits)  # added last = runs first: the order below is reversed
    api.add_middleware(ApiKeyGuard, key=key)
    api.add_middleware(ClientLimits, limits=limits)
    api.add_middleware(SecurityHeaders)
    return api
