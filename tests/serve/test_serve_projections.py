"""Projections against a real Serve application on 127.0.0.1: start, poll, the latent and reconstruction, a
morph from the projection, bounded work (429 with Retry-After, eviction), bad uploads as 4xx, a reload to a
checkpoint of another resolution (409), and the page's "upload an image" in headless chromium."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prep_helpers import awkward_files, png_claiming
from serve_helpers import browser_page, decode, frames, free_port, make_checkpoint

from styleray.datasets.synthetic import render_figure
from styleray.models import sampling
from styleray.platform.checkpoint import load_generator

KEY = "test-key-7c1d"
RES = 16
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("projrun")), seed=0, cur_nimg=1000, resolution=RES, c_dim=0)


@pytest.fixture(scope="module")
def server(run_dir):
    import ray
    from ray import serve

    from styleray.serve.app import build_app
    from styleray.serve.args import ServeArgs

    port = free_port()
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ServeArgs(checkpoint=run_dir, cpus_per_replica=0.5, api_key=KEY, reload_poll_s=0.5,
                         max_running_projections=1, projections_kept=3)
        serve.run(build_app(args), name="styleray", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers={"X-API-Key": KEY}, timeout=120) as c:
        yield c


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def hero() -> bytes:
    return png(render_figure(1, size=64, seed=3, background="solid")[0])


def start(client, data: bytes, **params) -> httpx.Response:
    return client.post("/v1/projections", params=params, content=data, headers={"content-type": "image/png"})


def wait_done(client, pid: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = client.get(f"/v1/projections/{pid}").json()
        if record["status"] != "running":
            return record
        time.sleep(0.2)
    raise AssertionError(f"projection {pid} still running after {timeout} s")


def test_start_poll_latent_and_morph_from_the_projection(client, run_dir):
    r = start(client, hero(), steps=400)
    assert r.status_code == 202, r.text
    pid = r.json()["id"]
    assert r.json()["status"] == "running" and r.json()["resolution"] == RES
    busy = start(client, hero(), steps=5)  # the replica's only projection slot is taken
    assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1 and "retry" in busy.json()["error"]
    seen_running = client.get(f"/v1/projections/{pid}").json()
    assert seen_running["status"] == "running" and seen_running["progress"]["steps"] == 400

    record = wait_done(client, pid)
    assert record["status"] == "done", record
    assert record["progress"]["step"] == 400 and record["psnr"] > 10 and record["latent"]["ref"] == f"proj:{pid}"
    target = decode(client.get(f"/v1/projections/{pid}/target.png").content)
    recon = decode(client.get(f"/v1/projections/{pid}/reconstruction.png").content)
    assert target.shape == recon.shape == (RES, RES, 3)

    # The latent alone gives back the reconstruction (the server keeps the model's noise maps).
    G, _ = load_generator(run_dir)
    w = np.load(io.BytesIO(client.get(f"/v1/projections/{pid}/latent.npz").content))["w"]
    assert w.shape == (1, G.num_ws, G.w_dim)
    np.testing.assert_allclose(np.asarray(record["latent"]["w"]), w[0], rtol=1e-6)
    local = sampling.synthesize(G, torch.from_numpy(w))[0]
    assert np.abs(local.astype(int) - recon.astype(int)).max() <= 1

    m = client.get("/v1/morph", params={"from": f"proj:{pid}", "to": "seed:42", "steps": 4, "format": "webp",
                                        "quality": 100})
    assert m.status_code == 200 and m.headers["X-Frames"] == "5", m.text
    fr = frames(m.content)
    assert np.abs(fr[0].astype(int) - recon.astype(int)).max() <= 1  # starts at the reconstruction
    np.testing.assert_array_equal(fr[-1], decode(client.get("/v1/sample", params={"seed": 42}).content))
    mix = client.get("/v1/mix", params={"rows": f"proj:{pid}", "cols": "1,2"})
    assert mix.status_code == 200 and decode(mix.content).shape == (2 * RES, 3 * RES, 3)
    grid = client.post("/v1/samples", json={"seeds": [f"proj:{pid}", 5]})
    assert grid.status_code == 200 and decode(grid.content).shape == (RES, 2 * RES, 3)
    assert client.get("/v1/morph", params={"from": f"proj:{pid}", "to": "1", "space": "z"}).status_code == 422


@pytest.mark.parametrize("name", [n for n, (_, r) in awkward_files().items() if r is None])
def test_awkward_image_modes_are_accepted(client, name):
    """grayscale, 16-bit, CMYK, palette, alpha: decoded and framed like prepare does."""
    r = start(client, awkward_files()[name][0], steps=3)
    assert r.status_code == 202, r.text
    assert wait_done(client, r.json()["id"])["status"] == "done"


BAD = [
    (b"not an image at all" * 10, "image/png", 422, "unreadable"),
    (b"", "image/png", 422, "empty body"),
    (None, "image/png", 422, "truncated"),  # filled in below: half a JPEG
    (png_claiming(60000, 60000), "image/png", 413, "pixels"),
    (png(Image.new("RGB", (5000, 5000))), "image/png", 413, "pixels"),
    (png(Image.new("RGB", (8, 8))), "image/png", 422, "too-small"),
    (b'{"image": 1}', "application/json", 415, "Content-Type"),
]


@pytest.mark.parametrize("body, ctype, status, message", BAD, ids=[b[3] for b in BAD])
def test_bad_uploads_are_4xx_and_the_replica_lives_on(client, body, ctype, status, message):
    if body is None:
        jpeg = awkward_files()["bad/truncated.jpg"][0]
        body = jpeg
    r = client.post("/v1/projections", content=body, headers={"content-type": ctype})
    assert r.status_code == status and message in r.json()["error"], r.text
    assert client.get("/healthz").json()["status"] == "ok"


def test_bad_ids_steps_and_keys(client, server):
    assert client.get("/v1/projections/ffffffffffff").status_code == 404
    assert client.get("/v1/projections/nope").status_code == 404
    r = client.get("/v1/morph", params={"from": "proj:ffffffffffff", "to": "1"})
    assert r.status_code == 404 and "no projection" in r.json()["error"]
    assert start(client, hero(), steps=5000).status_code == 422
    assert start(client, hero(), steps=1500).status_code == 422  # above this server's max_projection_steps
    big = client.post("/v1/projections", content=b"x" * (8 * 1024 * 1024 + 1), headers={"content-type": "image/png"})
    assert big.status_code == 413
    with httpx.Client(base_url=server, timeout=60) as anon:
        assert anon.post("/v1/projections", content=hero(), headers={"content-type": "image/png"}).status_code == 401
        assert anon.get("/v1/projections").status_code == 401


def test_only_the_newest_projections_are_kept(client):
    ids = []
    for _ in range(4):
        r = start(client, hero(), steps=2)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
        wait_done(client, ids[-1])
    listed = [p["id"] for p in client.get("/v1/projections").json()["projections"]]
    assert listed == ids[::-1][:3]
    assert client.get(f"/v1/projections/{ids[0]}").status_code == 404


# -- the web page in a real browser -----------------------------------------------------------------------


def test_page_uploads_an_image_shows_it_converge_and_morphs_it(server, tmp_path):
    image = tmp_path / "hero.png"
    image.write_bytes(hero())
    with browser_page(KEY) as (page, errors):
        page.goto(server + "/")
        page.wait_for_function("() => document.querySelector('#model').textContent.includes('ckpt-')")
        page.set_input_files("#upload", str(image))
        page.fill("#proj-steps", "150")
        page.click("#project-go")
        page.wait_for_selector("#projection[data-state=running]", timeout=30_000)
        page.wait_for_selector("#projection[data-state=done]", timeout=240_000)
        assert "PSNR" in page.inner_text("#projection-status")
        loaded = "(id) => { const i = document.getElementById(id); return i.complete && i.naturalWidth > 0; }"
        page.wait_for_function(f"() => ({loaded})('proj-target') && ({loaded})('proj-recon')", timeout=30_000)
        assert page.eval_on_selector("#proj-recon", "i => i.naturalWidth") == RES
        assert page.eval_on_selector("#proj-progress", "p => p.value === p.max && p.max === 150")
        page.fill("#steps", "6")
        page.fill("#proj-seed", "7")
        page.click("#proj-morph")
        page.wait_for_selector("#morph[data-state=playing]", timeout=60_000)
        assert page.get_attribute("#morph", "data-frames") == "7"
        page.screenshot(path=str(tmp_path / "page.png"))
        assert not errors, errors


# -- last: switching the served model makes old projections unusable (409) --------------------------------


def test_a_projection_made_for_another_resolution_is_refused_after_a_reload(client, run_dir, tmp_path):
    r = start(client, hero(), steps=2)
    pid = r.json()["id"]
    assert wait_done(client, pid)["status"] == "done"
    other = make_checkpoint(str(tmp_path / "run32"), seed=1, cur_nimg=1000, resolution=32, c_dim=0)
    assert client.post("/v1/reload", json={"checkpoint": other}).status_code == 200
    m = client.get("/v1/morph", params={"from": f"proj:{pid}", "to": "3"})
    assert m.status_code == 409 and "project the image again" in m.json()["error"], m.text
