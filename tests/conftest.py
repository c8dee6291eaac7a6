"""Fixtures every part's tests share: a tiny prepared dataset and small helpers."""

from __future__ import annotations

import json
import os
import socket

import pytest

from styleray.datasets.synthetic import make_clean_training_set


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """64 figures at 16 px with framing labels (2 classes)."""
    return str(make_clean_training_set(tmp_path_factory.mktemp("data") / "tiny16", n=64, resolution=16, seed=0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def helpers():
    """Small helpers shared by the test modules (tests/ has no __init__.py to import them from)."""

    class H:
        port = staticmethod(free_port)
        metrics = staticmethod(read_metrics)

    return H
