"""Many models from one endpoint, for real: a Serve application on 127.0.0.1 watching a folder of runs (one
sampler replica holding at most 2 models), httpx, the page in headless chromium, and a second, autoscaled
application on the same cluster. One cluster for the module; the tests share the running application and run
in file order (later ones add runs and checkpoints)."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import threading
import time

import httpx
import numpy as np
import pytest
from serve_helpers import browser_page, decode, free_port, make_checkpoint, until

from styleray.models import sampling
from styleray.platform.checkpoint import load_generator
from styleray.platform.served import served_as

KEY = "models-key-5e1b"
RES = 16
SCAN_S = 1.0  # the application's scan interval: a new run is servable within it (plus a poll)
DEADLINE_S = 30.0  # what the tests allow for that, on a shared 2-core machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """ROOT: runs a and b (different weights), broken (a committed checkpoint whose state.pt is corrupt),
    old/a (a second run named a), half (a checkpoint being written: no meta.json yet)."""
    root = tmp_path_factory.mktemp("models") / "runs"
    make_checkpoint(str(root / "a"), seed=0, cur_nimg=1000, resolution=RES, c_dim=0)
    make_checkpoint(str(root / "b"), seed=1, cur_nimg=1000, resolution=RES, c_dim=0)
    bad = make_checkpoint(str(root / "broken"), seed=2, cur_nimg=1000, resolution=RES, c_dim=0)
    with open(os.path.join(bad, "state.pt"), "r+b") as f:
        f.seek(100)
        f.write(b"corrupt!")
    make_checkpoint(str(root / "old" / "a"), seed=3, cur_nimg=500, resolution=RES, c_dim=0)
    half = make_checkpoint(str(root / "half"), seed=4, cur_nimg=1000, resolution=RES, c_dim=0)
    os.remove(os.path.join(half, "meta.json"))
    return root


@pytest.fixture(scope="module")
def cluster():
    """A private Ray cluster and Serve on 127.0.0.1. Autoscaling metrics are pushed every second instead of
    every 10 (Ray's settings, read by the processes ray.init starts), so the scaling test takes seconds."""
    import ray
    from ray import serve

    env = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def server(cluster, root):
    from ray import serve

    from styleray.serve.app import build_app
    from styleray.serve.args import ServeArgs

    args = ServeArgs(runs=str(root), models_per_replica=2, scan_interval_s=SCAN_S, reload_poll_s=0.5,
                     cpus_per_replica=0.5, api_key=KEY, max_running_projections=1)
    serve.run(build_app(args), name="styleray", route_prefix="/")
    return cluster


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers={"X-API-Key": KEY}, timeout=120) as c:
        yield c


def sample(client, model: str | None, seed: int = 5, **params) -> httpx.Response:
    params = {"seed": seed, **params, **({"model": model} if model else {})}
    return client.get("/v1/sample", params=params)


def local_image(run: str, seed: int) -> np.ndarray:
    return sampling.generate_images(load_generator(run)[0], [seed])[0]


def models(client) -> dict[str, dict]:
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    return {m["name"]: m for m in r.json()["models"]}


# -- names ------------------------------------------------------------------------------------------------


def test_models_are_listed_by_name_with_what_they_serve(client, root):
    listed = models(client)
    assert set(listed) == {"a", "b", "broken", "old.a"}  # half is still being written: not listed
    a = listed["a"]
    assert a["default"] and a["origin"] == "runs" and a["follows_run"] and a["run"] == "a"
    assert (a["checkpoint"], a["chosen_by"], a["kimg"], a["resolution"], a["classes"]) == \
        ("ckpt-000000001000", "newest", 1.0, RES, 0)
    assert a["checkpoint_uri"] == "a/checkpoints/ckpt-000000001000" and a["fid"] is None
    assert listed["old.a"]["run"] == "old/a" and listed["old.a"]["kimg"] == 0.5
    assert str(root) not in client.get("/v1/models").text  # server paths stay on the server


def test_two_models_by_name_give_their_own_images(client, root):
    a, b = sample(client, "a"), sample(client, "b")
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert (a.headers["X-Model"], b.headers["X-Model"]) == ("a", "b")
    assert a.content != b.content
    np.testing.assert_array_equal(decode(a.content), local_image(str(root / "a"), 5))
    np.testing.assert_array_equal(decode(b.content), local_image(str(root / "b"), 5))
    default = sample(client, None)
    assert default.headers["X-Model"] == "a" and default.content == a.content  # no model= : the first
    info = client.get("/v1/info", params={"model": "b"}).json()
    assert info["model"] == "b" and info["resolution"] == RES and info["models_per_replica"] == 2


