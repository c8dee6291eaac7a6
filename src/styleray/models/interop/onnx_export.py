"""The generator as ONNX: latents, truncation and class in, images out; constant noise.

    inputs   z     float32 [batch, z_dim]    latents; batch is a dynamic axis (any size)
             psi   float32 []                truncation psi (1 = none, 0.7 = safer samples)
             c     float32 [batch, c_dim]    one-hot (or soft) class labels; only for a conditional generator
    output   img   float32 [batch, C, H, W]  in about [-1, 1], as G returns it (x * 127.5 + 128 -> 8 bits)

The graph is G.mapping -> w_avg + psi * (w - w_avg) on every layer -> G.synthesis with noise_mode="const"
(the same image for the same z, like ``styleray generate``'s default). Modulation runs as scale-conv-scale
(one convolution shared by the batch), since a grouped convolution would fix the batch size in the graph.
Exported with torch.onnx's exporter (torch.export, opset OPSET), then checked: onnxruntime runs the model on
a few latents at two batch sizes and both psi values, and its images must lie within TOLERANCE of PyTorch's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from styleray.models.interop.onnx_spec import CHECK_BATCHES, CHECK_PSI, INPUTS, OPSET, OUTPUT, TOLERANCE
from styleray.models.networks import Generator

log = logging.getLogger(__name__)



class ExportCheckFailed(ValueError):
    """onnxruntime's images differ from PyTorch's by more than the tolerance."""


class GeneratorGraph(nn.Module):
    """What the ONNX graph computes: (z, psi[, c]) -> image, truncation on every layer, constant noise."""

    def __init__(self, G: Generator):
        super().__init__()
        self.G = copy.deepcopy(G).cpu().float().eval().requires_grad_(False)
        self.G.set_fused_modconv(False)

    def forward(self, z: torch.Tensor, psi: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        w = self.G.mapping(z, c)  # [batch, num_ws, w_dim]
        w_avg = self.G.mapping.w_avg
        return self.G.synthesis(w_avg + psi * (w - w_avg), noise_mode="const")


def input_names(G: Generator) -> list[str]:
    return list(INPUTS if G.c_dim > 0 else INPUTS[:2])


def example_inputs(G: Generator, batch: int, psi: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn([batch, G.z_dim], generator=gen)
    args: tuple[torch.Tensor, ...] = (z, torch.tensor(psi, dtype=torch.float32))
    if G.c_dim > 0:
        args += (nn.functional.one_hot(torch.arange(batch) % G.c_dim, G.c_dim).float(),)
    return args


def export_generator(G: Generator, opset: int = OPSET) -> bytes:
    """The ONNX model (serialised ModelProto) of G's graph, with a dynamic batch axis."""
    graph = GeneratorGraph(G)
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = ({0: batch}, None) + (({0: batch},) if G.c_dim > 0 else ())
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            graph, example_inputs(G, 2, 0.7), dynamo=True, opset_version=opset, input_names=input_names(G),
            output_names=[OUTPUT], dynamic_shapes=dynamic, verbose=False,
        )
    return program.model_proto.SerializeToString()


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's passes log every rewrite at INFO and warn about optional parts (torchvision): keep only
    their errors, for the export's own duration."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_with_onnxruntime(G: Generator, model: bytes, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Run the ONNX model with onnxruntime against PyTorch at CHECK_BATCHES x CHECK_PSI; returns the largest
    difference per case. ExportCheckFailed when one exceeds ``tolerance``."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    graph = GeneratorGraph(G)
    diffs = {}
    for batch in CHECK_BATCHES:
        for psi in CHECK_PSI:
            args = example_inputs(G, batch, psi, seed=batch)
            with torch.no_grad():
                expected = graph(*args).numpy()
            (got,) = session.run([OUTPUT], {n: a.numpy() for n, a in zip(input_names(G), args)})
            if got.shape != expected.shape:
                raise ExportCheckFailed(f"onnxruntime gave images of shape {got.shape}, PyTorch {expected.shape}")
            diffs[f"batch {batch}, psi {psi}"] = float(np.abs(got - expected).max())
    worst = max(diffs.values())
    if not worst <= tolerance:
        raise ExportCheckFailed(f"onnxruntime's images differ from PyTorch's by up to {worst:.3g} (tolerance "
                                f"{tolerance:g}): {diffs}")
    return {"max_abs_diff": worst, "cases": diffs, "tolerance": tolerance}
