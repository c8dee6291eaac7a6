"""Reload under attack, for real: a Serve app on 127.0.0.1 over local run folders, sampler replica processes
killed with SIGKILL. A failed reload publishes nothing, so a restarted replica comes back serving; a target
that a replica cannot build (published, then lost) makes it fall back to the last good checkpoint and say so
in /v1/info and /healthz; reload reads only allowed sources, capped in size, and shows no server paths."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from serve_helpers import make_broken_checkpoint, make_checkpoint, running_app, until

KEY = "reload-key-71c2"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
RECOVERY_S = 60.0  # the bar: the service answers 200 within a minute of losing its replica


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("reload-http")
    runs = base / "runs"
    make_checkpoint(str(runs / "r1"), seed=0, cur_nimg=1000)
    make_checkpoint(str(runs / "r2"), seed=1, cur_nimg=2000)
    make_broken_checkpoint(str(runs / "broken"), 3000, "unbuildable")
    make_checkpoint(str(base / "outside" / "r9"), seed=2, cur_nimg=500)
    huge = make_checkpoint(str(runs / "huge"), seed=3, cur_nimg=100)
    os.truncate(os.path.join(huge, "state.pt"), 3 * 2**30)  # sparse: 3 GiB that were never written
    return base


@pytest.fixture(scope="module")
def server(runs):
    from styleray.serve.args import ServeArgs

    args = ServeArgs(checkpoint=str(runs / "runs" / "r1"), cpus_per_replica=0.5, api_key=KEY, reload_poll_s=0.5)
    with running_app(args) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers={"X-API-Key": KEY}, timeout=60) as c:
        yield c


def kill_sampler_replica() -> int:
    """SIGKILL the process of the (one) live Sampler replica of this test's cluster; its pid. The cluster's
    processes descend from this one (ray.init started them), and Ray titles a replica's process after it."""
    import psutil

    def is_sampler(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE and "ServeReplica:styleray:Sampler" in " ".join(p.cmdline())
        except psutil.Error:
            return False

    (replica,) = [p for p in psutil.Process().children(recursive=True) if is_sampler(p)]
    os.kill(replica.pid, signal.SIGKILL)
    return replica.pid


def until_sample_answers(client, deadline_s: float) -> tuple[httpx.Response, list[int], float]:
    """Poll GET /v1/sample until a 200 (or the deadline): (the answer, the codes before it, seconds taken)."""
    started = time.monotonic()
    codes = []
    while True:
        try:
            r = client.get("/v1/sample", params={"seed": 5, "class": 0}, timeout=10)
        except httpx.HTTPError:
            codes.append(0)  # no answer within 10 s
        else:
            if r.status_code == 200:
                return r, codes, time.monotonic() - started
            codes.append(r.status_code)
        assert time.monotonic() - started < deadline_s, f"no 200 within {deadline_s} s: {codes[-10:]}"
        time.sleep(0.25)


def test_reload_reads_only_allowed_sources_and_shows_no_server_paths(client, runs):
    refused = {
        "http://127.0.0.1:9/ckpt": "the http:// scheme is not allowed",
        str(runs / "outside" / "r9"): "outside the folders reload may read",
        "../outside/r9": "outside the folders reload may read",
        "nowhere": "neither a checkpoint folder",
        "huge": "state.pt is 3072.0 MiB, over the 2048.0 MiB cap",
    }
    for target, words in refused.items():
        started = time.monotonic()
        r = client.post("/v1/reload", json={"checkpoint": target})
        assert r.status_code == 422 and words in r.json()["error"], (target, r.text)
        assert str(runs / "runs") not in r.text, r.text  # the client's own words, never the server's paths
        assert time.monotonic() - started < 30  # the 3 GiB file was refused by its size, not read
    assert client.get("/v1/info").json()["version"] == 0


def test_failed_reload_publishes_nothing_and_a_killed_replica_comes_back(client, runs):
    """The outage: a checkpoint whose weights load but whose network cannot be built used to stay published;
    every restarted replica crashed on it (9.5 minutes of 503s). Now the reload is refused and nothing changes."""
    before = client.get("/v1/sample", params={"seed": 5, "class": 0})
    r = client.post("/v1/reload", json={"checkpoint": "broken"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert "broken/checkpoints/ckpt-000000003000: cannot build the generator" in body["error"]
    assert body["published"] == "r1/checkpoints/ckpt-000000001000" and body["version"] == 0
    assert str(runs) not in r.text
    info = client.get("/v1/info").json()
    assert (info["checkpoint"], info["version"], info["fallback"]) == ("ckpt-000000001000", 0, None)

    kill_sampler_replica()
    answer, codes, took = until_sample_answers(client, RECOVERY_S)
    assert answer.headers["X-Checkpoint"] == "ckpt-000000001000" and answer.content == before.content
    assert all(code in (0, 503) for code in codes), codes  # while it restarts: 503 with a reason, never 500
    print(f"replica killed -> 200 after {took:.1f} s ({len(codes)} failed polls: {sorted(set(codes))})")
    assert client.get("/healthz").json()["status"] == "ok"


def test_a_replica_that_cannot_build_the_published_target_falls_back(client, runs):
    """A published target can still become unbuildable for a replica (a node that cannot read it, a file
    replaced after the trial). Simulated by publishing straight into the real registry. The replica keeps
    its model, then, killed and restarted, starts on the newest good checkpoint; both say so."""
    from ray import serve

    r = client.post("/v1/reload", json={"checkpoint": "r2"})
    assert r.status_code == 200 and r.json()["checkpoint"] == "ckpt-000000002000", r.text
    registry = serve.get_deployment_handle("CheckpointRegistry", app_name="styleray")
    bad = str(runs / "runs" / "broken" / "checkpoints" / "ckpt-000000003000")
    registry.publish.remote("r1", bad).result()

    health = until(lambda: (h := client.get("/healthz").json())["status"] == "degraded" and h, 30, "degraded")
    (error,) = health["fallback"].values()
    assert "cannot build the generator" in error and str(runs) not in str(health)
    info = client.get("/v1/info").json()
    assert info["checkpoint"] == "ckpt-000000002000"
    assert info["fallback"]["wanted"] == "broken/checkpoints/ckpt-000000003000"

    kill_sampler_replica()
    answer, codes, took = until_sample_answers(client, RECOVERY_S)
    assert answer.headers["X-Checkpoint"] == "ckpt-000000002000"  # the newest good one, not the first
    assert all(code in (0, 503) for code in codes), codes
    print(f"replica killed with an unbuildable target published -> 200 after {took:.1f} s")
    info = until(lambda: (i := client.get("/v1/info").json())["fallback"] and i, 30, "the fallback in /v1/info")
    assert info["checkpoint"] == "ckpt-000000002000" and "cannot build" in info["fallback"]["error"]
    assert client.get("/healthz").json()["status"] == "degraded"

    r = client.post("/v1/reload", json={"checkpoint": "r1"})  # an operator fixes it with a good reload
    assert r.status_code == 200 and r.json()["checkpoint"] == "ckpt-000000001000", r.text
    health = until(lambda: (h := client.get("/healthz").json())["status"] == "ok" and h, 30, "ok again")
    assert health["fallback"] is None and client.get("/v1/info").json()["fallback"] is None
