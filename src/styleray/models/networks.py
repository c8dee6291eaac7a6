"""StyleGAN2 generator and discriminator (config F, as used by StyleGAN2-ADA).

One class per concept of the paper. Parameter counts equal NVIDIA's stylegan2-ada-pytorch at the same
configuration (a test asserts the exact figures), so checkpoints are the same size and capacity.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from styleray.config import ModelConfig
from styleray.models.layers import (
    LRELU_GAIN,
    Conv2dLayer,
    FullyConnectedLayer,
    bias_act,
    make_fir_filter,
    modulated_conv2d,
    normalize_2nd_moment,
    upsample2d,
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _reduced_dtype(enabled: bool, device: torch.device, kind: str) -> torch.dtype:
    """Reduced precision only on CUDA (fp32 on CPU, where bf16 convolutions are slower, not faster)."""
    if enabled and device.type == "cuda" and kind in _DTYPES:
        return _DTYPES[kind]
    return torch.float32


# ---------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------


class MappingNetwork(nn.Module):
    """z (+ class embedding) -> w, with a tracked average w for truncation."""

    def __init__(
        self,
        z_dim: int,  # Input latent dimensionality; 0 = no latent (the discriminator's label mapping).
        c_dim: int,  # Conditioning label dimensionality; 0 = unconditional.
        w_dim: int,  # Output dimensionality.
        num_ws: int | None,  # Broadcast w to this many layers; None = return [N, w_dim].
        num_layers: int = 8,  # Fully connected layers.
        lr_multiplier: float = 0.01,  # Learning rate multiplier of the layers.
        w_avg_beta: float | None = 0.995,  # Decay of the tracked average w; None = do not track.
    ):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        embed_features = w_dim if c_dim > 0 else 0
        self.embed = FullyConnectedLayer(c_dim, embed_features) if c_dim > 0 else None
        features = [z_dim + embed_features] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            FullyConnectedLayer(features[i], features[i + 1], activation="lrelu", lr_multiplier=lr_multiplier)
            for i in range(num_layers)
        )
        if w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor | None,  # [N, z_dim]
        c: torch.Tensor | None,  # [N, c_dim] one-hot (or soft) labels
        truncation_psi: float = 1.0,  # 1 = no truncation; 0 = every w is w_avg.
        truncation_cutoff: int | None = None,  # Truncate only the first this many layers; None = all.
        update_w_avg: bool = False,  # Track the average w (set by the training step).
    ) -> torch.Tensor:  # [N, num_ws, w_dim] (or [N, w_dim] if num_ws is None)
        parts = []
        if self.z_dim > 0:
            if z is None or z.shape[1:] != (self.z_dim,):
                raise ValueError(f"z must be [N, {self.z_dim}], got {None if z is None else tuple(z.shape)}")
            parts.append(normalize_2nd_moment(z.float()))
        if self.c_dim > 0:
            if c is None or c.shape[1:] != (self.c_dim,):
                raise ValueError(f"c must be [N, {self.c_dim}], got {None if c is None else tuple(c.shape)}")
            parts.append(normalize_2nd_moment(self.embed(c.float())))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for layer in self.layers:
            x = layer(x)
        if update_w_avg and self.w_avg_beta is not None:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is None:
            return x
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)  # [N, num_ws, w_dim]
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x = torch.cat([self.w_avg.lerp(x[:, :cutoff], truncation_psi), x[:, cutoff:]], dim=1)
        return x


class NoiseInjection(nn.Module):
    """Per-pixel Gaussian noise scaled by a learned strength; a fixed map for noise_mode='const'."""

    def __init__(self, resolution: int):  # resolution: side of the feature map the noise is added to
        super().__init__()
        self.resolution = resolution
        self.register_buffer("noise_const", torch.randn([resolution, resolution]))
        self.strength = nn.Parameter(torch.zeros([]))

    def forward(
        self, n: int, device: torch.device, noise_mode: str, generators: list[torch.Generator] | None = None
    ) -> torch.Tensor | None:
        if noise_mode == "none":
            return None
        if noise_mode == "random" and generators is not None:
            # One generator per sample: the same seed gets the same noise in any batch.
            size = [1, self.resolution, self.resolution]
            noise = torch.stack([torch.randn(size, generator=g, device=g.device) for g in generators]).to(device)
        elif noise_mode == "random":
            noise = torch.randn([n, 1, self.resolution, self.resolution], device=device)
        elif noise_mode == "const":
            noise = self.noise_const
        else:
            raise ValueError(f"noise_mode {noise_mode!r} must be one of const, random, none")
        return noise * self.strength


class ModulatedConv(nn.Module):
    """A synthesis layer: style affine, modulated 3x3 conv (optionally 2x up), noise, bias, lrelu."""

    def __init__(
        self,
        in_channels: int,  # Input channels.
        out_channels: int,  # Output channels.
        w_dim: int,  # Dimensionality of w.
        resolution: int,  # Output resolution.
        up: bool = False,  # Upsample 2x?
        conv_clamp: float | None = None,  # Clamp activations to +-this; None = no clamp.
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.conv_clamp = in_channels, out_channels, up, conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 3, 3]))  # [O, I, 3, 3]
        self.noise = NoiseInjection(resolution)
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("resample_filter", make_fir_filter(), persistent=False)
        self.fused = False  # grouped-conv path; set by Generator.set_fused_modconv

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random", generators=None):
        styles = self.affine(w)  # [N, I]
        noise = self.noise(x.shape[0], x.device, noise_mode, generators)
        x = modulated_conv2d(
            x, self.weight, styles, noise=noise, up=self.up, fused=self.fused, resample_filter=self.resample_filter
        )
        return bias_act(x, self.bias, "lrelu", gain=LRELU_GAIN, clamp=self.conv_clamp)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to image channels, no demodulation (the skip generator's output branch)."""

    def __init__(self, in_channels: int, img_channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn([img_channels, in_channels, 1, 1]))  # [C, I, 1, 1]
        self.bias = nn.Parameter(torch.zeros([img_channels]))
        self.weight_gain = 1.0 / math.sqrt(in_channels)
        self.fused = False

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain  # [N, I]
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=self.fused)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: (const | up-conv) -> conv -> ToRGB, skip architecture."""

    def __init__(
        self,
        in_channels: int,  # Channels of the previous block; 0 = first block (learned constant).
        out_channels: int,  # Channels of this block.
        w_dim: int,  # Dimensionality of w.
        resolution: int,  # Resolution of this block.
        img_channels: int,  # Image channels.
        use_reduced_precision: bool = False,  # Run in bf16/fp16 on CUDA?
        precision: str = "bf16",  # Which reduced precision.
        conv_clamp: float | None = None,  # Clamp activations; None = no clamp.
    ):
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        self.use_reduced_precision, self.precision = use_reduced_precision, precision
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
            self.conv0 = None
        else:
            self.conv0 = ModulatedConv(in_channels, out_channels, w_dim, resolution, up=True, conv_clamp=conv_clamp)
        self.conv1 = ModulatedConv(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGB(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.register_buffer("resample_filter", make_fir_filter(), persistent=False)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1

    def forward(
        self,
        x: torch.Tensor | None,  # [N, I, res/2, res/2] or None for the first block
        img: torch.Tensor | None,  # [N, C, res/2, res/2] running image or None
        ws: torch.Tensor,  # [N, num_conv + num_torgb, w_dim]
        noise_mode: str = "random",
        generators: list[torch.Generator] | None = None,  # per-sample noise RNGs for noise_mode="random"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = ws.shape[0]
        dtype = _reduced_dtype(self.use_reduced_precision, ws.device, self.precision)
        w_iter: Iterator[torch.Tensor] = iter(ws.unbind(dim=1))
        if self.conv0 is None:
            x = self.const.to(dtype).unsqueeze(0).expand(n, -1, -1, -1)  # [N, O, 4, 4]
            x = self.conv1(x, next(w_iter), noise_mode, generators)
        else:
            x = x.to(dtype)
            x = self.conv0(x, next(w_iter), noise_mode, generators)
            x = self.conv1(x, next(w_iter), noise_mode, generators)
        if img is not None:
            img = upsample2d(img, self.resample_filter)  # [N, C, res, res]
        y = self.torgb(x, next(w_iter)).float()
        img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """w [N, num_ws, w_dim] -> image [N, C, res, res] in about [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_dim, self.resolution, self.img_channels = cfg.w_dim, cfg.resolution, cfg.img_channels
        self.block_resolutions = [2**i for i in range(2, cfg.log2_resolution + 1)]
        fp16_resolution = max(2 ** (cfg.log2_resolution + 1 - cfg.num_fp16_res), 8)
        self.blocks = nn.ModuleList()
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(
                in_channels=cfg.channels_at(res // 2) if res > 4 else 0,
                out_channels=cfg.channels_at(res),
                w_dim=cfg.w_dim,
                resolution=res,
                img_channels=cfg.img_channels,
                use_reduced_precision=cfg.num_fp16_res > 0 and cfg.mixed_precision != "off" and res >= fp16_resolution,
                precision=cfg.mixed_precision,
                conv_clamp=cfg.conv_clamp,
            )
            self.blocks.append(block)
            self.num_ws += block.num_conv
        self.num_ws += self.blocks[-1].num_torgb

    def forward(
        self, ws: torch.Tensor, noise_mode: str = "random", generators: list[torch.Generator] | None = None
    ) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        x = img = None
        w_idx = 0
        for block in self.blocks:
            # A block's ToRGB shares its w with the next block's first conv (reference layout).
            x, img = block(x, img, ws[:, w_idx : w_idx + block.num_conv + block.num_torgb], noise_mode, generators)
            w_idx += block.num_conv
        return img


class Generator(nn.Module):
    """The StyleGAN2 generator: mapping network followed by synthesis network."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.z_dim, self.c_dim, self.w_dim = cfg.z_dim, cfg.c_dim, cfg.w_dim
        self.img_resolution, self.img_channels = cfg.resolution, cfg.img_channels
        self.synthesis = SynthesisNetwork(cfg)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(cfg.z_dim, cfg.c_dim, cfg.w_dim, self.num_ws, num_layers=cfg.mapping_layers)

    def forward(
        self,
        z: torch.Tensor,  # [N, z_dim]
        c: torch.Tensor | None = None,  # [N, c_dim]
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: str = "random",
        update_w_avg: bool = False,
    ) -> torch.Tensor:  # [N, C, res, res]
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff, update_w_avg=update_w_avg)
        return self.synthesis(ws, noise_mode=noise_mode)

    def set_fused_modconv(self, fused: bool) -> None:
        """Grouped-conv modulation (fast for inference at small batch) or scale-conv-scale (training)."""
        for m in self.modules():
            if isinstance(m, (ModulatedConv, ToRGB)):
                m.fused = fused


# ---------------------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------------------


class DiscriminatorBlock(nn.Module):
    """One resolution of the residual discriminator: (FromRGB) -> conv -> conv down, plus a 1x1 skip down."""

    def __init__(
        self,
        in_channels: int,  # Channels from the previous block; 0 = first block (reads the image).
        tmp_channels: int,  # Channels of this block's first conv.
        out_channels: int,  # Channels passed to the next block.
        img_channels: int,  # Image channels.
        use_reduced_precision: bool = False,
        precision: str = "bf16",
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.use_reduced_precision, self.precision = use_reduced_precision, precision
        self.fromrgb = (
            Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu", conv_clamp=conv_clamp)
            if in_channels == 0
            else None
        )
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=True, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor) -> torch.Tensor:
        dtype = _reduced_dtype(self.use_reduced_precision, img.device, self.precision)
        if self.fromrgb is not None:
            x = self.fromrgb(img.to(dtype))  # [N, T, res, res]
        else:
            x = x.to(dtype)
        y = self.skip(x, gain=math.sqrt(0.5))  # [N, O, res/2, res/2]
        x = self.conv0(x)
        x = self.conv1(x, gain=math.sqrt(0.5))
        return y + x


class MinibatchStd(nn.Module):
    """Append the standard deviation of features over groups of samples as extra channels."""

    def __init__(self, group_size: int, num_channels: int = 1):  # group_size: samples per group
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, C + F, H, W]
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        f = self.num_channels
        if n % g != 0:
            raise ValueError(f"minibatch std: batch {n} is not divisible by group size {g}")
        # Sample i belongs to group i % (n // g), as in the reference.
        y = x.reshape(g, -1, f, c // f, h, w)  # [G, n, F, c, H, W]
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()  # [n, F, c, H, W]
        y = y.mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1)  # [n, F, 1, 1]
        y = y.repeat(g, 1, h, w)  # [N, F, H, W]
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: minibatch std, conv, fully connected, output (projected onto the label embedding if any)."""

    def __init__(self, in_channels: int, cmap_dim: int, mbstd_group: int, mbstd_channels: int, conv_clamp=None):
        super().__init__()
        self.cmap_dim = cmap_dim
        self.mbstd = MinibatchStd(mbstd_group, mbstd_channels)
        self.conv = Conv2dLayer(in_channels + mbstd_channels, in_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * 4 * 4, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:  # [N, I, 4, 4] -> [N, 1]
        x = x.float()
        x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)  # [N, 1] or [N, cmap_dim]
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1.0 / math.sqrt(self.cmap_dim))  # projection
        return x


class Discriminator(nn.Module):
    """The StyleGAN2 residual discriminator with projection conditioning."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.c_dim, self.img_resolution, self.img_channels = cfg.c_dim, cfg.resolution, cfg.img_channels
        self.block_resolutions = [2**i for i in range(cfg.log2_resolution, 2, -1)]
        fp16_resolution = max(2 ** (cfg.log2_resolution + 1 - cfg.num_fp16_res), 8)
        self.blocks = nn.ModuleList()
        for res in self.block_resolutions:
            self.blocks.append(
                DiscriminatorBlock(
                    in_channels=cfg.channels_at(res) if res < cfg.resolution else 0,
                    tmp_channels=cfg.channels_at(res),
                    out_channels=cfg.channels_at(res // 2),
                    img_channels=cfg.img_channels,
                    use_reduced_precision=cfg.num_fp16_res > 0 and cfg.mixed_precision != "off" and res >= fp16_resolution,
                    precision=cfg.mixed_precision,
                    conv_clamp=cfg.conv_clamp,
                )
            )
        cmap_dim = cfg.channels_at(4) if cfg.c_dim > 0 else 0
        self.mapping = (
            MappingNetwork(0, cfg.c_dim, cmap_dim, num_ws=None, w_avg_beta=None) if cfg.c_dim > 0 else None
        )
        self.b4 = DiscriminatorEpilogue(cfg.channels_at(4), cmap_dim, cfg.mbstd_group, cfg.mbstd_channels, cfg.conv_clamp)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:  # [N, C, H, W] -> [N, 1]
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if img.ndim != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(f"images must be [N, {', '.join(map(str, expected))}], got {tuple(img.shape)}")
        x = None
        for block in self.blocks:
            x = block(x, img)
        cmap = self.mapping(None, c) if self.mapping is not None else None
        return self.b4(x, cmap)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (what the reference's summary tables count)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@contextlib.contextmanager
def requires_grad(module: nn.Module, flag: bool):
    """Temporarily set requires_grad on every parameter of a module."""
    prev = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), prev):
            p.requires_grad_(f)
