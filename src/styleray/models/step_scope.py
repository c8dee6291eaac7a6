"""What a training step sets in torch's process-wide state, scoped to the step and restored after it.

The step draws its random numbers (latents, style mixing, synthesis noise, augmentations, path-length noise)
from torch's default generators, as the reference does and as compiled graphs do (`fallback_random`). A
trainer owns its own generator states (`RandomStreams`) and swaps them in for the duration of a step, so
building or stepping a trainer never reseeds or advances the caller's global RNG, and anything else the
process draws (metrics, sample grids, another trainer) never changes a run. Saving the streams' state and
loading it resumes the run bit-exactly.

`tf32_allowed` sets whether CUDA matmuls and cuDNN convolutions may use TF32 during the step (the reference
turns it off for training: `--allow-tf32` defaults to false) and restores PyTorch's settings afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class RandomStreams:
    """Torch generator states (CPU, and the device's when it is CUDA) owned by one trainer."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.cpu = torch.Generator()
        self.cuda = torch.Generator(device) if device.type == "cuda" else None
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """The states ``torch.manual_seed(seed)`` would give the default generators."""
        self.cpu.manual_seed(seed)
        if self.cuda is not None:
            self.cuda.manual_seed(seed)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Within: torch's default generators draw from these streams. After: they are as they were, and the
        streams have advanced by what was drawn."""
        devices = []
        if self.cuda is not None:
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu.get_state())
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda.get_state(), self.device)
            try:
                yield
            finally:
                self.cpu.set_state(torch.get_rng_state())
                if self.cuda is not None:
                    self.cuda.set_state(torch.cuda.get_rng_state(self.device))

    def state_dict(self) -> dict[str, Any]:
        """Plain byte tensors (loadable with weights_only=True)."""
        state = {"torch": self.cpu.get_state()}
        if self.cuda is not None:
            state["cuda"] = self.cuda.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cpu.set_state(state["torch"])
        if self.cuda is not None and "cuda" in state:
            self.cuda.set_state(state["cuda"])


@contextlib.contextmanager
def seeded_cpu(seed: int) -> Iterator[None]:
    """Torch's CPU generator seeded with ``seed`` inside, restored outside (networks are built on the CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


@contextlib.contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions on or off inside; PyTorch's previous settings outside."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
