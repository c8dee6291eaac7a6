"""Which floating-point precision a run trains in, and what keeps reduced precision stable.

``--precision auto|fp32|bf16|fp16`` is a wish; :func:`choose_precision` turns it into what runs on a given device,
a pure function of (wish, device type, CUDA compute capability) so every card is tested on a CPU machine:

==========  ======================  =================================================================
wish        CUDA, capability ≥ 8.0  CUDA below 8.0 (V100 7.0, T4 7.5)          CPU
==========  ======================  =================================================================
auto        bf16                    fp16 (no fast bf16 units)                    fp32
bf16        bf16                    bf16, slow (emulated), said in the reason    error: needs CUDA
fp16        fp16                    fp16                                         error: needs CUDA
fp32        fp32                    fp32                                         fp32
==========  ======================  =================================================================

Reduced precision applies where the reference applies it: the convolutions of the top resolutions
(``ModelConfig.num_fp16_res``), their outputs clamped to ``±conv_clamp``; the mapping network, the low
resolutions, the losses, the optimizer state and the weights stay fp32. The gradients are zeroed where they are
not finite before every optimizer step (NaN to 0, ±inf to ±1e5, as the reference does; the trainer's gradient
averaging does it on the flat all-reduce buffer), so one overflowing round cannot poison Adam's moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
BF16_CAPABILITY = (8, 0)  # Ampere and later have bf16 tensor cores
Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionChoice:
    """What runs (``name``) and why (``reason``, printed at start and kept in the tick record)."""

    name: Precision
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def mixed_precision(self) -> str:
        """The value of ``ModelConfig.mixed_precision`` this choice means ("off" for fp32)."""
        return "off" if self.name == "fp32" else self.name

    @property
    def reduced(self) -> bool:
        return self.name != "fp32"


def choose_precision(
    wish: str, device_type: str, capability: tuple[int, int] | None = None
) -> PrecisionChoice:
    """The precision a run uses for ``--precision wish`` on a ``device_type`` ("cuda", "cpu", ...) whose CUDA
    compute capability is ``capability`` (ignored off CUDA). ValueError when the wish cannot run there."""
    if wish not in PRECISION_CHOICES:
        raise ValueError(f"--precision {wish!r} is not one of {', '.join(PRECISION_CHOICES)}")
    if device_type != "cuda":
        if wish in ("auto", "fp32"):
            return PrecisionChoice("fp32", f"{device_type}: reduced precision is slower than fp32 off CUDA")
        raise ValueError(
            f"--precision {wish} needs a CUDA GPU; this worker trains on {device_type}. "
            "Use --precision auto (fp32 here, bf16/fp16 on GPUs) or fp32."
        )
    if capability is None:
        raise ValueError("choose_precision on CUDA needs the device's compute capability")
    card = f"compute capability {capability[0]}.{capability[1]}"
    fast_bf16 = tuple(capability) >= BF16_CAPABILITY
    if wish == "auto":
        if fast_bf16:
            return PrecisionChoice("bf16", f"auto: bf16 on {card} (>= 8.0 has bf16 tensor cores)")
        return PrecisionChoice("fp16", f"auto: fp16 on {card} (no fast bf16 below 8.0)")
    if wish == "bf16" and not fast_bf16:
        return PrecisionChoice("bf16", f"bf16 as asked, but {card} emulates it (slow): auto would pick fp16")
    return PrecisionChoice(wish, f"{wish} as asked ({card})")  # type: ignore[arg-type]


def device_capability(device: torch.device | str) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device``, None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def choose_for_device(wish: str, device: torch.device | str) -> PrecisionChoice:
    device = torch.device(device)
    return choose_precision(wish, device.type, device_capability(device))

