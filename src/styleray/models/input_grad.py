"""A network's output and its gradient w.r.t. the input as one compiled graph, differentiable w.r.t. the weights.

R1 needs the gradient of |dD(x)/dx|^2 with respect to D's weights: a double backward. torch.compile cannot do
that through a compiled network (AOTAutograd's backward of a compiled graph is differentiable only once), which
is why the regularisation phases ran eager. The way round, for the part of the penalty that holds the work:

1. Trace, with ``make_fx``, a function of (weights, x) that runs the network and ``torch.autograd.grad`` of its
   summed output w.r.t. x. Autograd runs while tracing, so the graph holds the backward's operations (our
   ``layers.conv2d`` backward is made of plain convolutions) as ordinary forward operations: (out, dout/dx).
2. ``torch.compile`` that graph. Its own backward w.r.t. the weights and x is now a first-order backward, which
   AOTAutograd supports: the penalty's gradient reaches the weights through compiled code.

What is not in the graph stays eager and differentiable as usual (the augment pipe in front of D: its
input gradient is chained on eagerly, ``create_graph=True``). Shapes are static: one trace per input shape.

Investigated and rejected (torch 2.13): ``torch.func.grad`` inside ``torch.compile`` drops the weights' gradient
when the network uses a custom autograd.Function (our convolutions), and a ``torch.library.custom_op``
convolution is not accepted by torch.func transforms; plain aten convolutions there would differentiate twice
through ATen's double-backward decomposition, one convolution per channel for the depthwise FIR filters.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.fx.experimental.proxy_tensor import make_fx


class CompiledInputGrad:
    """``(out, d out.sum() / dx) = self(x, extra)`` for ``module(x, extra)``, compiled; both differentiable
    w.r.t. the module's parameters and x."""

    def __init__(self, module: torch.nn.Module, compile_options: dict[str, Any] | None = None):
        self.module = module
        self.options = compile_options or {}
        self._graphs: dict[Any, Callable] = {}

    def __call__(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        params = list(self.module.parameters())
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, None if extra is None else tuple(extra.shape))
        if key not in self._graphs:
            self._graphs[key] = self._trace(params, x, extra)
        return self._graphs[key](params, x, extra)

    def _trace(self, params: list[torch.Tensor], x: torch.Tensor, extra: torch.Tensor | None) -> Callable:
        names = [name for name, _ in self.module.named_parameters()]
        module = self.module

        def output_and_input_grad(weights, x, extra):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                state = {n: w.detach() for n, w in zip(names, weights)}
                out = torch.func.functional_call(module, state, (x, extra))
                (grad,) = torch.autograd.grad(out.sum(), x)
            return out, grad

        with torch.no_grad():
            graph = make_fx(output_and_input_grad)([p.detach() for p in params], x.detach(), extra)
        _drop_detaches(graph)
        return torch.compile(graph, options=self.options, dynamic=False)


def _drop_detaches(graph: torch.fx.GraphModule) -> None:
    """The trace detaches the weights and x to differentiate w.r.t. x alone; the compiled graph must not: its
    outputs have to stay differentiable w.r.t. both (the second backward)."""
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.graph.lint()
    graph.recompile()
