"""Fixtures of the data-preparation tests: sample figures, awkward files, a tiny ONNX model, Ray, moto S3."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prep_helpers import SIZE, BorderContrastNet, awkward_files
from styleray.datasets.synthetic import make_sample_dataset


@pytest.fixture(scope="session")
def sample_raw(tmp_path_factory) -> Path:
    """16 raw figures on solid and gradient backgrounds (square, 4:3, 3:4; some JPEG) with true masks."""
    root = tmp_path_factory.mktemp("sample")
    make_sample_dataset(root, 16, size=SIZE, seed=3, backgrounds=("solid", "gradient"))
    return root


@pytest.fixture
def awkward_folder(tmp_path) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path / "raw"
    expected = {}
    for name, (data, reason) in awkward_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        expected[name] = reason
    (root / "notes.txt").write_text("not an image extension: ignored, not rejected\n")
    return root, expected


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A tiny segmentation model exported to ONNX: runs through rembg's u2net_custom session."""
    pytest.importorskip("onnx")
    import torch

    path = tmp_path_factory.mktemp("models") / "tiny-seg.onnx"
    with torch.no_grad():
        torch.onnx.export(BorderContrastNet.build(), torch.zeros(1, 3, 320, 320), str(path),
                          input_names=["input"], output_names=["mask"], dynamo=False, opset_version=17)
    return path


@pytest.fixture(scope="module")
def ray_local():
    """A private 2-CPU Ray for the module (never a cluster someone else started)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3():
    """A moto S3 server on 127.0.0.1; AWS_* variables point at it for the module (set before Ray starts)."""
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(exe):
        pytest.skip("moto_server is not installed")
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
