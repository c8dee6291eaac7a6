"""A fixture writer: network pickles with the structure of NVIDIA's stylegan2-ada-pytorch snapshots, made from
styleray networks.

Written from the format NVIDIA documents in its repository (torch_utils/persistence.py: every network object
pickled as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta`` = type, version 6,
module_src, class_name and the module's ``__dict__``; training/networks.py: the class names, the
``torch.nn.Module`` state, parameter and buffer names, attributes and init arguments; training_loop.py: the
snapshot dict), none of NVIDIA's code. Tensors are pickled by torch itself, as NVIDIA's ``pickle.dump`` does.
``module_src`` is a script that records that it ran (``MARKER`` file): an importer that executes it fails the
tests.

    snap = snapshot(G, D, G_ema, augment_p=0.25)      # plain data (Persistent trees); edit it for bad input
    data = dump(snap)                                 # the pickle's bytes
"""

from __future__ import annotations

import collections
import contextlib
import math
import pickle
import sys
import types
from typing import Any

import numpy as np
import torch

PERSISTENCE_VERSION = 6
MODULE_SRC = "import pathlib\npathlib.Path({marker!r}).write_text('module_src was executed')\n"


class Persistent:
    """An object as NVIDIA's persistence decorator pickles it."""

    def __init__(self, class_name: str, state: dict[str, Any], module_src: str = ""):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = dict(type="class", version=PERSISTENCE_VERSION, module_src=self.module_src,
                    class_name=self.class_name, state=self.state)
        return (_persistence.module._reconstruct_persistent_obj, (meta,))

    def child(self, path: str) -> "Persistent":
        obj = self
        for name in path.split("."):
            obj = obj.state["_modules"][name]
        return obj


class _Names:
    """Modules registered under NVIDIA's names only while dumping, so pickle writes NVIDIA's globals."""

    def __init__(self, name: str, **attrs: Any):
        self.name, self.attrs = name, attrs
        self.module = types.ModuleType(name)
        for key, value in attrs.items():
            value.__module__, value.__qualname__ = name, key
            setattr(self.module, key, value)


def _never_called(meta):  # the importer must not call anything of the file's: it has its own stand-in
    raise AssertionError("the fixture's reconstruct function was called")


class EasyDict(dict):
    pass


_persistence = _Names("torch_utils.persistence", _reconstruct_persistent_obj=_never_called)
_dnnlib = _Names("dnnlib.util", EasyDict=EasyDict)


@contextlib.contextmanager
def nvidia_names(*extra: _Names):
    saved: dict[str, Any] = {}
    for names in (_persistence, _dnnlib, *extra):
        parts = names.name.split(".")
        for i in range(1, len(parts)):  # parent packages, so that pickle can import the dotted name
            parent = ".".join(parts[:i])
            if parent not in saved:
                saved[parent] = sys.modules.get(parent)
                sys.modules[parent] = types.ModuleType(parent)
        saved[names.name] = sys.modules.get(names.name)
        sys.modules[names.name] = names.module
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def dump(obj: Any, *extra: _Names) -> bytes:
    with nvidia_names(*extra):
        return pickle.dumps(obj, protocol=4)


def random_networks(cfg, seed: int = 0):
    """styleray's G, D and G_ema with every saved tensor random (noise strengths, noise maps and w_avg too, not
    only what the constructors randomise), so that a tensor in the wrong place changes the results."""
    from styleray.models.networks import Discriminator, Generator

    torch.manual_seed(seed)
    nets = Generator(cfg), Discriminator(cfg), Generator(cfg)
    with torch.no_grad():
        for net in nets:
            for t in net.state_dict().values():  # shares memory with the network's tensors
                t.add_(torch.randn_like(t) * 0.1)
    return nets


# ---------------------------------------------------------------------------------------------------------
# The torch.nn.Module state NVIDIA's classes pickle
# ---------------------------------------------------------------------------------------------------------


