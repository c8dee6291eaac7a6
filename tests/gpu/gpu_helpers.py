"""What the GPU suite's modules share (tests/gpu is on pytest's pythonpath)."""

from __future__ import annotations

import pytest
import torch

from styleray.config import ModelConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = [pytest.mark.gpu, needs_cuda]


def small_model(resolution: int = 32, precision: str = "off", **kw) -> ModelConfig:
    """A few channels at a small resolution; the top two resolutions in reduced precision when asked."""
    return ModelConfig(resolution=resolution, channel_base=2048, channel_max=64, z_dim=64, w_dim=64,
                       mapping_layers=2, num_fp16_res=2, mixed_precision=precision, conv_clamp=256.0, **kw)
