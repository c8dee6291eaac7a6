"""Error bodies: every error is JSON ``{"error": "..."}`` that says what was wrong, never a traceback.

- 422 for requests the API or the model refuses (``RequestValidationError``, ``InvalidRequest``), with the
  offending input echoed as JSON-safe text (a NaN or an infinity from a JSON body is echoed as "nan"/"inf";
  it used to make the error handler itself fail with a 500); an ``InvalidRequest`` subclass may carry its
  own ``status`` (404, 409, 413, 415, 429 with ``retry_after``: ``serve/projections.py``; 404 for an unknown
  model with the names in ``models``, 503 for one that cannot be loaded: ``serve/catalog.py``) and ``extra``
  fields for the body;
- 503 when no sampler replica can take the request right now (``Unavailable``), with ``Retry-After``;
- 4xx of Starlette (404, 405, ...) with their reason;
- 500 for anything else, without detail (the traceback goes to the server log only).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from styleray.serve.schemas import InvalidRequest

log = logging.getLogger("ray.serve")


class Unavailable(RuntimeError):
    """No sampler replica can serve the request now (restarting, overloaded): 503."""


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def install(api: FastAPI) -> None:
    """Register the handlers on ``api``."""
    api.add_exception_handler(RequestValidationError, _validation)
    api.add_exception_handler(InvalidRequest, _invalid)
    api.add_exception_handler(Unavailable, _unavailable)
    api.add_exception_handler(StarletteHTTPException, _http)
    api.add_exception_handler(Exception, _internal)


async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [plain_error(e) for e in exc.errors()[:20]]
    return error(422, summarize(errors), detail=errors)


async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
    response = error(getattr(exc, "status", 422), str(exc), **getattr(exc, "extra", {}))
    if getattr(exc, "retry_after", None) is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def _unavailable(_: Request, exc: Unavailable) -> JSONResponse:
    response = error(503, str(exc))
    response.headers["Retry-After"] = "5"
    return response


async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s %s: %r", request.method, request.url.path, exc)
    return error(500, "internal error; the server log has the details")


def json_safe(value: Any) -> Any:
    """A scalar input as JSON can carry it: non-finite floats as text, long strings cut; None otherwise."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value[:200]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return None


def plain_error(e: dict) -> dict:
    """One pydantic error with only JSON-safe, short fields (the input may be raw bytes or a huge list)."""
    out = {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
           "type": str(e.get("type", ""))}
    value = json_safe(e.get("input"))
    if value is not None:
        out["input"] = value
    return out


def summarize(errors: list[dict]) -> str:
    """Validation errors as one line: 'seed: Input should be a valid integer (got "abc")'."""
    parts = []
    for e in errors[:5]:
        if e.get("type") == "json_invalid":  # loc is ("body", character offset)
            parts.append(f"body: malformed JSON near character {e['loc'][-1]}")
            continue
        loc = [str(p) for p in e.get("loc", ())]
        name = ".".join(loc[1:] if len(loc) > 1 and loc[0] in ("query", "body", "path", "header") else loc)
        got = f" (got {e['input']!r})" if e.get("input") is not None and e.get("type") != "seed" else ""
        parts.append(f"{name or 'request'}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts)
