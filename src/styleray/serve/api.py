"""The HTTP API: a FastAPI app built per ingress replica around a backend (the Generator handle).

Routes, validation and error bodies live here; the work happens in the Generator deployment. Every error is
a 4xx/5xx with a JSON body ``{"error": "...", ...}`` that says what was wrong and what is allowed.

Security: when an API key is configured every route, the page and ``/docs`` included, needs it, either in
the ``X-API-Key`` header or as the password of HTTP Basic auth (so a browser can open the page: it prompts
once and then sends the key with every request the page makes). ``POST /v1/reload`` always needs a key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
from importlib import resources
from typing import Any, Protocol

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from styleray.serve.schemas import (
    FPS_RANGE,
    MAX_BODY_BYTES,
    MAX_FRAMES,
    MAX_MIX_SIDE,
    MAX_SEED,
    MAX_SEEDS,
    MAX_STEPS,
    QUALITY_RANGE,
    TRUNCATION_RANGE,
    AnimationFormat,
    Encoded,
    ImageFormat,
    InvalidRequest,
    LatentSpace,
    MixRequest,
    MorphRequest,
    NoiseMode,
    ReloadBody,
    SampleRequest,
    SamplesBody,
    Sampling,
    parse_latent_list,
    parse_layers,
)
from styleray.serve.projection_routes import add_projection_routes
from styleray.serve.projections import MAX_UPLOAD_BYTES, Busy

log = logging.getLogger("ray.serve")

API_KEY_HEADER = "X-API-Key"
PUBLIC_HEADERS = ["X-Checkpoint", "X-Seed", "X-Batch-Size", "X-Frames", "X-Images", "X-Grid"]


class Backend(Protocol):
    """What the routes call; the ingress deployment implements it with the Generator and registry handles."""

    async def call(self, method: str, request: Any = None) -> Any: ...

    async def reload(self, checkpoint: str | None, wait_s: float) -> tuple[int, dict]: ...

    async def projections(self, method: str, *args: Any) -> Any: ...


def _page() -> str:
    return resources.files("styleray.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _plain_error(e: dict) -> dict:
    """One pydantic error with only JSON-safe, short fields (the input may be raw bytes or a huge list)."""
    out = {"loc": [str(p) if not isinstance(p, int) else p for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
           "type": str(e.get("type", ""))}
    value = e.get("input")
    if isinstance(value, (str, int, float, bool)) or value is None:
        out["input"] = value[:200] if isinstance(value, str) else value
    return out


def _summarize(errors: list[dict]) -> str:
    """FastAPI's validation errors as one line: 'seed: Input should be a valid integer (got "abc")'."""
    parts = []
    for e in errors[:5]:
        if e.get("type") == "json_invalid":  # loc is ("body", character offset)
            parts.append(f"body: malformed JSON near character {e['loc'][-1]}")
            continue
        loc = [str(p) for p in e.get("loc", ())]
        name = ".".join(loc[1:] if len(loc) > 1 and loc[0] in ("query", "body", "path", "header") else loc)
        got = f" (got {e['input']!r})" if e.get("input") is not None else ""
        parts.append(f"{name or 'request'}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts)


def _sampling(truncation: float, class_idx: int | None, noise: str) -> Sampling:
    return Sampling(truncation=float(truncation), class_idx=class_idx, noise=noise)


def _image_response(enc: Encoded, filename: str) -> Response:
    headers = {
        "X-Checkpoint": enc.checkpoint,
        "Content-Disposition": f'inline; filename="{filename}"',
        "Cache-Control": "no-cache",
        "Access-Control-Expose-Headers": ", ".join(PUBLIC_HEADERS),
        **enc.headers,
    }
    return Response(content=enc.data, media_type=enc.media_type, headers=headers)


# Shared query parameters (FastAPI reads the constraints for validation and for /docs).
def _truncation():
    lo, hi = TRUNCATION_RANGE
    return Query(1.0, ge=lo, le=hi, description=f"truncation psi in [{lo}, {hi}]: 1 = none, 0.7 = safer samples")


def _class():
    return Query(None, alias="class", ge=0, description="class index (conditional models only)")


def _quality():
    lo, hi = QUALITY_RANGE
    return Query(90, ge=lo, le=hi, description="JPEG/WebP quality; 100 = lossless WebP")


def create_api(backend: Backend, api_key: str | None) -> FastAPI:
    """The FastAPI app of one ingress replica."""
    api = FastAPI(
        title="styleray",
        version="1",
        description="StyleGAN2-ADA samples, morphs and style mixing from a trained checkpoint, and projections of "
        "real images into its latent space (proj:ID stands for a projected image wherever a seed can). "
        f"Bounds: seeds in [0, {MAX_SEED}], at most {MAX_SEEDS} seeds per request, {MAX_FRAMES} frames per "
        f"morph, {MAX_MIX_SIDE}x{MAX_MIX_SIDE} style-mixing grids, truncation in {list(TRUNCATION_RANGE)}.",
    )
    page = _page()

    # -- errors -------------------------------------------------------------------------------------------

    @api.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = [_plain_error(e) for e in exc.errors()[:20]]
        return JSONResponse({"error": _summarize(errors), "detail": errors}, status_code=422)

    @api.exception_handler(InvalidRequest)
    async def _invalid(_: Request, exc: InvalidRequest):
        # 422, or the status a subclass carries (404, 409, 413, 415, 429: serve/projections.py)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
        return JSONResponse({"error": str(exc)}, status_code=getattr(exc, "status", 422), headers=headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    # -- auth and body size (every route, /docs included) --------------------------------------------------

    @api.middleware("http")
    async def _guard(request: Request, call_next):
        if api_key is not None and not _authorized(request, api_key):
            return JSONResponse(
                {"error": f"missing or wrong API key: send it in the {API_KEY_HEADER} header"},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="styleray", charset="UTF-8"'},
            )
        if request.method in ("POST", "PUT", "PATCH"):
            limit = MAX_UPLOAD_BYTES if request.scope["path"].endswith("/v1/projections") else MAX_BODY_BYTES
            length = request.headers.get("content-length")
            if length is None and request.headers.get("transfer-encoding"):
                return _error(411, "send a Content-Length with the body (no chunked uploads)")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return _error(413, f"body of {length} bytes is larger than {limit}")
        return await call_next(request)

    # -- page and health ----------------------------------------------------------------------------------

    @api.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @api.get("/healthz", summary="Liveness: the ingress answers and a generator replica is loaded")
    async def healthz():
        try:
            name = await asyncio.wait_for(backend.call("ping"), timeout=10)
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy; say which
            return _error(503, f"no generator replica answered: {type(e).__name__}: {e}")
        return {"status": "ok", "checkpoint": name}

    @api.get("/v1/info", summary="The served model: resolution, classes, kimg, checkpoint, limits")
    async def info():
        return await backend.call("info")

    # -- images -------------------------------------------------------------------------------------------

    @api.get(
        "/v1/sample",
        summary="One image from a seed",
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
    )
    async def sample(
        seed: int = Query(..., ge=0, le=MAX_SEED, description=f"integer in [0, {MAX_SEED}]"),
        truncation: float = _truncation(),
        class_idx: int | None = _class(),
        noise: NoiseMode = Query("const", description="const: the trained noise maps; random: seeded by the seed"),
        format: ImageFormat = Query("png"),
        quality: int = _quality(),
    ):
        req = SampleRequest(seed, _sampling(truncation, class_idx, noise), format, quality)
        enc = await backend.call("sample", req)
        return _image_response(enc, f"seed{seed}.{format}")

    @api.post(
        "/v1/samples",
        summary="A grid PNG (or a zip of PNGs) for a list of seeds",
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "application/zip": {}}}},
    )
    async def samples(body: SamplesBody = Body(...)):
        enc = await backend.call("grid", body.to_request())
        return _image_response(enc, f"samples.{body.format}")

    @api.get(
        "/v1/morph",
        summary="An animation through the seeds (linear in W, spherical in Z)",
        response_class=Response,
        responses={200: {"content": {"image/gif": {}, "image/webp": {}}}},
    )
    async def morph(
        seeds: str | None = Query(None, max_length=MAX_SEEDS * 18,
                                  description="2 or more comma-separated seeds or projections: 3,proj:ID,42"),
        from_: str | None = Query(None, alias="from", max_length=20,
                                  description="instead of seeds: where the morph starts, 42, seed:42 or proj:ID"),
        to: str | None = Query(None, max_length=20, description="with from: where the morph ends"),
        steps: int = Query(30, ge=1, le=MAX_STEPS, description="frames from one seed to the next"),
        space: LatentSpace = Query("w", description="w: linear in W; z: spherical in Z"),
        fps: int = Query(24, ge=FPS_RANGE[0], le=FPS_RANGE[1]),
        loop: bool = Query(False, description="morph back from the last seed to the first"),
        truncation: float = _truncation(),
        class_idx: int | None = _class(),
        noise: NoiseMode = Query("const", description="const or none (random flickers)"),
        format: AnimationFormat = Query("gif"),
        quality: int = _quality(),
    ):
        seed_list = _morph_latents(seeds, from_, to)
        req = MorphRequest(
            tuple(seed_list), steps, space, loop, fps, _sampling(truncation, class_idx, noise), format, quality
        )
        if req.frames > MAX_FRAMES:
            most = MAX_FRAMES // len(seed_list) if loop else (MAX_FRAMES - 1) // (len(seed_list) - 1)
            raise InvalidRequest(
                f"{len(seed_list)} seeds x steps={steps} make {req.frames} frames; at most {MAX_FRAMES} "
                f"(use steps <= {max(most, 1)} or fewer seeds)"
            )
        enc = await backend.call("morph", req)
        names = "-".join(str(s).replace("proj:", "p") for s in seed_list[:8])
        return _image_response(enc, f"morph-{names}.{format}")

    @api.get(
        "/v1/mix",
        summary="Style-mixing grid: column seeds' styles on the given layers over row seeds",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def mix(
        rows: str = Query(..., max_length=MAX_MIX_SIDE * 18,
                          description=f"1-{MAX_MIX_SIDE} seeds or proj:ID, e.g. 1,2,3"),
        cols: str = Query(..., max_length=MAX_MIX_SIDE * 18, description=f"1-{MAX_MIX_SIDE} seeds or proj:ID"),
        layers: str | None = Query(None, max_length=200, description="w layers from the column seeds: 0-5 (default: coarse)"),
        truncation: float = _truncation(),
        class_idx: int | None = _class(),
        noise: NoiseMode = Query("const"),
    ):
        req = MixRequest(
            rows=tuple(parse_latent_list(rows, "rows", MAX_MIX_SIDE)),
            cols=tuple(parse_latent_list(cols, "cols", MAX_MIX_SIDE)),
            layers=tuple(l) if (l := parse_layers(layers)) is not None else None,
            sampling=_sampling(truncation, class_idx, noise),
        )
        enc = await backend.call("mix", req)
        return _image_response(enc, "mix.png")

    # -- reload -------------------------------------------------------------------------------------------

    @api.post("/v1/reload", summary="Switch every replica to a newer checkpoint without dropping requests (API key)")
    async def reload(body: ReloadBody | None = Body(None)):
        if api_key is None:
            return _error(403, "reload is disabled: it needs an API key; start the server with STYLERAY_API_KEY set")
        body = body or ReloadBody()
        status, result = await backend.reload(body.checkpoint, body.wait_s)
        return JSONResponse(result, status_code=status)

    add_projection_routes(api, backend)
    return api


def _morph_latents(seeds: str | None, from_: str | None, to: str | None) -> list:
    """The morph's latents: ``seeds`` (2 or more), or ``from`` and ``to`` (one each)."""
    if from_ is not None or to is not None:
        if seeds is not None or from_ is None or to is None:
            raise InvalidRequest("give either seeds=A,B,... or both from= and to=, e.g. from=proj:ID&to=seed:42")
        return parse_latent_list(f"{from_},{to}", "from/to", 2, 2)
    if seeds is None:
        raise InvalidRequest("seeds: give 2 or more comma-separated seeds (seeds=3,17,42), or from= and to=")
    return parse_latent_list(seeds, "seeds", MAX_SEEDS, min_count=2)


def _authorized(request: Request, api_key: str) -> bool:
    """The key in X-API-Key, or as the password of HTTP Basic auth (any user name)."""
    given = request.headers.get(API_KEY_HEADER)
    if given is None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
    return given is not None and hmac.compare_digest(given.encode(), api_key.encode())
