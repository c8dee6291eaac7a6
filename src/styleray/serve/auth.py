"""The API key: who may use the routes, and who may reload.

When a key is configured every route, the page and ``/docs`` included, needs it, either in the ``X-API-Key``
header or as the password of HTTP Basic auth (so a browser can open the page: it prompts once and then
sends the key with every request the page makes). ``POST /v1/reload`` needs the key in the ``X-API-Key``
header itself: a browser that has cached Basic credentials sends them with a cross-site form POST too, but
it never adds a custom header cross-site without a CORS preflight, which this app does not grant (CSRF).
"""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from styleray.serve.args import DEFAULT_API_KEY_ENV

API_KEY_HEADER = "X-API-Key"


@dataclass(frozen=True)
class ApiKey:
    value: str | None  # None: no key configured (every route but reload is open)
    env: str = DEFAULT_API_KEY_ENV  # the variable it was read from, named in messages


def header_key(headers: Headers) -> str | None:
    return headers.get(API_KEY_HEADER)


def basic_password(headers: Headers) -> str | None:
    """The password of an HTTP Basic ``Authorization`` header; None when absent or malformed."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:  # non-ASCII text, bad base64 and non-UTF-8 credentials are all ValueErrors
        return base64.b64decode(value.strip().encode("ascii"), validate=True).decode("utf-8").partition(":")[2]
    except ValueError:
        return None


def key_matches(given: str | None, key: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode())


class ApiKeyGuard:
    """ASGI middleware: 401 for a request without the key (header or Basic password), when one is set."""

    def __init__(self, app: ASGIApp, key: ApiKey):
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.key.value is not None:
            headers = Headers(scope=scope)
            given = header_key(headers)
            if not key_matches(given if given is not None else basic_password(headers), self.key.value):
                response = JSONResponse(
                    {"error": f"missing or wrong API key: send it in the {API_KEY_HEADER} header"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="styleray", charset="UTF-8"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def reload_key_dependency(key: ApiKey):
    """A FastAPI dependency: the key must be configured and sent in the X-API-Key header itself."""

    async def require_header_key(request: Request) -> None:
        if key.value is None:
            raise HTTPException(403, f"reload is disabled: it needs an API key; start the server with {key.env} set")
        if not key_matches(header_key(request.headers), key.value):
            raise HTTPException(
                401,
                f"reload needs the API key in the {API_KEY_HEADER} header (Basic credentials are not accepted "
                "for reload: a browser would send them with a cross-site request)",
            )

    return require_header_key
