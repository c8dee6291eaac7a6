"""Bounded resources per client, enforced in the ingress before a request reaches a route.

Ray Serve's HTTP proxy (uvicorn inside Ray's proxy actor; Ray 2.60's ``HTTPOptions`` offer only host, port,
root path, ``request_timeout_s``, ``keep_alive_timeout_s`` and TLS files) passes each request to the ingress
replica as soon as its headers are in and streams the body after it. A client that sends headers and then
trickles (or never sends) its body therefore held an ingress slot for as long as it liked; ~515 of them
took all 512 slots. Here:

- ``ClientLimits``: request headers over ``max_header_bytes`` get 431; a client address with
  ``max_requests_per_client`` requests in flight gets 429 for the next one. The address is the TCP peer,
  or, when the peer is one of ``trusted_proxies``, the last untrusted address in ``client_ip_header``.
- ``BodyReader``: a body must arrive completely within ``body_timeout_s`` of the request (408), be at most
  ``max_body_bytes`` (413; ``max_upload_bytes`` for an image uploaded to ``/v1/projections``) and have a
  Content-Length (411); at most ``max_pending_bodies`` requests, all
  clients together, may be sending one at a time (503 beyond). Slow bodies can then hold at most that many
  ingress slots, for at most that long, and requests without a body always find a free one.

What the ingress cannot bound: the proxy reads headers before the ingress sees them (a huge header is
refused here, but only after the proxy has read it), and a connection that sends nothing costs the proxy
a socket. Put a reverse proxy in front for those (README, Security).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from styleray.serve.projections import MAX_UPLOAD_BYTES, UPLOAD_PATH
from styleray.serve.schemas import MAX_BODY_BYTES


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 16 * 1024
    body_timeout_s: float = 10.0
    max_requests_per_client: int = 32
    max_pending_bodies: int = 64
    max_body_bytes: int = MAX_BODY_BYTES
    max_upload_bytes: int = MAX_UPLOAD_BYTES  # the body of POST /v1/projections: an image file
    trusted_proxies: tuple[str, ...] = ()
    client_ip_header: str = "X-Forwarded-For"
    _networks: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        nets = tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies)
        object.__setattr__(self, "_networks", nets)

    def body_limit(self, scope: Scope) -> int:
        """The largest body this request may send."""
        return self.max_upload_bytes if scope.get("path", "").endswith(UPLOAD_PATH) else self.max_body_bytes

    def trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def client_address(self, scope: Scope) -> str:
        """The peer address, or the client a trusted proxy names in ``client_ip_header``."""
        peer = (scope.get("client") or ("unknown", 0))[0]
        if not self._networks or not self.trusted(peer):
            return peer
        values = Headers(scope=scope).getlist(self.client_ip_header)
        hops = [h.strip() for v in values for h in v.split(",") if h.strip()]
        for hop in reversed(hops):  # proxies append: the rightmost untrusted hop is the client
            if not self.trusted(hop):
                return hop[:64]
        return peer


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class ClientLimits:
    """ASGI middleware: header size cap (431) and requests in flight per client address (429)."""

    def __init__(self, app: ASGIApp, limits: HttpLimits):
        self.app = app
        self.limits = limits
        self.in_flight: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = sum(len(k) + len(v) for k, v in scope.get("headers", ())) + len(scope.get("query_string", b""))
        if size > self.limits.max_header_bytes:
            message = f"request headers and query of {size} bytes are larger than {self.limits.max_header_bytes}"
            return await _error(431, message)(scope, receive, send)
        client = self.limits.client_address(scope)
        if self.in_flight[client] >= self.limits.max_requests_per_client:
            message = f"too many requests in flight from {client}: at most {self.limits.max_requests_per_client}"
            return await _error(429, message, **{"Retry-After": "1"})(scope, receive, send)
        self.in_flight[client] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[client] -= 1
            if self.in_flight[client] <= 0:
                del self.in_flight[client]


class BodyReader:
    """ASGI middleware: read a request body completely, within the limits, before the app runs."""

    def __init__(self, app: ASGIApp, limits: HttpLimits):
        self.app = app
        self.limits = limits
        self.pending = 0  # requests reading a body right now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.body_limit(scope)
        problem = self._check_headers(Headers(scope=scope), limit)
        if problem is not None:
            return await problem(scope, receive, send)
        length = int(Headers(scope=scope).get("content-length") or 0)
        if length == 0:
            return await self.app(scope, receive, send)
        if self.pending >= self.limits.max_pending_bodies:
            busy = f"{self.pending} requests are sending a body already; try again in a moment"
            return await _error(503, busy, **{"Retry-After": "1"})(scope, receive, send)
        self.pending += 1
        try:
            body = await self._read(receive, limit)
        finally:
            self.pending -= 1
        if isinstance(body, JSONResponse):
            return await body(scope, receive, send)
        if body is not None:  # None: the client went away
            await self.app(scope, _replay(body, receive), send)

    def _check_headers(self, headers: Headers, limit: int) -> JSONResponse | None:
        length = headers.get("content-length")
        if headers.get("transfer-encoding"):
            return _error(411, "send a Content-Length with the body (no chunked uploads)")
        if length is not None and (not length.isascii() or not length.isdigit()):
            return _error(400, f"Content-Length {length[:40]!r} is not a number of bytes")
        if length is not None and int(length) > limit:
            return _error(413, f"body of {length} bytes is larger than {limit}")
        return None

    async def _read(self, receive: Receive, limit: int) -> bytes | JSONResponse | None:
        deadline = time.monotonic() + self.limits.body_timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return _error(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s")
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return _error(413, f"body larger than {limit} bytes")
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the app expects

    return replay
