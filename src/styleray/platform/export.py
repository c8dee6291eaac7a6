"""``styleray export``: a checkpoint's generator (its EMA weights) as an ONNX file, checked before it is written.

    --onnx PATH is checked first (a writable place, not a folder) -> the checkpoint's G_ema ->
    models.interop.onnx_export: the graph (z, psi, c -> img), opset and dynamic batch -> onnxruntime against
    PyTorch within the tolerance -> written atomically (local or s3://). A failed check writes nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from styleray import storage

log = logging.getLogger(__name__)


def export_onnx(checkpoint: str, out: str, *, opset: int | None = None, tolerance: float | None = None) -> dict[str, Any]:
    """Export ``checkpoint``'s generator to ``out``; returns what was written and the check's figures.
    ValueError naming the flag for a checkpoint, path or check that fails."""
    from styleray.models.interop import onnx_export, onnx_spec
    from styleray.platform.checkpoint import load_generator

    opset = onnx_spec.OPSET if opset is None else opset
    tolerance = onnx_spec.TOLERANCE if tolerance is None else tolerance
    if not tolerance > 0:
        raise ValueError(f"--tolerance {tolerance} must be > 0")
    _check_target(out)
    G, ckpt = load_generator(checkpoint)
    log.info("exporting the generator of %s (%d px) to ONNX, opset %d", ckpt.uri, G.img_resolution, opset)
    model = onnx_export.export_generator(G, opset)
    check = onnx_export.check_with_onnxruntime(G, model, tolerance)
    try:
        storage.write_bytes(out, model)
    except OSError as e:
        raise ValueError(f"--onnx {out} cannot be written: {e.strerror or e}") from None
    return {"checkpoint": ckpt.uri, "onnx": out, "bytes": len(model), "opset": opset,
            "inputs": onnx_export.input_names(G), "resolution": G.img_resolution, "c_dim": G.c_dim, **check}


def _check_target(out: str) -> None:
    """A local --onnx must name a file in a folder this process can write (or create)."""
    if storage.is_remote(out):
        return
    path = os.path.abspath(out)
    if os.path.isdir(path):
        raise ValueError(f"--onnx {out} is a folder: give a file name, e.g. {os.path.join(out, 'G.onnx')}")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--onnx {out} cannot be written: {parent} is not a folder this process may write in")