def module_state(
    *, params: dict | None = None, buffers: dict | None = None, modules: dict | None = None,
    attrs: dict | None = None, args: tuple = (), kwargs: dict | None = None,
) -> dict[str, Any]:
    """A module's __dict__: torch's bookkeeping, parameters (frozen, as in a snapshot), buffers, submodules,
    plain attributes, and the persistence decorator's _init_args/_init_kwargs."""
    hooks = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
             "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
             "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
             "_load_state_dict_post_hooks")
    state: dict[str, Any] = {"training": False}
    state["_parameters"] = {k: None if v is None else torch.nn.Parameter(v.detach().clone(), requires_grad=False)
                            for k, v in (params or {}).items()}
    state["_buffers"] = {k: v.detach().clone() for k, v in (buffers or {}).items()}
    state["_non_persistent_buffers_set"] = set()
    state.update({h: collections.OrderedDict() for h in hooks})
    state["_is_full_backward_hook"] = None
    state["_modules"] = dict(modules or {})
    state.update(attrs or {})
    state["_init_args"] = tuple(args)
    state["_init_kwargs"] = EasyDict(kwargs or {})
    return state


def _filter() -> torch.Tensor:
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = torch.outer(f, f)
    return f / f.sum()


def _gain(fan_in: float) -> np.float64:
    return np.float64(1 / np.sqrt(fan_in))


LRELU_GAIN = np.float64(np.sqrt(2))


def fc(layer, *, src: str, activation: str = "linear", lr_multiplier: float = 1, bias_init: float = 0) -> Persistent:
    kwargs = {**({"activation": activation} if activation != "linear" else {}),
              **({"lr_multiplier": lr_multiplier} if lr_multiplier != 1 else {}),
              **({"bias_init": bias_init} if bias_init != 0 else {})}
    return Persistent("FullyConnectedLayer", module_state(
        params={"weight": layer.weight, "bias": layer.bias},
        attrs={"activation": activation, "weight_gain": np.float64(lr_multiplier / np.sqrt(layer.in_features)),
               "bias_gain": lr_multiplier},
        args=(layer.in_features, layer.out_features), kwargs=kwargs), src)


def conv(layer, *, src: str, **kwargs) -> Persistent:
    """Conv2dLayer; trainable=False keeps weight and bias as buffers (NVIDIA's FreezeD). A layer without
    bias has ``bias = None`` as a plain attribute."""
    tensors = {"weight": layer.weight, **({"bias": layer.bias} if layer.bias is not None else {})}
    k, trainable = layer.kernel_size, kwargs.get("trainable", True)
    return Persistent("Conv2dLayer", module_state(
        params=tensors if trainable else {},
        buffers={"resample_filter": _filter(), **({} if trainable else tensors)},
        attrs={**({"bias": None} if layer.bias is None else {}), "activation": layer.activation, "up": 1,
               "down": 2 if layer.down else 1, "conv_clamp": layer.conv_clamp, "padding": k // 2,
               "weight_gain": _gain(layer.in_channels * k * k), "act_gain": LRELU_GAIN if layer.activation == "lrelu" else 1},
        args=(layer.in_channels, layer.out_channels), kwargs={"kernel_size": k, **kwargs}), src)


def mapping(m, *, src: str, num_ws: int | None, w_avg_beta: float | None = 0.995, depth_kwarg: bool = True) -> Persistent:
    modules = {"embed": fc(m.embed, src=src)} if m.embed is not None else {}
    for i, layer in enumerate(m.layers):
        modules[f"fc{i}"] = fc(layer, src=src, activation="lrelu", lr_multiplier=0.01)
    kwargs = {"z_dim": m.z_dim, "c_dim": m.c_dim, "w_dim": m.w_dim, "num_ws": num_ws,
              **({"num_layers": m.num_layers} if depth_kwarg else {})}
    if w_avg_beta is None:
        kwargs["w_avg_beta"] = None
    return Persistent("MappingNetwork", module_state(
        buffers={"w_avg": m.w_avg} if num_ws is not None else {}, modules=modules,
        attrs={"z_dim": m.z_dim, "c_dim": m.c_dim, "w_dim": m.w_dim, "num_ws": num_ws, "num_layers": m.num_layers,
               "w_avg_beta": w_avg_beta},
        kwargs=kwargs), src)