def test_batching_never_mixes_models(client):
    """Concurrent samples of two models share batches (X-Batch-Size counts the model's own requests in the
    network call); each answer equals the same request made alone."""
    reqs = [(m, s) for s in range(20, 30) for m in ("a", "b")]
    barrier = threading.Barrier(len(reqs))

    def fire(req):
        barrier.wait()
        return sample(client, req[0], req[1])

    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(fire, reqs))
    assert max(int(r.headers["X-Batch-Size"]) for r in together) > 1
    for (model, seed), r in zip(reqs, together):
        assert r.status_code == 200 and r.headers["X-Model"] == model
        assert r.content == sample(client, model, seed).content, (model, seed)


def test_unknown_model_is_404_listing_the_names(client):
    for name in ["nope", "a/../b", "x" * 100]:
        r = sample(client, name)
        assert r.status_code == 404, r.text
        assert "is not served" in r.json()["error"] and sorted(r.json()["models"]) == ["a", "b", "broken", "old.a"]
    assert sample(client, "x" * 300).status_code == 422  # longer than any name can be: refused by its length
    assert client.get("/v1/info", params={"model": "nope"}).status_code == 404
    r = client.post("/v1/samples", params={"model": "nope"}, json={"seeds": [1, 2]})
    assert r.status_code == 404 and "a, b" in r.json()["error"]


def test_a_corrupt_model_answers_503_while_the_others_serve(client):
    r = sample(client, "broken")
    assert r.status_code == 503, r.text
    assert "model broken cannot be served" in r.json()["error"] and "corrupt" in r.json()["error"]
    assert int(r.headers["retry-after"]) >= 1
    again = sample(client, "broken")  # answered at once from the replica's memory of the failure
    assert again.status_code == 503
    assert sample(client, "a").status_code == 200 and sample(client, "b").status_code == 200
    listed = until(lambda: (m := models(client))["broken"]["status"] == "unavailable" and m, 10, "broken listed")
    assert "corrupt" in listed["broken"]["error"] and listed["a"]["status"] == "ok"
    health = client.get("/healthz").json()
    assert health["status"] == "degraded" and "broken" in health["unavailable"]


def test_a_replica_keeps_k_models_and_evicts_the_least_recently_used(client):
    for name in ("a", "b"):
        assert sample(client, name).status_code == 200
    assert sorted(client.get("/v1/info", params={"model": "b"}).json()["models_here"]) == ["a", "b"]
    assert sample(client, "old.a").status_code == 200  # a is the least recently used: evicted
    assert sorted(client.get("/v1/info", params={"model": "old.a"}).json()["models_here"]) == ["b", "old.a"]
    until(lambda: (m := models(client))["a"]["replicas"] == 0 and m["old.a"]["replicas"] == 1, 10,
          "the registry to forget a on the replica")
    assert sample(client, "a").status_code == 200  # b is now the least recently used
    assert sorted(client.get("/v1/info", params={"model": "a"}).json()["models_here"]) == ["a", "old.a"]


def test_a_run_appearing_under_root_is_served_without_restart(client, root):
    assert sample(client, "c").status_code == 404
    started = time.monotonic()
    make_checkpoint(str(root / "c"), seed=5, cur_nimg=2000, resolution=RES, c_dim=0)
    until(lambda: "c" in models(client), DEADLINE_S, "run c to be listed")
    took = time.monotonic() - started
    r = sample(client, "c")
    assert r.status_code == 200 and r.headers["X-Model"] == "c"
    np.testing.assert_array_equal(decode(r.content), local_image(str(root / "c"), 5))
    print(f"a new run became servable in {took:.1f} s (scan interval {SCAN_S} s)")
    served = until(lambda: (s := served_as(str(root / "c"))) and s.name == "c" and s, 10, "the served-names record")
    assert served.root == str(root) and served.checkpoint == "ckpt-000000002000"
    assert served_as(str(root / "old" / "a")).name == "old.a"


def test_a_better_checkpoint_is_followed(client, root):
    """b gets a newer checkpoint (served within a scan), then a best.json naming the older one (its choice
    wins over the newest)."""
    make_checkpoint(str(root / "b"), seed=6, cur_nimg=3000, resolution=RES, c_dim=0)
    until(lambda: sample(client, "b").headers.get("X-Checkpoint") == "ckpt-000000003000", DEADLINE_S, "b at 3000")
    with open(root / "b" / "best.json", "w") as f:
        json.dump({"checkpoint": "ckpt-000000001000", "criterion": "fid", "value": 9.0}, f)
    until(lambda: sample(client, "b").headers.get("X-Checkpoint") == "ckpt-000000001000", DEADLINE_S, "best.json")
    assert models(client)["b"]["chosen_by"] == "best.json"


def test_reload_of_one_model_needs_the_key_and_leaves_the_others(server, client, root):
    a_before = sample(client, "a").content
    with httpx.Client(base_url=server, timeout=60) as anon:
        assert anon.post("/v1/reload", params={"model": "b"}, json={}).status_code == 401
        basic = anon.post("/v1/reload", params={"model": "b"}, json={}, auth=("viewer", KEY))
        assert basic.status_code == 401  # Basic credentials never reload (CSRF), as for one model
    r = client.post("/v1/reload", params={"model": "b"}, json={"checkpoint": "b/checkpoints/ckpt-000000003000"})
    assert r.status_code == 200 and r.json()["model"] == "b" and r.json()["checkpoint"] == "ckpt-000000003000", r.text
    assert sample(client, "b").headers["X-Checkpoint"] == "ckpt-000000003000"
    assert sample(client, "a").content == a_before
    assert client.post("/v1/reload", params={"model": "nope"}, json={}).status_code == 404


