"""The HTTP routes, one function each. A new route is one function here, added to ``ROUTES``.

Each function takes the app, the backend (``styleray.serve.api.Backend``: the ingress deployment, or a fake
in tests) and the configured API key, and registers one route. Validation that needs no model happens here
(FastAPI reads the constraints for validation and for ``/docs``); the work happens behind the backend.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import Body, Depends, FastAPI, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response

from styleray.serve.auth import ApiKey, reload_key_dependency
from styleray.serve.docs import render_docs
from styleray.serve.headers import page_csp
from styleray.serve.schemas import (
    FPS_RANGE,
    MAX_FRAMES,
    MAX_MIX_SIDE,
    MAX_SEED,
    MAX_SEEDS,
    MAX_STEPS,
    QUALITY_RANGE,
    TRUNCATION_RANGE,
    AnimationFormat,
    Encoded,
    FrameNoise,
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
    Seed,
    parse_latent_list,
    parse_layers,
)
from styleray.serve.projection_routes import PROJECTION_ROUTES

PUBLIC_HEADERS = ["X-Model", "X-Checkpoint", "X-Replica", "X-Seed", "X-Batch-Size", "X-Frames", "X-Images", "X-Grid"]
SEEDS_HELP = "comma-separated seeds, each an integer in [0, %d] (digits 0-9), or proj:ID (a projection)" % MAX_SEED
LATENT_CHARS = 18  # the longest latent reference, proj: and 12 characters, and its comma
MAX_NAME_CHARS = 200  # a model name is at most 64 characters; longer ones get the 404 that lists the names


def image_response(enc: Encoded, filename: str) -> Response:
    headers = {
        "X-Checkpoint": enc.checkpoint,
        "Content-Disposition": f'inline; filename="{filename}"',
        "Cache-Control": "no-cache",
        "Access-Control-Expose-Headers": ", ".join(PUBLIC_HEADERS),
        **enc.headers,
    }
    return Response(content=enc.data, media_type=enc.media_type, headers=headers)


# Shared query parameters.
def truncation_query():
    lo, hi = TRUNCATION_RANGE
    return Query(1.0, ge=lo, le=hi, description=f"truncation psi in [{lo}, {hi}]: 1 = none, 0.7 = safer samples")


def class_query():
    return Query(None, alias="class", ge=0, description="class index (conditional models only)")


def model_query():
    return Query(None, max_length=MAX_NAME_CHARS,
                 description="the model, by name (GET /v1/models lists them); default: the only or the first")


def quality_query():
    lo, hi = QUALITY_RANGE
    return Query(90, ge=lo, le=hi, description="JPEG/WebP quality; 100 = lossless WebP")


def add_page(api: FastAPI, backend, key: ApiKey) -> None:
    page = resources.files("styleray.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": page_csp(page)}

    @api.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)


def add_docs(api: FastAPI, backend, key: ApiKey) -> None:
    rendered: list[str] = []  # built on first use, once every route is registered

    @api.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if not rendered:
            rendered.append(render_docs(api.openapi()))
        return HTMLResponse(rendered[0], headers={"Content-Security-Policy": page_csp(rendered[0])})


def add_healthz(api: FastAPI, backend, key: ApiKey) -> None:
    @api.get("/healthz", summary="Liveness: a sampler replica answers; 'degraded' when one serves a fallback")
    async def healthz():
        status, body = await backend.health()
        return JSONResponse(body, status_code=status)


def add_models(api: FastAPI, backend, key: ApiKey) -> None:
    @api.get("/v1/models", summary="Every model served, by name: resolution, classes, kimg, the checkpoint it "
             "serves (best.json's choice or the newest), FID/KID when recorded, status")
    async def models():
        return await backend.models()


def add_info(api: FastAPI, backend, key: ApiKey) -> None:
    @api.get("/v1/info", summary="One model: resolution, classes, kimg, checkpoint, fallback, limits (loads it)")
    async def info(model: str | None = model_query()):
        return await backend.call("info", model=model)


def add_sample(api: FastAPI, backend, key: ApiKey) -> None:
    @api.get(
        "/v1/sample",
        summary="One image from a seed",
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
    )
    async def sample(
        seed: Annotated[Seed, Query(description=f"integer in [0, {MAX_SEED}] (digits 0-9)")],
        truncation: float = truncation_query(),
        class_idx: int | None = class_query(),
        noise: NoiseMode = Query("const", description="const: the trained noise maps; random: seeded by the seed"),
        format: ImageFormat = Query("png"),
        quality: int = quality_query(),
        model: str | None = model_query(),
    ):
        req = SampleRequest(seed, Sampling(float(truncation), class_idx, noise), format, quality)
        return image_response(await backend.call("sample", req, model=model), f"seed{seed}.{format}")


def add_samples(api: FastAPI, backend, key: ApiKey) -> None:
    @api.post(
        "/v1/samples",
        summary="A grid PNG (or a zip of PNGs) for a list of seeds",
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "application/zip": {}}}},
    )
    async def samples(body: SamplesBody = Body(...), model: str | None = model_query()):
        return image_response(await backend.call("grid", body.to_request(), model=model), f"samples.{body.format}")


def add_morph(api: FastAPI, backend, key: ApiKey) -> None:
    @api.get(
        "/v1/morph",
        summary="An animation through the seeds or projected images (linear in W, spherical in Z for seeds)",
        response_class=Response,
        responses={200: {"content": {"image/gif": {}, "image/webp": {}}}},
    )
    async def morph(
        seeds: str | None = Query(None, max_length=MAX_SEEDS * LATENT_CHARS,
                                  description="2 or more " + SEEDS_HELP + ": 3,17,42"),
        from_: str | None = Query(None, alias="from", max_length=LATENT_CHARS,
                                  description="instead of seeds: where the morph starts, 42, seed:42 or proj:ID"),
        to: str | None = Query(None, max_length=LATENT_CHARS, description="with from: where the morph ends"),
        steps: int = Query(30, ge=1, le=MAX_STEPS, description="frames from one seed to the next"),
        space: LatentSpace = Query("w", description="w: linear in W; z: spherical in Z"),
        fps: int = Query(24, ge=FPS_RANGE[0], le=FPS_RANGE[1]),
        loop: bool = Query(False, description="morph back from the last seed to the first"),
        truncation: float = truncation_query(),
        class_idx: int | None = class_query(),
        noise: FrameNoise = Query("const", description="const or none (random noise would flicker)"),
        format: AnimationFormat = Query("gif"),
        quality: int = quality_query(),
        model: str | None = model_query(),
    ):
        seed_list = morph_latents(seeds, from_, to)
        sampling = Sampling(float(truncation), class_idx, noise)
        req = MorphRequest(tuple(seed_list), steps, space, loop, fps, sampling, format, quality)
        check_frames(req)
        enc = await backend.call("morph", req, model=model)
        names = "-".join(str(s).replace("proj:", "p") for s in seed_list[:8])
        return image_response(enc, f"morph-{names}.{format}")


def morph_latents(seeds: str | None, from_: str | None, to: str | None) -> list:
    """The morph's latents: ``seeds`` (2 or more), or ``from`` and ``to`` (one each)."""
    if from_ is not None or to is not None:
        if seeds is not None or from_ is None or to is None:
            raise InvalidRequest("give either seeds=A,B,... or both from= and to=, e.g. from=proj:ID&to=seed:42")
        return parse_latent_list(f"{from_},{to}", "from/to", 2, 2)
    if seeds is None:
        raise InvalidRequest("seeds: give 2 or more comma-separated seeds (seeds=3,17,42), or from= and to=")
    return parse_latent_list(seeds, "seeds", MAX_SEEDS, min_count=2)


