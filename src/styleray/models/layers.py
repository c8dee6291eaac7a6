"""Building blocks of StyleGAN2: equalized-lr layers, FIR resampling, modulated convolution.

Pure PyTorch, no custom ops. Every resampling here is the reference's [1, 3, 3, 1] FIR filter; the
transposed/strided convolutions are arranged so a layer's output size equals the reference's.

Fast paths and their reference paths. Three things here compute the same function as the reference
(stylegan2-ada-pytorch) in fewer operations; ``reference_paths()`` switches all of them back to the plain
formulation, and ``tests/models/test_fast_paths.py`` checks that both agree (values, gradients, and the second
derivatives R1 and path-length regularisation take):

* Demodulation coefficients. The reference forms the per-sample weights ``[N, O, I, k, k]`` just to sum their
  squares; the same sum is ``styles**2 @ (weight**2).sum(k, k)``, one ``[N, I] @ [I, O]`` product. At batch 32
  and 512 channels that is 2.4 GB of memory traffic per layer (and again in each backward) saved.
* ``conv2d``: a convolution whose backward is made of convolutions (``_Conv2d`` / ``_Conv2dWeightGrad``), so
  double backward runs the native forward/backward kernels. PyTorch's own double backward of a convolution
  computes the weight gradient as a convolution with a huge kernel, and for grouped (depthwise FIR)
  convolutions loops over the groups, one tiny convolution each: 512 calls per FIR filter in R1 and path
  length regularisation. (The reference does the same on CUDA: its ``conv2d_gradfix``.)
* Elementwise passes: ``bias_act`` does (x + b) * gain in one pass (``torch.add(b * gain, x, alpha=gain)``, exact
  for lrelu since lrelu(g z) = g lrelu(z) for g > 0) and clamps with ``hardtanh`` (a one-pass backward);
  ``modulated_conv2d`` applies demodulation and noise in one ``addcmul``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)

_fast_paths = True  # see reference_paths()


@contextlib.contextmanager
def reference_paths(enabled: bool = True) -> Iterator[None]:
    """Run every op of this module the plain way (the reference's formulation) inside the block.

    For tests and the benchmark's old-vs-new comparison; training uses the fast paths.
    """
    global _fast_paths
    previous, _fast_paths = _fast_paths, not enabled
    try:
        yield
    finally:
        _fast_paths = previous


def fast_paths_enabled() -> bool:
    return _fast_paths


# ---------------------------------------------------------------------------------------------------------
# Convolution with a convolution-only backward (any order of derivatives at native speed)
# ---------------------------------------------------------------------------------------------------------


class _ConvSpec(NamedTuple):
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    transpose: bool  # conv_transpose2d instead of conv2d
    output_padding: tuple[int, int]  # transpose only

    def run(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.transpose:
            return F.conv_transpose2d(x, w, None, self.stride, self.padding, self.output_padding, self.groups)
        return F.conv2d(x, w, None, self.stride, self.padding, 1, self.groups)

    def input_grad_spec(self, x_shape: torch.Size, y_shape: torch.Size, w_shape: torch.Size) -> "_ConvSpec":
        """The convolution that maps dL/dy to dL/dx (the transpose of this one)."""
        if self.transpose:
            return _ConvSpec(self.stride, self.padding, self.groups, False, (0, 0))
        # conv2d: y = (x + 2p - k) // s + 1; its transpose needs output_padding to give back x's exact size.
        op = tuple(
            x_shape[i + 2] - ((y_shape[i + 2] - 1) * self.stride[i] - 2 * self.padding[i] + w_shape[i + 2])
            for i in range(2)
        )
        return _ConvSpec(self.stride, self.padding, self.groups, True, op)  # type: ignore[arg-type]


class _Conv2d(torch.autograd.Function):
    # forward and setup_context apart: the form torch.func transforms (and the compiler through them) accept.
    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, spec: _ConvSpec) -> torch.Tensor:
        return spec.run(x, w)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, spec = inputs
        ctx.spec = spec
        ctx.shapes = (x.shape, output.shape, w.shape)
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        spec = ctx.spec
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _Conv2d.apply(dy, w, spec.input_grad_spec(*ctx.shapes))
        if ctx.needs_input_grad[1]:
            dw = _Conv2dWeightGrad.apply(dy, x, w.detach(), spec)
        return dx, dw, None


class _Conv2dWeightGrad(torch.autograd.Function):
    """dL/dw of ``spec.run(x, w)`` given dL/dy: bilinear in (dy, x), so its own gradients are convolutions."""

    @staticmethod
    def forward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, spec: _ConvSpec) -> torch.Tensor:
        _, dw, _ = torch.ops.aten.convolution_backward(
            dy, x, w, None, spec.stride, spec.padding, (1, 1), spec.transpose, spec.output_padding, spec.groups,
            (False, True, False),
        )
        return dw

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        dy, x, w, spec = inputs
        ctx.spec = spec
        ctx.shapes = (x.shape, dy.shape, w.shape)
        ctx.save_for_backward(dy, x)

    @staticmethod
    def backward(ctx, ddw: torch.Tensor):
        dy, x = ctx.saved_tensors
        spec = ctx.spec
        d_dy = d_x = None
        if ctx.needs_input_grad[0]:  # <ddw, dw(dy, x)> = <dy, conv(x, ddw)>
            d_dy = _Conv2d.apply(x, ddw, spec)
        if ctx.needs_input_grad[1]:  # ... = <conv^T(dy, ddw), x>
            d_x = _Conv2d.apply(dy, ddw, spec.input_grad_spec(*ctx.shapes))
        return d_dy, d_x, None, None


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d(
    x: torch.Tensor,  # [N, I, H, W]
    w: torch.Tensor,  # [O, I / groups, kh, kw] (conv) or [I, O / groups, kh, kw] (transpose)
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    transpose: bool = False,  # conv_transpose2d (output_padding 0) instead of conv2d
) -> torch.Tensor:
    """``F.conv2d`` / ``F.conv_transpose2d`` with a backward made of convolutions (see the module docstring).
    Same values and gradients as the plain call, which ``reference_paths()`` uses."""
    if not _fast_paths:
        if transpose:
            return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
        return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)
    spec = _ConvSpec(_pair(stride), _pair(padding), groups, transpose, (0, 0))
    if not (x.requires_grad or w.requires_grad) or not torch.is_grad_enabled():
        return spec.run(x, w)
    return _Conv2d.apply(x, w, spec)


# ---------------------------------------------------------------------------------------------------------
# Elementwise
# ---------------------------------------------------------------------------------------------------------


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale each vector to unit root-mean-square (the mapping network's input normalisation)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def bias_act(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "linear",
    gain: float = 1.0,
    clamp: float | None = None,
) -> torch.Tensor:
    """x + bias (broadcast over dim 1), then activation, then * gain, then clamp to [-clamp, clamp]."""
    if activation not in ("linear", "lrelu"):
        raise ValueError(f"unknown activation {activation!r}")
    if bias is not None:
        bias = bias.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
    if _fast_paths and gain > 0:
        # (x + b) * g in one pass; lrelu(z) * g == lrelu(z * g) for g > 0.
        if bias is not None:
            x = torch.add(bias * gain, x, alpha=gain) if gain != 1.0 else x + bias
        elif gain != 1.0:
            x = x * gain
        if activation == "lrelu":
            x = F.leaky_relu(x, LRELU_SLOPE)
    else:
        if bias is not None:
            x = x + bias
        if activation == "lrelu":
            x = F.leaky_relu(x, LRELU_SLOPE)
        if gain != 1.0:
            x = x * gain
    if clamp is not None:
        # hardtanh is clamp with a one-pass backward (clamp's backward builds its mask from two comparisons, a
        # logical and and a where: four passes). They differ only for an input exactly at +-clamp, where
        # hardtanh passes no gradient (as the reference's CUDA bias_act does) and clamp does.
        x = F.hardtanh(x, -clamp, clamp) if _fast_paths else x.clamp(-clamp, clamp)
    return x


# ---------------------------------------------------------------------------------------------------------
# FIR resampling
# ---------------------------------------------------------------------------------------------------------


def make_fir_filter(taps: tuple[float, ...] = (1.0, 3.0, 3.0, 1.0)) -> torch.Tensor:
    """Separable 2-D low-pass filter, normalised to unit sum: [k, k]."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def _depthwise(f: torch.Tensor, channels: int, dtype: torch.dtype, gain: float = 1.0) -> torch.Tensor:
    return (f * gain).to(dtype)[None, None].expand(channels, 1, *f.shape)  # [C, 1, k, k]


def fir_filter2d(x: torch.Tensor, f: torch.Tensor, padding: int, gain: float = 1.0) -> torch.Tensor:
    """Filter every channel with f (symmetric, so no flip needed), zero padding on every side."""
    c = x.shape[1]
    return conv2d(x, _depthwise(f, c, x.dtype, gain), padding=padding, groups=c)


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x upsampling: zero insertion followed by f with gain 4 (reference ``upfirdn2d.upsample2d``)."""
    c = x.shape[1]
    return conv2d(x, _depthwise(f, c, x.dtype, gain=4.0), stride=2, padding=1, groups=c, transpose=True)


def downsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Low-pass with f, then keep every second sample (reference ``upfirdn2d.downsample2d``)."""
    c = x.shape[1]
    return conv2d(x, _depthwise(f, c, x.dtype), stride=2, padding=1, groups=c)


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


class FullyConnectedLayer(nn.Module):
    """Dense layer with equalized learning rate."""

    def __init__(
        self,
        in_features: int,  # Input dimensionality.
        out_features: int,  # Output dimensionality.
        bias: bool = True,  # Learn an additive bias?
        activation: str = "linear",  # "linear" or "lrelu".
        lr_multiplier: float = 1.0,  # Learning rate multiplier (0.01 in the mapping network).
        bias_init: float = 0.0,  # Initial bias value (1 for style affines, so styles start at 1).
    ):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)  # [out, in]
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        w = (self.weight * self.weight_gain).to(x.dtype)
        b = self.bias
        if b is not None:
            b = (b * self.bias_gain).to(x.dtype) if self.bias_gain != 1 else b.to(x.dtype)
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        if _fast_paths and self.activation == "lrelu" and b is not None:
            # lrelu(z) * g == lrelu(z * g): the gain folded into w and b, one addmm and one lrelu. (Not
            # addmm(..., alpha=g): torch.compile rewrites addmm + pointwise into mm + add and drops alpha,
            # pytorch/pytorch#167313.)
            return F.leaky_relu(torch.addmm((b * LRELU_GAIN).unsqueeze(0), x, (w * LRELU_GAIN).t()), LRELU_SLOPE)
        x = x.matmul(w.t())
        gain = LRELU_GAIN if self.activation == "lrelu" else 1.0
        return bias_act(x, b, self.activation, gain=gain)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activation={self.activation}"


