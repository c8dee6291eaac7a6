"""The projection routes of the HTTP API (``routes.ROUTES`` adds them), one function each, as in routes.py.

    POST /v1/projections                      the image file as the body -> 202 {"id", "status": "running", ...}
    GET  /v1/projections                      the kept projections, newest first
    GET  /v1/projections/{id}                 status and progress; once done the PSNR and the latent
    GET  /v1/projections/{id}/target.png      the target as the model sees it
    GET  /v1/projections/{id}/reconstruction.png   the latest preview while running, then the result
    GET  /v1/projections/{id}/latent.npz      w [1, num_ws, w_dim] (the key and shape of projected_w.npz)

A finished projection is a latent reference, ``proj:ID``, wherever the API takes a seed (morph, mix, grid).
``backend.call("start_projection", req)`` runs on a sampler replica; ``backend.projections(method, *args)`` reads
the ProjectionStore. The API key, the error bodies and the request limits are the other routes' (``api.py``;
the body of an upload may be ``MAX_UPLOAD_BYTES``, ``limits.py``).
"""

from __future__ import annotations

import io
import json
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from styleray.serve.projections import (
    MAX_UPLOAD_BYTES,
    PROJECTION_STEPS_DEFAULT,
    PROJECTION_STEPS_MAX,
    UPLOAD_PATH,
    PayloadTooLarge,
    ProjectionRequest,
    UnsupportedMedia,
    parse_projection_id,
)
from styleray.serve.schemas import MAX_SEED, InvalidRequest

NOT_IMAGES = ("multipart/", "application/x-www-form-urlencoded", "application/json", "text/")


def _links(pid: str, model: str | None = None) -> dict:
    return {"self": f"v1/projections/{pid}", "target": f"v1/projections/{pid}/target.png",
            "reconstruction": f"v1/projections/{pid}/reconstruction.png", "latent": f"v1/projections/{pid}/latent.npz",
            "morph_example": f"v1/morph?from=proj:{pid}&to=seed:42" + (f"&model={model}" if model else "")}


def _png(data: bytes, name: str) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache",
                                                          "Content-Disposition": f'inline; filename="{name}"'})


def add_projection_start(api: FastAPI, backend: Any, key: Any) -> None:
    @api.post(UPLOAD_PATH, status_code=202, summary="Start projecting an image (the body) into the latent space")
    async def start_projection(
        request: Request,
        steps: int = Query(PROJECTION_STEPS_DEFAULT, ge=1, le=PROJECTION_STEPS_MAX, description="optimisation steps"),
        space: Literal["w", "w+"] = Query("w+", description="w: one w for every layer; w+: one per layer"),
        seed: int = Query(0, ge=0, le=MAX_SEED, description="seed of the search's exploration noise"),
        class_idx: int | None = Query(None, alias="class", ge=0, description="conditional models: the start's class"),
        frame: Literal["auto", "prepare", "resize"] = Query("auto", description="as styleray project --frame"),
        model: str | None = Query(None, max_length=200, description="the model to project into (default: the "
                                  "only or the first); proj:ID is then usable with that model only"),
    ):
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith(NOT_IMAGES):
            raise UnsupportedMedia(f"Content-Type {ctype.split(';')[0]}: send the image file's bytes as the body "
                                   "(e.g. image/png, image/jpeg or application/octet-stream), not a form or JSON")
        body = await request.body()
        if len(body) > MAX_UPLOAD_BYTES:
            raise PayloadTooLarge(f"image of {len(body)} bytes is larger than {MAX_UPLOAD_BYTES}")
        if not body:
            raise InvalidRequest("empty body: send the image file's bytes as the request body")
        req = ProjectionRequest(body, steps, space, seed, class_idx, frame)
        record = await backend.call("start_projection", req, model=model)
        record["links"] = _links(record["id"], record.get("model"))
        return JSONResponse(record, status_code=202, headers={"Location": record["links"]["self"]})


def add_projection_list(api: FastAPI, backend: Any, key: Any) -> None:
    @api.get(UPLOAD_PATH, summary="The kept projections, newest first")
    async def list_projections():
        return {"projections": await backend.projections("list")}


def add_projection_get(api: FastAPI, backend: Any, key: Any) -> None:
    @api.get(UPLOAD_PATH + "/{pid}", summary="A projection's status and progress; once done its PSNR and latent")
    async def get_projection(pid: str):
        record = await backend.projections("get", parse_projection_id(pid))
        return {**record, "links": _links(pid, record.get("model"))}


def add_projection_images(api: FastAPI, backend: Any, key: Any) -> None:
    @api.get(UPLOAD_PATH + "/{pid}/target.png", response_class=Response, summary="The target as the model sees it")
    async def projection_target(pid: str):
        return _png(await backend.projections("image", parse_projection_id(pid), "target"), f"target-{pid}.png")

    @api.get(UPLOAD_PATH + "/{pid}/reconstruction.png", response_class=Response,
             summary="The reconstruction (the latest preview while the projection runs)")
    async def projection_reconstruction(pid: str):
        data = await backend.projections("image", parse_projection_id(pid), "reconstruction")
        return _png(data, f"reconstruction-{pid}.png")


def add_projection_latent(api: FastAPI, backend: Any, key: Any) -> None:
    @api.get(UPLOAD_PATH + "/{pid}/latent.npz", response_class=Response, summary="The latent: w [1, num_ws, w_dim]")
    async def projection_latent(pid: str):
        ws, params = await backend.projections("latent", parse_projection_id(pid))
        buf = io.BytesIO()
        np.savez(buf, w=np.asarray(ws, np.float32)[None], meta=np.array(json.dumps(params, sort_keys=True)))
        return Response(buf.getvalue(), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="projected_w-{pid}.npz"'})


PROJECTION_ROUTES = (add_projection_start, add_projection_list, add_projection_get, add_projection_images,
                     add_projection_latent)
