"""Building blocks of StyleGAN2: equalized-lr layers, FIR resampling, modulated convolution.

Pure PyTorch, no custom ops. Every resampling here is the reference's [1, 3, 3, 1] FIR filter; the
transposed/strided convolutions are arranged so a layer's output size equals the reference's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


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
    if bias is not None:
        x = x + bias.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
    if activation == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
    elif activation != "linear":
        raise ValueError(f"unknown activation {activation!r}")
    if gain != 1.0:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


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
    return F.conv2d(x, _depthwise(f, c, x.dtype, gain), padding=padding, groups=c)


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x upsampling: zero insertion followed by f with gain 4 (reference ``upfirdn2d.upsample2d``)."""
    c = x.shape[1]
    return F.conv_transpose2d(x, _depthwise(f, c, x.dtype, gain=4.0), stride=2, padding=1, groups=c)


def downsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Low-pass with f, then keep every second sample (reference ``upfirdn2d.downsample2d``)."""
    c = x.shape[1]
    return F.conv2d(x, _depthwise(f, c, x.dtype), stride=2, padding=1, groups=c)


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
            x = F.conv2d(x, w)
        elif self.down:
            # Reference conv2d_resample(down=2): low-pass padded by 2, then a valid stride-2 conv.
            x = fir_filter2d(x, self.resample_filter, padding=2)  # [N, I, H+1, W+1]
            x = F.conv2d(x, w, stride=2)  # [N, O, H/2, W/2]
        else:
            x = F.conv2d(x, w, padding=k // 2)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, self.activation, gain=self.act_gain * gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels}, out={self.out_channels}, k={self.kernel_size}, "
            f"activation={self.activation}, down={self.down}"
        )


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
    convolution over the whole batch and rescales the output (best when the batch is large). A test checks
    that they agree.
    """
    n, in_ch, _, _ = x.shape
    out_ch, in_ch_w, kh, kw = weight.shape
    if in_ch != in_ch_w or styles.shape != (n, in_ch):
        raise ValueError(f"modulated_conv2d: x {tuple(x.shape)}, weight {tuple(weight.shape)}, styles {tuple(styles.shape)}")
    weight = weight.to(x.dtype)
    styles = styles.to(x.dtype)

    dcoefs = None
    if demodulate:
        w = weight.unsqueeze(0) * styles.reshape(n, 1, in_ch, 1, 1)  # [N, O, I, k, k]
        dcoefs = (w.float().square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt().to(x.dtype)  # [N, O]

    if fused:
        w = weight.unsqueeze(0) * styles.reshape(n, 1, in_ch, 1, 1)  # [N, O, I, k, k]
        if dcoefs is not None:
            w = w * dcoefs.reshape(n, out_ch, 1, 1, 1)
        x = x.reshape(1, n * in_ch, *x.shape[2:])  # [1, N*I, H, W]
        if up:
            w = w.transpose(1, 2).reshape(n * in_ch, out_ch, kh, kw)  # [N*I, O, k, k]
            x = F.conv_transpose2d(x, w, stride=2, groups=n)  # [1, N*O, 2H+1, 2W+1]
        else:
            x = F.conv2d(x, w.reshape(n * out_ch, in_ch, kh, kw), padding=kh // 2, groups=n)
        x = x.reshape(n, out_ch, *x.shape[2:])  # [N, O, H', W']
    else:
        x = x * styles.reshape(n, in_ch, 1, 1)
        if up:
            x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)  # [N, O, 2H+1, 2W+1]
        else:
            x = F.conv2d(x, weight, padding=kh // 2)
    if up:
        if resample_filter is None:
            raise ValueError("modulated_conv2d(up=True) needs resample_filter")
        x = fir_filter2d(x, resample_filter, padding=1, gain=4.0)  # [N, O, 2H, 2W]
    if dcoefs is not None and not fused:
        x = x * dcoefs.reshape(n, out_ch, 1, 1)
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x
