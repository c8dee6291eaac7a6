"""Every command in README.md is exercised: `styleray ...` lines parse with the real argument parser, curl
lines are answered by the real HTTP API (on a fake generator), and every other command names the test or
script that runs it for real. A new README command that none of these covers fails here."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
from urllib.parse import urlsplit

import numpy as np
import pytest

from styleray import cli
from styleray.settings import TrainSettings, given

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")

# Commands other than `styleray` and `curl`, by their first words -> where they run for real.
COVERED_ELSEWHERE = {
    "make demo": "tests/test_demo.py",  # runs `styleray demo`, the Makefile target's command (checked below)
    "make test": ".ci/run",  # CI runs exactly `make test`
    "ray job submit": "tests/platform/manager/test_job_submit.py",  # and scripts/rehearse-node-loss.sh
    "serve deploy": "tests/serve/test_serve_yaml.py",  # serve.yaml against Ray Serve's schema and the builder
    "scripts/rehearse-node-loss.sh": "tests/test_rehearse_script.py",
}
# Inline (single backquoted) commands in the prose, by their first words -> where they are checked.
INLINE_ELSEWHERE = {
    "ray up": "tests/test_cluster_yaml.py",  # cluster.yaml validated against the autoscaler schema, offline
    "ray dashboard": "tests/test_cluster_yaml.py",
    "ray down": "tests/test_cluster_yaml.py",
    "ray job submit": "tests/platform/manager/test_job_submit.py",
    "serve deploy": "tests/serve/test_serve_yaml.py",
    "make demo": "tests/test_demo.py",
    "make test": ".ci/run",
    "make test-fast": "Makefile",
    "make clean": "Makefile",
    "pip install": "Makefile",
    "ray start": "tests/test_rehearse_script.py",  # scripts/rehearse-node-loss.sh starts its nodes with it
    "ray job stop": "tests/platform/manager/test_manager_control.py",  # a STOPPED job is resumed by the manager
}


def _readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def code_block_commands(text: str) -> list[str]:
    """Command lines of the ```bash / ```sh blocks (continuation lines joined); bare ``` blocks are diagrams."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text, flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def inline_commands(text: str) -> list[str]:
    """Single-backquoted spans in the prose that start like a command."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    spans = re.findall(r"`([^`\n]+)`", prose)
    starts = ("styleray ", "ray ", "serve ", "make ", "curl ", "pip ", "scripts/")
    return [s.strip() for s in spans if s.startswith(starts)]


def words(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def _covered(argv: list[str], table: dict[str, str]) -> str | None:
    for prefix, where in table.items():
        if argv[: len(prefix.split())] == prefix.split():
            return where
    return None


def _parse_styleray(argv: list[str]) -> None:
    """Parse with the real parser (SystemExit = a README command that does not parse); `queue add` also
    checks the train settings it records."""
    assert argv[0] == "styleray"
    try:
        args = cli.build_parser().parse_args(argv[1:])
    except SystemExit as e:
        raise AssertionError(f"README command does not parse: {' '.join(argv)}") from e
    if argv[1:3] == ["queue", "add"]:  # its train settings are kept as text, to be recorded: check them here
        assert not args.unknown_flags, f"README command has unknown flags {args.unknown_flags}: {' '.join(argv)}"
        TrainSettings.from_mapping({"data": "d", "out": "o", **given(args)}, " ".join(argv))


# -- the tests ---------------------------------------------------------------------------------------------


def test_the_readme_has_commands_to_check():
    commands = code_block_commands(_readme())
    assert sum(c.startswith("styleray ") for c in commands) >= 10
    assert sum(c.startswith("curl ") for c in commands) >= 4


@pytest.mark.parametrize("line", [c for c in code_block_commands(_readme()) if c.startswith("styleray ")])
def test_styleray_commands_parse(line):
    _parse_styleray(words(line))


def test_commands_after_a_double_dash_parse():
    """`ray job submit ... -- styleray train ...`: the part the job runs parses too."""
    found = 0
    for line in code_block_commands(_readme()):
        argv = words(line)
        if "--" in argv and argv[argv.index("--") + 1 :][:1] == ["styleray"]:
            _parse_styleray(argv[argv.index("--") + 1 :])
            found += 1
    assert found >= 1


def test_every_other_command_is_covered_elsewhere():
    for line in code_block_commands(_readme()):
        argv = words(line)
        if argv[0] in ("styleray", "curl"):
            continue
        where = _covered(argv, COVERED_ELSEWHERE)
        assert where, f"README command {line!r} is run by no test: test it and list it in COVERED_ELSEWHERE"
        assert os.path.exists(os.path.join(REPO, where)), f"{where} (covering {line!r}) does not exist"


def test_inline_commands_name_real_subcommands_and_flags():
    """Inline spans are fragments (`styleray prepare --engine local`): their subcommand and flags must exist;
    other inline commands must be covered like the code blocks'."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for span in inline_commands(_readme()):
        argv = words(span)
        if argv[0] != "styleray":
            where = _covered(argv, INLINE_ELSEWHERE)
            assert where, f"README mentions {span!r}, which no test covers: list it in INLINE_ELSEWHERE"
            assert os.path.exists(os.path.join(REPO, where))
            continue
        if len(argv) < 2 or argv[1].startswith("-"):
            continue
        assert argv[1] in subparsers, f"README mentions {span!r}: no subcommand {argv[1]!r}"
        sub = subparsers[argv[1]]
        known = {opt for a in sub._actions for opt in a.option_strings}
        if argv[1] == "queue" and len(argv) > 2:  # queue ACTION --flags: that action's parser
            action = next(a for a in sub._actions if a.dest == "queue_command").choices[argv[2]]
            known = {opt for a in action._actions for opt in a.option_strings}
        for flag in (w.split("=", 1)[0] for w in argv[2:] if w.startswith("--")):
            assert flag in known, f"README mentions {span!r}: {argv[1]} has no flag {flag}"


def test_make_demo_runs_styleray_demo():
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    target = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert target and "styleray demo" in target.group(1)


# -- curl lines against the real HTTP API (a fake generator behind it) ------------------------------------


class _Backend:
    """Answers every generator call with a 1x1 PNG (the routes and their validation are what is tested), and
    projection calls with a record, a PNG or a latent."""

    async def call(self, method, request=None, model=None):
        from styleray.serve import encode
        from styleray.serve.schemas import Encoded

        if method == "info":
            return {"resolution": 1}
        if method == "ping":
            return "ckpt-x"
        if method == "start_projection":
            return {"id": "3f2a9c4e1b7d", "status": "running"}
        return Encoded(encode.encode_image(np.zeros([1, 1, 3], np.uint8), "png"), "image/png", "ckpt-x", {})

    async def reload(self, model, checkpoint, wait_s):
        return 200, {"checkpoint": checkpoint}

    async def models(self):
        return {"models": [{"name": "heroes"}], "default": "heroes"}

    async def projections(self, method, *args):
        from styleray.serve import encode

        if method == "image":
            return encode.encode_image(np.zeros([1, 1, 3], np.uint8), "png")
        if method == "latent":
            return np.zeros([2, 2], np.float32), {}
        return [] if method == "list" else {"id": args[0], "status": "done"}


def curl_request(argv: list[str]) -> tuple[str, str, dict | bytes | None, dict[str, str]]:
    """(method, path?query, JSON body or bytes, headers) of a curl command line; ``--data-binary @FILE``
    sends a small PNG in FILE's place."""
    method, body, headers, url = "GET", None, {}, None
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("-X", "--request"):
            method, i = argv[i + 1], i + 2
        elif a in ("-d", "--data", "--data-raw"):
            body, i = json.loads(argv[i + 1]), i + 2
            method = "POST" if method == "GET" else method
        elif a == "--data-binary":
            from styleray.serve import encode

            assert argv[i + 1].startswith("@"), "--data-binary examples send a file: @FILE"
            body, i = encode.encode_image(np.full([16, 16, 3], 200, np.uint8), "png"), i + 2
            method = "POST" if method == "GET" else method
        elif a in ("-H", "--header"):
            k, v = argv[i + 1].split(":", 1)
            headers[k.strip()] = v.strip()
            i += 2
        elif a in ("-o", "--output", "-u", "--user"):
            i += 2
        elif a.startswith("-"):
            i += 1
        else:
            url, i = a, i + 1
    assert url, f"no URL in {argv}"
    parts = urlsplit(url)
    return method, parts.path + (f"?{parts.query}" if parts.query else ""), body, headers


@pytest.mark.parametrize("line", [c for c in code_block_commands(_readme()) if c.startswith("curl ")])
def test_curl_examples_are_valid_requests(line):
    import httpx

    from styleray.serve.api import create_api

    method, path, body, headers = curl_request(words(line))
    app = create_api(_Backend(), api_key=headers.get("X-API-Key"))  # a line that sends a key: the server has it

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            if isinstance(body, bytes):
                return await c.request(method, path, content=body, headers=headers)
            return await c.request(method, path, json=body, headers=headers)

    r = asyncio.run(go())
    assert r.status_code in (200, 202), f"{line}: {r.status_code} {r.text[:300]}"