# ---------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------


def synthesis_layer(mc, *, src: str, w_dim: int, resolution: int, up: int, conv_clamp) -> Persistent:
    out_ch, in_ch = mc.weight.shape[:2]
    return Persistent("SynthesisLayer", module_state(
        params={"weight": mc.weight, "noise_strength": mc.noise.strength, "bias": mc.bias},
        buffers={"resample_filter": _filter(), "noise_const": mc.noise.noise_const},
        modules={"affine": fc(mc.affine, src=src, bias_init=1)},
        attrs={"resolution": resolution, "up": up, "use_noise": True, "activation": "lrelu",
               "conv_clamp": conv_clamp, "padding": 1, "act_gain": LRELU_GAIN},
        args=(in_ch, out_ch),
        kwargs={"w_dim": w_dim, "resolution": resolution,
                **({"up": up, "resample_filter": [1, 3, 3, 1]} if up != 1 else {}),
                "conv_clamp": conv_clamp, "channels_last": False}), src)


def synthesis_block(block, *, src: str, cfg, is_last: bool, use_fp16: bool) -> Persistent:
    res, clamp = block.resolution, cfg.conv_clamp
    modules = {}
    if block.conv0 is not None:
        modules["conv0"] = synthesis_layer(block.conv0, src=src, w_dim=cfg.w_dim, resolution=res, up=2, conv_clamp=clamp)
    modules["conv1"] = synthesis_layer(block.conv1, src=src, w_dim=cfg.w_dim, resolution=res, up=1, conv_clamp=clamp)
    rgb = block.torgb
    modules["torgb"] = Persistent("ToRGBLayer", module_state(
        params={"weight": rgb.weight, "bias": rgb.bias}, modules={"affine": fc(rgb.affine, src=src, bias_init=1)},
        attrs={"conv_clamp": clamp, "weight_gain": _gain(rgb.weight.shape[1])},
        args=(rgb.weight.shape[1], cfg.img_channels), kwargs={"w_dim": cfg.w_dim, "conv_clamp": clamp,
                                                             "channels_last": False}), src)
    out_ch = block.conv1.weight.shape[0]
    return Persistent("SynthesisBlock", module_state(
        params={"const": block.const} if block.conv0 is None else {}, buffers={"resample_filter": _filter()},
        modules=modules,
        attrs={"in_channels": block.in_channels, "w_dim": cfg.w_dim, "resolution": res, "img_channels": cfg.img_channels,
               "is_last": is_last, "architecture": "skip", "use_fp16": use_fp16, "channels_last": False,
               "num_conv": block.num_conv, "num_torgb": 1},
        args=(block.in_channels, out_ch),
        kwargs={"w_dim": cfg.w_dim, "resolution": res, "img_channels": cfg.img_channels, "is_last": is_last,
                "use_fp16": use_fp16, "conv_clamp": clamp}), src)


def generator(G, *, src: str = "") -> Persistent:
    cfg = G.cfg
    log2 = int(math.log2(cfg.resolution))
    fp16_res = max(2 ** (log2 + 1 - cfg.num_fp16_res), 8)
    synthesis_kwargs = {"channel_base": cfg.channel_base, "channel_max": cfg.channel_max,
                        "num_fp16_res": cfg.num_fp16_res, "conv_clamp": cfg.conv_clamp}
    blocks = {f"b{b.resolution}": synthesis_block(b, src=src, cfg=cfg, is_last=b.resolution == cfg.resolution,
                                                  use_fp16=b.resolution >= fp16_res)
              for b in G.synthesis.blocks}
    synthesis = Persistent("SynthesisNetwork", module_state(
        modules=blocks,
        attrs={"w_dim": cfg.w_dim, "img_resolution": cfg.resolution, "img_resolution_log2": log2,
               "img_channels": cfg.img_channels, "block_resolutions": [b.resolution for b in G.synthesis.blocks],
               "num_ws": G.num_ws},
        kwargs={"w_dim": cfg.w_dim, "img_resolution": cfg.resolution, "img_channels": cfg.img_channels,
                **synthesis_kwargs}), src)
    common = {"c_dim": cfg.c_dim, "img_resolution": cfg.resolution, "img_channels": cfg.img_channels}
    return Persistent("Generator", module_state(
        modules={"synthesis": synthesis, "mapping": mapping(G.mapping, src=src, num_ws=G.num_ws)},
        attrs={"z_dim": cfg.z_dim, "c_dim": cfg.c_dim, "w_dim": cfg.w_dim, "img_resolution": cfg.resolution,
               "img_channels": cfg.img_channels, "num_ws": G.num_ws},
        kwargs={"z_dim": cfg.z_dim, "w_dim": cfg.w_dim, "mapping_kwargs": EasyDict(num_layers=cfg.mapping_layers),
                "synthesis_kwargs": EasyDict(synthesis_kwargs), **common}), src)


