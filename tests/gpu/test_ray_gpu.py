"""The Ray tier of the GPU suite: where Ray imports and the machine has a GPU. Serve on CUDA gives the image a
direct call gives for the same seed; --gpus with more workers than the cluster's GPUs fails at once, naming
what fits. (The lent GPU machine has no Ray: these skip there, and gpu_check's report says so.)"""

from __future__ import annotations

import io
import urllib.request

import numpy as np
import pytest
import torch
from gpu_helpers import GPU

pytestmark = GPU


def _ray_tier():
    pytest.importorskip("ray", reason="the Ray tier needs Ray")
    pytest.importorskip("fastapi", reason="Serve's HTTP API needs FastAPI")


def test_serve_on_cuda_gives_the_direct_call_s_image(tmp_path):
    _ray_tier()
    from PIL import Image
    from serve_helpers import make_checkpoint, running_app

    from styleray.models.sampling import generate_images
    from styleray.platform.checkpoint import load_generator
    from styleray.serve.args import ServeArgs

    uri = make_checkpoint(str(tmp_path / "run"), seed=3, cur_nimg=8, c_dim=0)
    direct = generate_images(load_generator(uri, "cuda"), [7], noise_mode="const")[0]
    with running_app(ServeArgs(checkpoint=str(tmp_path / "run"), device="cuda", gpus_per_replica=1)) as url:
        with urllib.request.urlopen(f"{url}/v1/sample?seed=7&noise=const&format=png", timeout=120) as r:
            served = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))
    assert served.shape == direct.shape
    assert int(np.abs(served.astype(int) - direct.astype(int)).max()) <= 1  # one step of 8-bit rounding


def test_more_workers_than_gpus_fails_at_once_with_what_fits():
    _ray_tier()
    import ray

    from styleray.platform.train.ray_train import RayOptions, check_capacity

    gpus = torch.cuda.device_count()
    ray.init(address="local", num_cpus=2, num_gpus=gpus, include_dashboard=False)
    try:
        with pytest.raises(ValueError, match=f"--workers {gpus + 1} needs .* can place {gpus} .*use --workers {gpus}"):
            check_capacity(gpus + 1, RayOptions(gpus=True))
        check_capacity(gpus, RayOptions(gpus=True))
    finally:
        ray.shutdown()