def check_frames(req: MorphRequest) -> None:
    if req.frames > MAX_FRAMES:
        n = len(req.seeds)
        most = MAX_FRAMES // n if req.loop else (MAX_FRAMES - 1) // (n - 1)
        raise InvalidRequest(
            f"{n} seeds x steps={req.steps} make {req.frames} frames; at most {MAX_FRAMES} "
            f"(use steps <= {max(most, 1)} or fewer seeds)"
        )


def add_mix(api: FastAPI, backend, key: ApiKey) -> None:
    @api.get(
        "/v1/mix",
        summary="Style-mixing grid: column seeds' styles on the given layers over row seeds",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def mix(
        rows: str = Query(..., max_length=MAX_MIX_SIDE * LATENT_CHARS,
                          description=f"1-{MAX_MIX_SIDE} {SEEDS_HELP}: 1,2,3"),
        cols: str = Query(..., max_length=MAX_MIX_SIDE * LATENT_CHARS, description=f"1-{MAX_MIX_SIDE} {SEEDS_HELP}"),
        layers: str | None = Query(None, max_length=200, description="w layers from the column seeds: 0-5 (default: coarse)"),
        truncation: float = truncation_query(),
        class_idx: int | None = class_query(),
        noise: FrameNoise = Query("const", description="const or none (random noise is seeded per sample)"),
        model: str | None = model_query(),
    ):
        req = MixRequest(
            rows=tuple(parse_latent_list(rows, "rows", MAX_MIX_SIDE)),
            cols=tuple(parse_latent_list(cols, "cols", MAX_MIX_SIDE)),
            layers=tuple(l) if (l := parse_layers(layers)) is not None else None,
            sampling=Sampling(float(truncation), class_idx, noise),
        )
        return image_response(await backend.call("mix", req, model=model), "mix.png")


def add_reload(api: FastAPI, backend, key: ApiKey) -> None:
    @api.post(
        "/v1/reload",
        summary="Build, test and publish a checkpoint for a model; every replica holding it switches without "
        "dropping requests (X-API-Key header)",
        dependencies=[Depends(reload_key_dependency(key))],
    )
    async def reload(body: ReloadBody | None = Body(None), model: str | None = model_query()):
        body = body or ReloadBody()
        status, result = await backend.reload(model, body.checkpoint, body.wait_s)
        return JSONResponse(result, status_code=status)


ROUTES = (add_page, add_docs, add_healthz, add_models, add_info, add_sample, add_samples, add_morph, add_mix, add_reload,
          *PROJECTION_ROUTES)