# ---------------------------------------------------------------------------------------------------------
# Discriminator, augment pipe, snapshot
# ---------------------------------------------------------------------------------------------------------


def discriminator_block(block, *, src: str, cfg, res: int, first: int, freeze: int, use_fp16: bool) -> Persistent:
    names = (["fromrgb"] if block.fromrgb is not None else []) + ["conv0", "conv1", "skip"]
    down = {"down": 2}
    layer_kwargs = {
        "fromrgb": dict(activation="lrelu", conv_clamp=cfg.conv_clamp),
        "conv0": dict(activation="lrelu", conv_clamp=cfg.conv_clamp),
        "conv1": dict(activation="lrelu", **down, resample_filter=[1, 3, 3, 1], conv_clamp=cfg.conv_clamp),
        "skip": dict(bias=False, **down, resample_filter=[1, 3, 3, 1]),
    }
    modules = {}
    for i, name in enumerate(names):
        kwargs = dict(layer_kwargs[name])
        kwargs["trainable"] = first + i >= freeze
        modules[name] = conv(getattr(block, name), src=src, **kwargs, channels_last=False)
    tmp, out = block.conv0.in_channels, block.conv1.out_channels
    return Persistent("DiscriminatorBlock", module_state(
        buffers={"resample_filter": _filter()}, modules=modules,
        attrs={"in_channels": block.in_channels, "resolution": res, "img_channels": cfg.img_channels,
               "first_layer_idx": first, "architecture": "resnet", "use_fp16": use_fp16, "channels_last": False,
               "num_layers": len(names)},
        args=(block.in_channels, tmp, out),
        kwargs={"resolution": res, "first_layer_idx": first, "use_fp16": use_fp16,
                **({"freeze_layers": freeze} if freeze else {}), "img_channels": cfg.img_channels, "architecture": "resnet", "conv_clamp": cfg.conv_clamp}), src)


