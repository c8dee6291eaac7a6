"""The HTTP layer without Ray: routes, validation, auth and error bodies over a fake backend; parsing, encoding
and ServeArgs checks. Milliseconds each."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from styleray.serve import encode
from styleray.serve.api import create_api
from styleray.serve.args import ServeArgs
from styleray.serve.schemas import (
    MAX_FRAMES,
    MAX_SEED,
    Encoded,
    InvalidRequest,
    MorphRequest,
    SampleRequest,
    parse_layers,
    parse_seed_list,
)


class FakeBackend:
    """Records what the routes ask for; answers with a 1x1 PNG."""

    def __init__(self):
        self.calls = []
        png = encode.encode_image(np.zeros([1, 1, 3], np.uint8), "png")
        self.answer = Encoded(png, "image/png", "ckpt-x", {"X-Seed": "1"})

    async def call(self, method, request=None):
        self.calls.append((method, request))
        if method == "info":
            return {"resolution": 1}
        if method == "ping":
            return "ckpt-x"
        if getattr(getattr(request, "sampling", None), "class_idx", None) == 99:
            raise InvalidRequest("class=99 is out of range")
        return self.answer

    async def reload(self, checkpoint, wait_s):
        self.calls.append(("reload", checkpoint))
        return 200, {"checkpoint": checkpoint}


def request(app, method, path, **kw):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


@pytest.fixture
def backend():
    return FakeBackend()


def test_routes_build_typed_requests(backend):
    app = create_api(backend, api_key=None)
    r = request(app, "GET", "/v1/sample?seed=7&truncation=0.5&class=2&noise=random&format=webp&quality=100")
    assert r.status_code == 200 and r.headers["X-Checkpoint"] == "ckpt-x"
    method, req = backend.calls[-1]
    assert method == "sample" and req == SampleRequest(7, req.sampling, "webp", 100)
    assert (req.sampling.truncation, req.sampling.class_idx, req.sampling.noise) == (0.5, 2, "random")
    request(app, "GET", "/v1/morph?seeds=1,2,3&steps=5&loop=true&space=z&format=webp")
    method, req = backend.calls[-1]
    assert isinstance(req, MorphRequest) and req.seeds == (1, 2, 3) and req.frames == 15 and req.space == "z"
    request(app, "GET", "/v1/mix?rows=1,2&cols=3&layers=0-2,5")
    assert backend.calls[-1][1].layers == (0, 1, 2, 5)
    r = request(app, "POST", "/v1/samples", json={"seeds": [1, 2], "class": 1, "format": "zip"})
    assert r.status_code == 200 and backend.calls[-1][1].seeds == (1, 2) and backend.calls[-1][1].format == "zip"
    assert request(app, "GET", "/").headers["content-type"].startswith("text/html")


def test_errors_are_json_with_a_reason(backend):
    app = create_api(backend, api_key=None)
    r = request(app, "GET", "/v1/sample?seed=abc")
    assert r.status_code == 422 and r.json()["error"].startswith("seed: Input should be a valid integer")
    r = request(app, "GET", "/v1/sample?seed=1&class=99")  # the model says no
    assert r.status_code == 422 and r.json() == {"error": "class=99 is out of range"}
    r = request(app, "GET", "/v1/morph?seeds=1,2,3&steps=" + str(MAX_FRAMES // 2))  # 241 frames
    assert r.status_code == 422 and "at most" in r.json()["error"] and "steps <=" in r.json()["error"]
    r = request(app, "POST", "/v1/samples", content=b'{"seeds": [1', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"].startswith("body: malformed JSON")
    r = request(app, "POST", "/v1/samples", content=b"\xff\x00" * 10, headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = request(app, "POST", "/v1/samples", content=b"x" * 70_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    r = request(app, "GET", "/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = request(app, "DELETE", "/v1/info")
    assert r.status_code == 405 and r.json()["error"]
    assert all(m != "grid" for m, _ in backend.calls)  # nothing invalid reached the backend


def test_reload_needs_a_configured_key(backend):
    r = request(create_api(backend, api_key=None), "POST", "/v1/reload", json={})
    assert r.status_code == 403 and "API key" in r.json()["error"]
    app = create_api(backend, api_key="s3cret")
    assert request(app, "POST", "/v1/reload", json={}).status_code == 401
    r = request(app, "POST", "/v1/reload", json={"checkpoint": "runs/b"}, headers={"X-API-Key": "s3cret"})
    assert r.status_code == 200 and backend.calls[-1] == ("reload", "runs/b")
    r = request(app, "POST", "/v1/reload", json={"wait_s": -1}, headers={"X-API-Key": "s3cret"})
    assert r.status_code == 422


def test_api_key_header_or_basic_auth(backend):
    app = create_api(backend, api_key="s3cret")
    for path in ["/", "/docs", "/openapi.json", "/healthz", "/v1/info"]:
        r = request(app, "GET", path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
    assert request(app, "GET", "/v1/info", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert request(app, "GET", "/v1/info", headers={"X-API-Key": "s3cret "}).status_code == 401
    basic = base64.b64encode(b"me:s3cret").decode()
    assert request(app, "GET", "/v1/info", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    for bad in ["Basic !!!", "Basic " + base64.b64encode(b"s3cret").decode(), "Bearer s3cret"]:
        assert request(app, "GET", "/v1/info", headers={"Authorization": bad}).status_code == 401


def test_parse_seed_lists_and_layers():
    assert parse_seed_list(" 3, 17,42 ", "seeds") == [3, 17, 42]
    assert parse_seed_list(str(MAX_SEED), "seeds") == [MAX_SEED]
    for bad, match in [("1,,2", "not a seed"), ("-1", "not a seed"), ("1e3", "not a seed"), ("", "at least"),
                       (str(MAX_SEED + 1), "out of range"), (",".join(["1"] * 65), "at most 64")]:
        with pytest.raises(InvalidRequest, match=match):
            parse_seed_list(bad, "seeds")
    assert parse_layers("0-2, 5,1") == [0, 1, 2, 5] and parse_layers(None) is None and parse_layers("") is None
    for bad in ["a", "3-1", "0-64", "1-", "-1"]:
        with pytest.raises(InvalidRequest):
            parse_layers(bad)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("channels", [1, 3])
def test_encode_images(fmt, channels):
    img = (np.arange(16 * 16 * channels) % 256).astype(np.uint8).reshape(16, 16, channels)
    im = Image.open(io.BytesIO(encode.encode_image(img, fmt)))
    assert im.size == (16, 16) and im.format == fmt.upper()
    if fmt == "png":
        np.testing.assert_array_equal(np.asarray(im).reshape(16, 16, channels), img)
    lossless = Image.open(io.BytesIO(encode.encode_image(img, "webp", quality=100)))
    np.testing.assert_array_equal(np.asarray(lossless.convert("RGB" if channels == 3 else "L")).reshape(img.shape), img)


def test_encode_animations_keep_timing():
    frames = [np.full([8, 8, 3], v, np.uint8) for v in (0, 80, 160, 240)]
    for fmt in ("gif", "webp"):
        im = Image.open(io.BytesIO(encode.encode_animation(frames, fmt, fps=20)))
        assert im.n_frames == 4 and im.info["loop"] == 0
        im.seek(2)
        im.load()  # WebP reports a frame's duration once it is decoded
        assert im.info["duration"] == 50
    with pytest.raises(ValueError, match="gif or webp"):
        encode.encode_animation(frames, "png", fps=20)


def test_serve_args_messages():
    assert ServeArgs(checkpoint="runs/r1").autoscaling is None
    assert ServeArgs(checkpoint="r", min_replicas=1, max_replicas=3).autoscaling["max_replicas"] == 3
    for kwargs, match in [
        ({"min_replicas": 1}, "both min_replicas and max_replicas"),
        ({"min_replicas": 4, "max_replicas": 2}, "swap them"),
        ({"device": "cuda"}, "gpus_per_replica > 0"),
        ({"device": "cpu", "gpus_per_replica": 1}, "never uses"),
        ({"max_batch_size": 0}, "greater than or equal to 1"),
        ({"bogus": 1}, "Extra inputs are not permitted"),
    ]:
        with pytest.raises(ValueError, match=match):
            ServeArgs(checkpoint="r", **kwargs)
    assert "s3cret" not in repr(ServeArgs(checkpoint="r", api_key="s3cret"))