class Conv2dLayer(nn.Module):
    """Convolution with equalized learning rate, optional 2x FIR downsampling (the discriminator's conv)."""

    def __init__(
        self,
        in_channels: int,  # Input channels.
        out_channels: int,  # Output channels.
        kernel_size: int,  # Kernel width and height (1 or 3).
        bias: bool = True,  # Learn an additive bias?
        activation: str = "linear",  # "linear" or "lrelu".
        down: bool = False,  # Halve the resolution (FIR low-pass, then stride 2)?
        conv_clamp: float | None = None,  # Clamp the output to +-this; None = no clamp.
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.activation, self.down, self.conv_clamp = kernel_size, activation, down, conv_clamp
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = LRELU_GAIN if activation == "lrelu" else 1.0
        self.register_buffer("resample_filter", make_fir_filter(), persistent=False)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:  # [N, I, H, W] -> [N, O, H', W']
        w = (self.weight * self.weight_gain).to(x.dtype)
        k = self.kernel_size
        if self.down and k == 1:
            x = downsample2d(x, self.resample_filter)  # [N, I, H/2, W/2]
            x = conv2d(x, w)
        elif self.down:
            # Reference conv2d_resample(down=2): low-pass padded by 2, then a valid stride-2 conv.
            x = fir_filter2d(x, self.resample_filter, padding=2)  # [N, I, H+1, W+1]
            x = conv2d(x, w, stride=2)  # [N, O, H/2, W/2]
        else:
            x = conv2d(x, w, padding=k // 2)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, self.activation, gain=self.act_gain * gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels}, out={self.out_channels}, k={self.kernel_size}, "
            f"activation={self.activation}, down={self.down}"
        )


# ---------------------------------------------------------------------------------------------------------
# Modulated convolution
# ---------------------------------------------------------------------------------------------------------


def demodulation_coefficients(weight: torch.Tensor, styles: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 / |w'[n, o]| for the modulated weights w'[n, o, i] = weight[o, i] * styles[n, i]: [N, O], >= fp32.

    sum_{i,k} (weight[o, i, k] styles[n, i])^2 = sum_i styles[n, i]^2 sum_k weight[o, i, k]^2, so this is one
    [N, I] @ [I, O] product; the reference path materialises w' ([N, O, I, k, k]) and sums its squares.
    """
    dtype = torch.promote_types(styles.dtype, torch.float32)  # at least fp32 (reduced precision on CUDA)
    if not _fast_paths:
        w = weight.unsqueeze(0) * styles.reshape(styles.shape[0], 1, -1, 1, 1)  # [N, O, I, k, k]
        return (w.to(dtype).square().sum(dim=[2, 3, 4]) + eps).rsqrt()
    return (styles.to(dtype).square() @ weight.to(dtype).square().sum(dim=[2, 3]).t() + eps).rsqrt()


def modulated_conv2d(
    x: torch.Tensor,  # Input activations: [N, I, H, W].
    weight: torch.Tensor,  # Shared weights: [O, I, k, k].
    styles: torch.Tensor,  # Per-sample modulation: [N, I].
    noise: torch.Tensor | None = None,  # Added after the convolution: broadcastable to [N, O, H', W'].
    up: bool = False,  # 2x upsampling (transposed conv followed by the FIR filter)?
    demodulate: bool = True,  # Normalise each output feature map to unit expected variance?
    fused: bool = False,  # One grouped conv with per-sample weights (True) or scale-conv-scale (False).
    resample_filter: torch.Tensor | None = None,  # FIR filter for up=True: [k, k].
) -> torch.Tensor:
    """StyleGAN2's weight modulation and demodulation.

    Two equivalent paths: ``fused`` builds per-sample weights and runs one grouped convolution (cheap at small
    batch, the reference's inference path); the default scales the input by the styles, runs one shared
    convolution over the whole batch and rescales the output (best when the batch is large, and on CPU at
    every batch size we train with: see benchmarks/RESULTS.md). A test checks that they agree.
    """
    n, in_ch, _, _ = x.shape
    out_ch, in_ch_w, kh, kw = weight.shape
    if in_ch != in_ch_w or styles.shape != (n, in_ch):
        raise ValueError(f"modulated_conv2d: x {tuple(x.shape)}, weight {tuple(weight.shape)}, styles {tuple(styles.shape)}")
    if up and resample_filter is None:
        raise ValueError("modulated_conv2d(up=True) needs resample_filter")
    weight = weight.to(x.dtype)
    styles = styles.to(x.dtype)
    dcoefs = demodulation_coefficients(weight, styles).to(x.dtype) if demodulate else None  # [N, O]

    if fused:
        w = weight.unsqueeze(0) * styles.reshape(n, 1, in_ch, 1, 1)  # [N, O, I, k, k]
        if dcoefs is not None:
            w = w * dcoefs.reshape(n, out_ch, 1, 1, 1)
        x = x.reshape(1, n * in_ch, *x.shape[2:])  # [1, N*I, H, W]
        if up:
            w = w.transpose(1, 2).reshape(n * in_ch, out_ch, kh, kw)  # [N*I, O, k, k]
            x = conv2d(x, w, stride=2, groups=n, transpose=True)  # [1, N*O, 2H+1, 2W+1]
        else:
            x = conv2d(x, w.reshape(n * out_ch, in_ch, kh, kw), padding=kh // 2, groups=n)
        x = x.reshape(n, out_ch, *x.shape[2:])  # [N, O, H', W']
        dcoefs = None  # already in the weights
    else:
        x = x * styles.reshape(n, in_ch, 1, 1)
        if up:
            x = conv2d(x, weight.transpose(0, 1), stride=2, transpose=True)  # [N, O, 2H+1, 2W+1]
        else:
            x = conv2d(x, weight, padding=kh // 2)  # [N, O, H, W]
    if up:
        x = fir_filter2d(x, resample_filter, padding=1, gain=4.0)  # [N, O, 2H, 2W]
    if dcoefs is not None:
        dcoefs = dcoefs.reshape(n, out_ch, 1, 1)
        if noise is not None and _fast_paths:
            return torch.addcmul(noise.to(x.dtype), x, dcoefs)  # noise + x * dcoefs, one pass
        x = x * dcoefs
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x
