"""Hypothesis strategies for requests to every route: plausible values (to reach the model) mixed with hostile
ones (other scripts' digits, superscripts, NaN, huge numbers, wrong types, malformed auth, raw bytes)."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import strategies as st

MAX_SEED = 2**32 - 1

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24)
TRICKY = st.sampled_from([
    "", " ", "\u00b2", "\u0661", "\uff17", "1\u00b3", "-1", "1.5", "1e3", "0x1f", "1_0", "nan", "-inf", "Infinity",
    ",", "1,,2", "1-", "5-2", "0-63", "0-64", "9" * 30, str(MAX_SEED), str(MAX_SEED + 1), "true", "null", "1,2,3",
])
NUMBER_TEXT = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
HOSTILE = st.one_of(TEXT, TRICKY, NUMBER_TEXT)
SEED_LIST = st.lists(st.integers(-2, MAX_SEED + 2), min_size=0, max_size=70).map(lambda xs: ",".join(map(str, xs)))
SMALL_SEED_LIST = st.lists(st.integers(0, 1000), min_size=1, max_size=9).map(lambda xs: ",".join(map(str, xs)))

PLAUSIBLE: dict[str, Any] = {
    "seed": st.integers(-1, MAX_SEED + 1).map(str),
    "seeds": st.one_of(SMALL_SEED_LIST, SEED_LIST),
    "rows": SMALL_SEED_LIST,
    "cols": SMALL_SEED_LIST,
    "layers": st.sampled_from(["0-3", "0", "5-7", "0-1,6", "7", "8", "0-63"]),
    "truncation": st.floats(-3, 3).map(str),
    "class": st.integers(-1, 4).map(str),
    "noise": st.sampled_from(["const", "random", "none", "loud"]),
    "format": st.sampled_from(["png", "jpeg", "webp", "gif", "zip", "bmp"]),
    "quality": st.integers(-1, 101).map(str),
    "steps": st.integers(0, 130).map(str),
    "fps": st.integers(0, 51).map(str),
    "space": st.sampled_from(["w", "z", "q"]),
    "loop": st.sampled_from(["true", "false", "1", "maybe"]),
}
GET_ROUTES = {
    "/v1/sample": ["seed", "truncation", "class", "noise", "format", "quality"],
    "/v1/morph": ["seeds", "steps", "space", "fps", "loop", "truncation", "class", "noise", "format", "quality"],
    "/v1/mix": ["rows", "cols", "layers", "truncation", "class", "noise"],
    "/v1/info": [],
    "/healthz": [],
    "/docs": [],
    "/openapi.json": [],
    "/": [],
}


@st.composite
def get_requests(draw) -> tuple[str, dict[str, str]]:
    """(path, query parameters) for a GET route; mostly the route's own parameters, sometimes others."""
    path = draw(st.sampled_from(sorted(GET_ROUTES)))
    names = draw(st.lists(st.sampled_from(GET_ROUTES[path] + ["bogus", "seed"]), unique=True, max_size=8))
    return path, {n: draw(st.one_of(PLAUSIBLE.get(n, HOSTILE), HOSTILE)) for n in names}


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | TEXT | TRICKY,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=8,
)
SAMPLES_BODY = st.fixed_dictionaries(
    {"seeds": st.one_of(st.lists(st.one_of(st.integers(-2, MAX_SEED + 2), JSON_VALUE), min_size=0, max_size=8), JSON_VALUE)},
    optional={
        "truncation": st.one_of(st.floats(-3, 3), st.just(float("nan")), JSON_VALUE),
        "class": st.one_of(st.integers(-1, 4), JSON_VALUE),
        "noise": st.one_of(st.sampled_from(["const", "random", "none"]), JSON_VALUE),
        "format": st.one_of(st.sampled_from(["png", "zip", "gif"]), JSON_VALUE),
        "cols": st.one_of(st.integers(-1, 70), JSON_VALUE),
        "pad": st.one_of(st.integers(-1, 20), JSON_VALUE),
        "bogus": JSON_VALUE,
    },
)
RELOAD_BODY = st.fixed_dictionaries(
    {},
    optional={
        "checkpoint": st.one_of(TEXT, TRICKY, st.sampled_from(["..", "../..", "/etc", "r1/..", "nowhere", "http://x/y",
                                                               "file:///etc", "\x00"]), JSON_VALUE),
        "wait_s": st.one_of(st.floats(-1, 5), st.just(float("inf")), JSON_VALUE),
    },
)
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", "", "application/vnd+json"])


@st.composite
def post_requests(draw) -> tuple[str, bytes, dict[str, str]]:
    """(path, raw body, headers) for the POST routes: JSON (with NaN/Infinity, as Python writes them) or bytes."""
    path = draw(st.sampled_from(["/v1/samples", "/v1/reload", "/v1/sample"]))
    if draw(st.booleans()):
        body = json.dumps(draw(SAMPLES_BODY if path != "/v1/reload" else RELOAD_BODY), allow_nan=True).encode()
    else:
        body = draw(st.binary(max_size=200))
    ctype = draw(CONTENT_TYPES)
    return path, body, {"content-type": ctype} if ctype else {}


def _sendable(value: bytes) -> bool:
    """What an HTTP client (h11's field-value rule) can send as a header value at all: no NUL, no whitespace
    but single spaces and tabs between other bytes. Control characters such as \x01 are sendable."""
    return re.fullmatch(rb"([^\x00\s]+([ \t]+[^\x00\s]+)*)?", value) is not None


HEADER_BYTES = st.one_of(st.binary(max_size=40), TEXT.map(lambda t: t.encode("utf-8")))
AUTH_HEADERS = st.one_of(
    st.just({}),
    HEADER_BYTES.map(lambda b: b"Basic " + b).filter(_sendable).map(lambda v: {"Authorization": v}),
    HEADER_BYTES.filter(_sendable).map(lambda v: {"Authorization": v}),
    HEADER_BYTES.filter(_sendable).map(lambda v: {"X-API-Key": v}),
)


def assert_not_5xx(r, request: Any) -> None:
    """Never a 5xx for any input; every error from the app is JSON with a message. (Ray's HTTP proxy refuses
    some malformed requests itself, e.g. control characters in a header, with a plain-text 400 before the app
    sees them; those lack the app's security headers.)"""
    assert r.status_code < 500, (request, r.status_code, r.text[:500])
    from_app = "x-content-type-options" in r.headers
    if r.status_code >= 400 and (from_app or r.status_code != 400):
        assert r.headers["content-type"].startswith("application/json"), (request, r.headers["content-type"])
        assert r.json()["error"], (request, r.text[:500])