def discriminator(D, *, src: str = "", freeze: int = 0) -> Persistent:
    cfg = D.cfg
    log2 = int(math.log2(cfg.resolution))
    fp16_res = max(2 ** (log2 + 1 - cfg.num_fp16_res), 8)
    modules, first = {}, 0
    for block, res in zip(D.blocks, D.block_resolutions):
        modules[f"b{res}"] = discriminator_block(block, src=src, cfg=cfg, res=res, first=first, freeze=freeze,
                                                 use_fp16=res >= fp16_res)
        first += modules[f"b{res}"].state["num_layers"]
    if D.mapping is not None:
        modules["mapping"] = mapping(D.mapping, src=src, num_ws=None, w_avg_beta=None, depth_kwarg=False)
    ep = D.b4
    cmap_dim = ep.cmap_dim
    modules["b4"] = Persistent("DiscriminatorEpilogue", module_state(
        modules={"mbstd": Persistent("MinibatchStdLayer", module_state(
                     attrs={"group_size": cfg.mbstd_group, "num_channels": cfg.mbstd_channels},
                     kwargs={"group_size": cfg.mbstd_group, "num_channels": cfg.mbstd_channels}), src),
                 "conv": conv(ep.conv, src=src, activation="lrelu", conv_clamp=cfg.conv_clamp),
                 "fc": fc(ep.fc, src=src, activation="lrelu"), "out": fc(ep.out, src=src)},
        attrs={"in_channels": ep.conv.out_channels, "cmap_dim": cmap_dim, "resolution": 4,
               "img_channels": cfg.img_channels, "architecture": "resnet"},
        args=(ep.conv.out_channels,),
        kwargs={"cmap_dim": cmap_dim, "resolution": 4, "mbstd_group_size": cfg.mbstd_group,
                "img_channels": cfg.img_channels, "architecture": "resnet", "conv_clamp": cfg.conv_clamp}), src)
    return Persistent("Discriminator", module_state(
        modules=modules,
        attrs={"c_dim": cfg.c_dim, "img_resolution": cfg.resolution, "img_resolution_log2": log2,
               "img_channels": cfg.img_channels, "block_resolutions": list(D.block_resolutions)},
        kwargs={"c_dim": cfg.c_dim, "img_resolution": cfg.resolution, "img_channels": cfg.img_channels,
                "channel_base": cfg.channel_base, "channel_max": cfg.channel_max, "num_fp16_res": cfg.num_fp16_res,
                "conv_clamp": cfg.conv_clamp, "block_kwargs": EasyDict(freeze_layers=freeze) if freeze else EasyDict(),
                "mapping_kwargs": EasyDict(), "epilogue_kwargs": EasyDict(mbstd_group_size=cfg.mbstd_group)}), src)


BGC = dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, brightness=1, contrast=1, lumaflip=1,
           hue=1, saturation=1)
AUGMENT_DEFAULTS = dict(xint_max=0.125, scale_std=0.2, rotate_max=1.0, aniso_std=0.2, xfrac_std=0.125,
                        brightness_std=0.2, contrast_std=0.5, hue_max=1.0, saturation_std=1.0, imgfilter=0.0,
                        imgfilter_bands=[1, 1, 1, 1], imgfilter_std=1.0, noise=0.0, cutout=0.0, noise_std=0.1,
                        cutout_size=0.5)


def augment_pipe(p: float, *, src: str = "") -> Persistent:
    gen = torch.Generator().manual_seed(0)
    return Persistent("AugmentPipe", module_state(
        buffers={"p": torch.tensor(float(p)), "Hz_geom": torch.randn(12, generator=gen),
                 "Hz_fbank": torch.randn(4, 43, generator=gen)},
        attrs={**{k: float(v) for k, v in BGC.items()}, **AUGMENT_DEFAULTS}, kwargs=dict(BGC)), src)


def snapshot(G, D, G_ema, *, augment_p: float | None = 0.25, marker: str = "/nonexistent/never-written",
             freeze: int = 0, training_set: dict | None = None) -> dict[str, Any]:
    """The dict NVIDIA's training loop pickles: training_set_kwargs, G, D, G_ema, augment_pipe."""
    src = MODULE_SRC.format(marker=str(marker))
    snap: dict[str, Any] = {"training_set_kwargs": dict(training_set or {
        "class_name": "training.dataset.ImageFolderDataset", "path": "/data/heroes.zip", "use_labels": G.c_dim > 0,
        "max_size": 1000, "xflip": True, "resolution": G.img_resolution})}
    snap["G"] = generator(G, src=src)
    snap["D"] = discriminator(D, src=src, freeze=freeze)
    snap["G_ema"] = generator(G_ema, src=src)
    snap["augment_pipe"] = augment_pipe(augment_p, src=src) if augment_p is not None else None
    return snap


def tf_era_pickle() -> bytes:
    """What StyleGAN2(-ADA) in TensorFlow wrote: a tuple (G, D, Gs) of dnnlib.tflib.network.Network objects."""

    class Network:
        def __init__(self, name):
            self.name = name

        def __reduce__(self):
            return (Network, (self.name,), {"version": 4, "name": self.name, "build_module_src": "", "variables": []})

    names = _Names("dnnlib.tflib.network", Network=Network)
    return dump((Network("G"), Network("D"), Network("Gs")), names)
