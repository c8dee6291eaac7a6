"""The GPU suite (``pytest -m gpu``; benchmarks/gpu_check.sh runs it). Every test here needs CUDA and skips
without it; the Ray ones also skip where Ray does not import (the lent GPU machine has torch but no Ray)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 means fp32 here: TF32 matmuls and convolutions off, restored after the test."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