def test_a_projection_belongs_to_the_model_that_made_it(client):
    from styleray.datasets.synthetic import render_figure

    buf = io.BytesIO()
    render_figure(1, size=64, seed=3, background="solid")[0].save(buf, format="PNG")
    r = client.post("/v1/projections", params={"model": "a", "steps": 3}, content=buf.getvalue(),
                    headers={"content-type": "image/png"})
    assert r.status_code == 202, r.text
    pid = r.json()["id"]
    assert r.json()["model"] == "a" and "model=a" in r.json()["links"]["morph_example"]
    until(lambda: client.get(f"/v1/projections/{pid}").json()["status"] == "done", 120, "the projection")
    other = client.get("/v1/morph", params={"from": f"proj:{pid}", "to": "7", "steps": 2, "model": "b"})
    assert other.status_code == 409 and "made with model 'a'" in other.json()["error"], other.text
    mine = client.get("/v1/morph", params={"from": f"proj:{pid}", "to": "7", "steps": 2, "model": "a"})
    assert mine.status_code == 200 and mine.headers["X-Frames"] == "3"


# -- the page in a real browser ---------------------------------------------------------------------------


def test_the_page_switches_models_and_keeps_the_choice_in_the_url(server, tmp_path):
    loaded = ("m => { const imgs = [...document.querySelectorAll('#grid img.sample')]; return imgs.length >= 8 && "
              "imgs.every(i => i.dataset.model === m && i.complete && i.naturalWidth > 0); }")
    with browser_page(KEY) as (page, errors):
        page.goto(server + "/?model=b")
        page.wait_for_function(loaded, arg="b", timeout=60_000)
        assert page.input_value("#model-select") == "b"
        options = page.eval_on_selector_all("#model-select option", "os => os.map(o => o.value)")
        assert sorted(options) == sorted(["a", "b", "broken", "c", "old.a"])
        first_b = page.locator("#grid figure:nth-child(1) img").screenshot()
        page.select_option("#model-select", "a")
        page.wait_for_function(loaded, arg="a", timeout=60_000)
        assert "model=a" in page.url and page.input_value("#model-select") == "a"
        assert page.locator("#grid figure:nth-child(1) img").screenshot() != first_b
        page.reload()  # the URL keeps the choice
        page.wait_for_function(loaded, arg="a", timeout=60_000)
        assert page.input_value("#model-select") == "a"
        page.screenshot(path=str(tmp_path / "page.png"))
        assert not errors, errors


# -- autoscaling: another application on the same cluster -------------------------------------------------


def test_replicas_scale_up_under_load_and_answer_the_same_bytes(cluster, root):
    """min 1, max 2 replicas, 1 request in flight per replica as the target: 8 clients make Ray add a replica,
    which loads the model when requests spill over to it (max_ongoing_requests 2); both answer a seed with the
    same bytes. Without load it goes back to 1 replica."""
    from ray import serve

    from styleray.serve.app import build_app
    from styleray.serve.args import ServeArgs

    args = ServeArgs(models={"a": str(root / "a")}, min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                     upscale_delay_s=0, downscale_delay_s=1, look_back_period_s=2, max_ongoing_requests=2,
                     cpus_per_replica=0.5, max_batch_size=2, scan_interval_s=60)
    serve.run(build_app(args), name="scaling", route_prefix="/scaling")
    try:
        def running() -> int:
            return serve.status().applications["scaling"].deployments["Sampler"].replica_states.get("RUNNING", 0)

        stop = threading.Event()
        answers: dict[str, set[bytes]] = {}

        def load():
            with httpx.Client(base_url=cluster + "/scaling", timeout=60) as c:
                while not stop.is_set():
                    r = c.get("/v1/sample", params={"seed": 11})
                    if r.status_code == 200:
                        answers.setdefault(r.headers["X-Replica"], set()).add(r.content)

        workers = [threading.Thread(target=load) for _ in range(8)]
        for w in workers:
            w.start()
        try:
            until(lambda: running() == 2, 120, "a second replica under load")
            until(lambda: len(answers) == 2, 60, "answers from both replicas")
        finally:
            stop.set()
            for w in workers:
                w.join()
        (one, two) = answers.values()
        assert one == two and len(one) == 1  # the same seed, the same bytes, whichever replica answered
        np.testing.assert_array_equal(decode(next(iter(one))), local_image(str(root / "a"), 11))
        until(lambda: running() == 1, 120, "back to one replica without load")
    finally:
        serve.delete("scaling")
