"""Property-based fuzzing of the real Serve app on 127.0.0.1 (Ray's proxy, the ingress, a sampler replica
running the network): for every route, plausible and hostile inputs alike, the answer is never a 5xx and
every error is JSON with a message. Reload reads local run folders only here (no schemes), so a fuzzed
URI never waits on a network."""

from __future__ import annotations

import httpx
import pytest
from fuzz_helpers import AUTH_HEADERS, assert_not_5xx, get_requests, post_requests
from hypothesis import HealthCheck, given, settings
from serve_helpers import make_broken_checkpoint, make_checkpoint, running_app

KEY = "fuzz-key-9d0e"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
FUZZ = settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from styleray.serve.args import ServeArgs

    runs = tmp_path_factory.mktemp("fuzz") / "runs"
    make_checkpoint(str(runs / "r1"), seed=0, cur_nimg=1000)
    make_broken_checkpoint(str(runs / "broken"), 2000, "unbuildable")
    args = ServeArgs(checkpoint=str(runs / "r1"), cpus_per_replica=0.5, api_key=KEY, reload_schemes=(),
                     reload_poll_s=0.5, max_requests_per_client=64)
    with running_app(args) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@FUZZ
@given(req=get_requests(), auth=AUTH_HEADERS)
def test_get_routes_never_5xx(client, req, auth):
    path, params = req
    headers = auth or {"X-API-Key": KEY}  # mostly authorised, so the inputs reach the routes and the model
    assert_not_5xx(client.get(path, params=params, headers=headers), (path, params, headers))


@FUZZ
@given(req=post_requests(), auth=AUTH_HEADERS)
def test_post_routes_never_5xx(client, req, auth):
    path, body, headers = req
    headers = {**headers, **(auth or {"X-API-Key": KEY})}
    assert_not_5xx(client.post(path, content=body, headers=headers), (path, body, headers))
    assert client.get("/healthz", headers={"X-API-Key": KEY}).json()["status"] == "ok"  # nothing broke it
