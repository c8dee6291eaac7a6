"""The ingress's per-client limits as ASGI middleware, without Ray: header size, requests in flight per
client address (and the trusted-proxy header), body read timeout, bodies in flight. Milliseconds each; the
same limits against a real Serve app with real slow sockets are in test_serve_http.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from test_serve_api import FakeBackend

from styleray.serve.api import create_api
from styleray.serve.limits import HttpLimits


class BlockingBackend(FakeBackend):
    """Holds every sample request until released, so requests stay in flight."""

    def __init__(self):
        super().__init__()
        self.release = asyncio.Event()
        self.entered = 0

    async def call(self, method, request=None, model=None):
        if method == "sample":
            self.entered += 1
            await self.release.wait()
        return await super().call(method, request, model)


async def _gather_while_blocked(app, backend, requests: list[dict], held: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        tasks = [asyncio.create_task(c.get("/v1/sample?seed=1", headers=h)) for h in requests]
        for _ in range(500):  # wait (bounded) until the expected requests are held inside the backend
            if backend.entered >= held and sum(t.done() for t in tasks) >= len(tasks) - held:
                break
            await asyncio.sleep(0.01)
        backend.release.set()
        return await asyncio.gather(*tasks)


def test_requests_in_flight_per_client_address():
    backend = BlockingBackend()
    app = create_api(backend, None, limits=HttpLimits(max_requests_per_client=3))
    answers = asyncio.run(_gather_while_blocked(app, backend, [{}] * 5, held=3))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 200, 429, 429], codes
    refused = next(r for r in answers if r.status_code == 429)
    assert "at most 3" in refused.json()["error"] and refused.headers["retry-after"] == "1"


def test_forwarded_client_counts_only_behind_a_trusted_proxy():
    """ASGITransport's peer is 127.0.0.1. Trusted: each forwarded client has its own budget. Not trusted: the
    header is ignored (anyone could send it) and the peer's budget applies."""
    hops = [{"X-Forwarded-For": f"203.0.113.{i}, 10.0.0.1"} for i in range(5)]
    for trusted, expected in [(("127.0.0.1", "10.0.0.0/8"), [200] * 5), ((), [200, 200, 200, 429, 429])]:
        backend = BlockingBackend()
        limits = HttpLimits(max_requests_per_client=3, trusted_proxies=trusted)
        app = create_api(backend, None, limits=limits)
        answers = asyncio.run(_gather_while_blocked(app, backend, hops, held=5 if trusted else 3))
        assert sorted(r.status_code for r in answers) == expected, trusted
    limits = HttpLimits(trusted_proxies=("127.0.0.1", "10.0.0.0/8"))
    scope = {"type": "http", "client": ("127.0.0.1", 5), "headers": [(b"x-forwarded-for", b"198.51.100.7, 10.1.2.3")]}
    assert limits.client_address(scope) == "198.51.100.7"
    assert limits.client_address({**scope, "client": ("192.0.2.9", 5)}) == "192.0.2.9"  # untrusted peer


def test_header_size_cap():
    app = create_api(FakeBackend(), None, limits=HttpLimits(max_header_bytes=4096))
    r = asyncio.run(_request(app, "GET", "/v1/info", headers={"X-Padding": "a" * 5000}))
    assert r.status_code == 431 and "larger than 4096" in r.json()["error"]
    assert asyncio.run(_request(app, "GET", "/v1/info", headers={"X-Padding": "a" * 3000})).status_code == 200
    r = asyncio.run(_request(app, "GET", "/v1/sample?seed=" + "1" * 5000))
    assert r.status_code == 431


async def _request(app, method, path, **kw):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.request(method, path, **kw)


async def _raw(app, body_messages: list[dict], stall: asyncio.Event | None = None, length: int = 100,
               stalled: asyncio.Semaphore | None = None):
    """Drive the ASGI app directly with a body that arrives as given, then stalls until ``stall`` is set
    (releasing ``stalled`` when it starts to)."""
    queue = list(body_messages)
    sent: list[dict] = []

    async def receive():
        if queue:
            return queue.pop(0)
        if stalled is not None:
            stalled.release()
        await (stall or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/samples", "raw_path": b"/v1/samples", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())],
        "client": ("192.0.2.1", 1000), "server": ("t", 80),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    is_json = dict(start["headers"]).get(b"content-type") == b"application/json"
    return start["status"], json.loads(body) if is_json else body


def test_a_body_that_does_not_arrive_times_out():
    backend = FakeBackend()
    app = create_api(backend, None, limits=HttpLimits(body_timeout_s=0.2))
    status, body = asyncio.run(_raw(app, [{"type": "http.request", "body": b'{"seeds"', "more_body": True}]))
    assert status == 408 and "within 0.2 s" in body["error"]
    whole = b'{"seeds": [1, 2]}'
    status, _ = asyncio.run(_raw(app, [{"type": "http.request", "body": whole[:5], "more_body": True},
                                       {"type": "http.request", "body": whole[5:], "more_body": False}], length=len(whole)))
    assert status == 200 and backend.calls[-1][1].seeds == (1, 2)


def test_bodies_in_flight_are_capped():
    backend = FakeBackend()
    app = create_api(backend, None, limits=HttpLimits(body_timeout_s=30, max_pending_bodies=2))

    async def scenario():
        stall, stalled = asyncio.Event(), asyncio.Semaphore(0)
        first = [{"type": "http.request", "body": b"{", "more_body": True}]
        slow = [asyncio.create_task(_raw(app, first, stall, stalled=stalled)) for _ in range(2)]
        for _ in slow:  # both are now inside the body read, waiting for the rest of their body
            await asyncio.wait_for(stalled.acquire(), 10)
        third = await _raw(app, [{"type": "http.request", "body": b"{}", "more_body": False}], length=2)
        stall.set()
        await asyncio.gather(*slow, return_exceptions=True)
        return third

    status, body = asyncio.run(scenario())
    assert status == 503 and "sending a body already" in body["error"]


@pytest.mark.parametrize("headers,status", [
    ({"content-length": "70000"}, 413), ({"content-length": b"\xb9\xb2"}, 400), ({"transfer-encoding": "chunked"}, 411),
])
def test_body_headers_checked_before_reading(headers, status):
    app = create_api(FakeBackend(), None)
    r = asyncio.run(_request(app, "POST", "/v1/samples", content=b"{}", headers={"content-type": "application/json", **headers}))
    assert r.status_code == status and r.json()["error"]
