"""The projection routes and latent references without Ray: validation, status codes and error bodies over a fake
backend, and the ProjectionStore's bookkeeping (eviction, conflicts). Milliseconds each."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest

from styleray.serve.api import create_api
from styleray.serve.projection_store import ProjectionStore
from styleray.serve.projections import MAX_UPLOAD_BYTES, Busy, Conflict, NotFound, ProjectionRequest
from styleray.serve.schemas import InvalidRequest, MixRequest, MorphRequest, parse_latent_list, parse_latent_ref

PID = "0123456789ab"


class FakeBackend:
    """Records calls; start_projection answers a running record (or raises what it is told to)."""

    def __init__(self):
        self.calls = []
        self.raise_on_start: Exception | None = None

    async def call(self, method, request=None, model=None):
        self.calls.append((method, request))
        if method == "start_projection":
            if self.raise_on_start is not None:
                raise self.raise_on_start
            return {"id": PID, "status": "running", "progress": {"step": 0, "steps": request.steps}}
        from styleray.serve import encode
        from styleray.serve.schemas import Encoded

        return Encoded(encode.encode_image(np.zeros([1, 1, 3], np.uint8), "png"), "image/png", "ckpt-x", {})

    async def reload(self, model, checkpoint, wait_s):
        return 200, {}

    async def projections(self, method, *args):
        self.calls.append((method, args))
        if args and args[0] != PID:
            raise NotFound(f"no projection {args[0]}")
        if method == "latent":
            return np.ones([6, 4], np.float32), {"checkpoint": "ckpt-x"}
        if method == "image":
            return b"\x89PNG fake"
        return {"id": PID, "status": "done"} if method == "get" else []


def request(app, method, path, **kw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


@pytest.fixture
def backend():
    return FakeBackend()


def test_latent_references():
    assert parse_latent_ref("42", "x") == 42 and parse_latent_ref(" seed:7 ", "x") == 7
    assert parse_latent_ref(f"proj:{PID}", "x") == f"proj:{PID}"
    assert parse_latent_list(f"3,proj:{PID},seed:4", "seeds", 8) == [3, f"proj:{PID}", 4]
    for bad in ("-1", "1.5", "seed:x", "proj:xyz", f"proj:{PID}0", "z:1", "4294967296", ""):
        with pytest.raises(InvalidRequest, match="x: "):
            parse_latent_ref(bad, "x")
    with pytest.raises(InvalidRequest, match="at most 2"):
        parse_latent_list("1,2,3", "rows", 2)


def test_start_a_projection(backend):
    app = create_api(backend, api_key=None)
    r = request(app, "POST", "/v1/projections?steps=50&space=w&seed=3&class=1&frame=resize", content=b"PNGDATA",
                headers={"content-type": "image/png"})
    assert r.status_code == 202 and r.json()["id"] == PID and r.headers["location"] == f"v1/projections/{PID}"
    assert r.json()["links"]["morph_example"] == f"v1/morph?from=proj:{PID}&to=seed:42"
    assert backend.calls[-1] == ("start_projection", ProjectionRequest(b"PNGDATA", 50, "w", 3, 1, "resize"))
    r = request(app, "GET", f"/v1/projections/{PID}")
    assert r.status_code == 200 and r.json()["status"] == "done"
    npz = request(app, "GET", f"/v1/projections/{PID}/latent.npz")
    assert np.load(io.BytesIO(npz.content))["w"].shape == (1, 6, 4)
    assert request(app, "GET", f"/v1/projections/{PID}/target.png").headers["content-type"] == "image/png"


@pytest.mark.parametrize("path, body, ctype, status, message", [
    ("/v1/projections", b"", "image/png", 422, "empty body"),
    ("/v1/projections", b"a=1", "application/x-www-form-urlencoded", 415, "not a form or JSON"),
    ("/v1/projections", b"--x\r\n", "multipart/form-data; boundary=x", 415, "Content-Type multipart/form-data"),
    ("/v1/projections?steps=0", b"x", "image/png", 422, "steps"),
    ("/v1/projections?steps=100000", b"x", "image/png", 422, "steps"),
    ("/v1/projections?space=z", b"x", "image/png", 422, "space"),
    ("/v1/projections?frame=crop", b"x", "image/png", 422, "frame"),
])
def test_bad_uploads_are_4xx(backend, path, body, ctype, status, message):
    r = request(create_api(backend, api_key=None), "POST", path, content=body, headers={"content-type": ctype})
    assert r.status_code == status and message in r.json()["error"], r.text
    assert not [c for c in backend.calls if c[0] == "start_projection"]


def test_too_large_an_upload_is_refused_before_it_is_read(backend):
    app = create_api(backend, api_key=None)
    r = request(app, "POST", "/v1/projections", content=b"x" * (MAX_UPLOAD_BYTES + 1), headers={"content-type": "image/png"})
    assert r.status_code == 413 and str(MAX_UPLOAD_BYTES) in r.json()["error"]
    r = request(app, "POST", "/v1/projections", content=b"x" * 100_000, headers={"content-type": "image/png"})
    assert r.status_code == 202  # images may be larger than JSON bodies (64 KiB)


def test_busy_is_429_with_retry_after_and_the_replicas_statuses_pass_through(backend):
    app = create_api(backend, api_key="k")
    headers = {"content-type": "image/png", "X-API-Key": "k"}
    backend.raise_on_start = Busy("1 projection(s) running", 7)
    r = request(app, "POST", "/v1/projections", content=b"x", headers=headers)
    assert r.status_code == 429 and r.headers["retry-after"] == "7" and "running" in r.json()["error"]
    backend.raise_on_start = InvalidRequest("image: unreadable: not an image")
    assert request(app, "POST", "/v1/projections", content=b"x", headers=headers).status_code == 422
    assert request(app, "POST", "/v1/projections", content=b"x", headers={"content-type": "image/png"}).status_code == 401
    r = request(app, "GET", "/v1/projections/ffffffffffff", headers=headers)
    assert r.status_code == 404 and "no projection" in r.json()["error"]
    r = request(app, "GET", "/v1/projections/../../etc", headers=headers)
    assert r.status_code == 404


def test_morph_and_mix_take_projections(backend):
    app = create_api(backend, api_key=None)
    assert request(app, "GET", f"/v1/morph?from=proj:{PID}&to=seed:42&steps=4").status_code == 200
    req = backend.calls[-1][1]
    assert isinstance(req, MorphRequest) and req.seeds == (f"proj:{PID}", 42)
    assert request(app, "GET", f"/v1/mix?rows=proj:{PID},1&cols=2").status_code == 200
    assert isinstance(backend.calls[-1][1], MixRequest) and backend.calls[-1][1].rows == (f"proj:{PID}", 1)
    r = request(app, "POST", "/v1/samples", json={"seeds": [f"proj:{PID}", 3]})
    assert r.status_code == 200 and backend.calls[-1][1].seeds == (f"proj:{PID}", 3)
    for query in ("from=1", "from=1&to=2&seeds=1,2", "from=proj:xyz&to=1", "from=1,2&to=3", ""):
        r = request(app, "GET", f"/v1/morph?{query}")
        assert r.status_code == 422 and r.json()["error"], query
    assert request(app, "POST", "/v1/samples", json={"seeds": ["proj:nope"]}).status_code == 422


def test_projection_store_keeps_a_bounded_number_and_says_why_a_latent_is_not_there():
    store = ProjectionStore.func_or_class(kept=2)
    store.create("a" * 12, {"steps": 5}, b"t")
    store.create("b" * 12, {"steps": 5}, b"t")
    with pytest.raises(Busy):  # both still running: nothing to evict
        store.create("c" * 12, {"steps": 5}, b"t")
    with pytest.raises(Conflict, match="still running"):
        store.latent("a" * 12)
    with pytest.raises(Conflict, match="no reconstruction yet"):
        store.image("a" * 12, "reconstruction")
    store.progress("a" * 12, {"step": 2, "steps": 5}, b"preview")
    assert store.image("a" * 12, "reconstruction") == b"preview" and store.get("a" * 12)["progress"]["step"] == 2
    store.finish("a" * 12, np.zeros([6, 4], np.float32), b"final", {"psnr": 30.0})
    got = store.get("a" * 12)
    assert got["status"] == "done" and got["latent"]["shape"] == [6, 4] and got["psnr"] == 30.0
    store.fail("b" * 12, "RuntimeError: out of memory")
    with pytest.raises(Conflict, match="failed: RuntimeError"):
        store.latent("b" * 12)
    store.create("c" * 12, {"steps": 5}, b"t")  # evicts the oldest finished one
    with pytest.raises(NotFound, match="evicted"):
        store.get("a" * 12)
    assert [r["id"] for r in store.list()] == ["c" * 12, "b" * 12]
