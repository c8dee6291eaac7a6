"""NVIDIA's networks, read as plain data by ``nvidia_pickle``, as styleray's: model configuration and state dicts.

    the file            {G, D, G_ema} persistent objects (plus augment_pipe and training_set_kwargs, if any)
    architecture        stylegan2-ada-pytorch's Generator (skip) and Discriminator (resnet); StyleGAN3, the
                        other architectures and other layer options are named and refused
    configuration       from the objects' attributes and init arguments: z_dim, w_dim, c_dim, img_resolution,
                        img_channels (G), the mapping depth, channel_base/channel_max/num_fp16_res/conv_clamp
                        (synthesis), the minibatch-std group and channels (D's epilogue)
    parameters          NVIDIA's names translated by the rules below (``mapping.fc3.weight`` ->
                        ``mapping.layers.3.weight``, ``synthesis.b64.conv0.noise_strength`` ->
                        ``synthesis.blocks.4.conv0.noise.strength``, ``b64.skip.weight`` -> ``blocks.2.skip.weight``
                        at 256 px, ...). Every tensor of the file lands on exactly one styleray tensor of the same
                        shape, or is a resampling-filter buffer checked to hold the [1, 3, 3, 1] filter styleray
                        builds in; every styleray tensor is filled. Anything else is an error naming it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from styleray.config import ModelConfig
from styleray.models.interop.nvidia_pickle import NetworkPickleError, PersistentObject
from styleray.models.layers import make_fir_filter
from styleray.models.networks import Discriminator, Generator, count_parameters

NETWORKS = ("G", "D", "G_ema")
STYLEGAN3_CLASSES = ("SynthesisInput",)  # networks_stylegan3.py: the Fourier-feature input of the alias-free G
FILTER = "resample_filter"  # NVIDIA keeps the FIR filter as a (persistent) buffer of every resampling layer

Rule = tuple[re.Pattern, Callable[[re.Match, ModelConfig], str | None]]


def _g_block(res: str, cfg: ModelConfig) -> int | None:
    """synthesis.b{res} -> synthesis.blocks[i]: 4 px is block 0."""
    r = int(res)
    return int(math.log2(r)) - 2 if r >= 4 and r & (r - 1) == 0 else None


def _d_block(res: str, cfg: ModelConfig) -> int | None:
    """D's b{res} (res > 4) -> blocks[i]: the image resolution is block 0."""
    r = int(res)
    return cfg.log2_resolution - int(math.log2(r)) if 4 < r <= cfg.resolution and r & (r - 1) == 0 else None


def _in_block(index: Callable[[str, ModelConfig], int | None], template: str):
    def translate(m: re.Match, cfg: ModelConfig) -> str | None:
        i = index(m["res"], cfg)
        return None if i is None else template.format(i=i, **m.groupdict())

    return translate


_MAPPING_RULES: list[Rule] = [
    (re.compile(r"mapping\.fc(?P<n>\d+)\.(?P<p>weight|bias)"), lambda m, c: f"mapping.layers.{m['n']}.{m['p']}"),
    (re.compile(r"mapping\.(?P<rest>embed\.(?:weight|bias)|w_avg)"), lambda m, c: f"mapping.{m['rest']}"),
]
G_RULES: list[Rule] = _MAPPING_RULES + [
    (re.compile(r"synthesis\.b(?P<res>\d+)\.const"), _in_block(_g_block, "synthesis.blocks.{i}.const")),
    (re.compile(r"synthesis\.b(?P<res>\d+)\.(?P<conv>conv[01])\.noise_strength"),
     _in_block(_g_block, "synthesis.blocks.{i}.{conv}.noise.strength")),
    (re.compile(r"synthesis\.b(?P<res>\d+)\.(?P<conv>conv[01])\.noise_const"),
     _in_block(_g_block, "synthesis.blocks.{i}.{conv}.noise.noise_const")),
    (re.compile(r"synthesis\.b(?P<res>\d+)\.(?P<rest>(?:conv[01]|torgb)\.(?:affine\.)?(?:weight|bias))"),
     _in_block(_g_block, "synthesis.blocks.{i}.{rest}")),
]
D_RULES: list[Rule] = _MAPPING_RULES + [
    (re.compile(r"b(?P<res>\d+)\.(?P<rest>(?:fromrgb|conv0|conv1|skip)\.(?:weight|bias))"),
     _in_block(_d_block, "blocks.{i}.{rest}")),
    (re.compile(r"b4\.(?P<rest>(?:conv|fc|out)\.(?:weight|bias))"), lambda m, c: f"b4.{m['rest']}"),
]


@dataclass(frozen=True)
class ImportedNetworks:
    """The content of a network pickle in styleray's terms."""

    model: ModelConfig
    states: dict[str, dict[str, torch.Tensor]]  # "G", "D", "G_ema" -> styleray state dict
    parameters: dict[str, int]  # trainable parameters of G and D (the figures NVIDIA's summary prints)
    augment_p: float | None  # the ADA probability of the snapshot's augment pipe, if it has one
    training_set: dict[str, Any] | None  # training_set_kwargs (dataset path, xflip, labels, ...), if any
    notes: tuple[str, ...] = ()  # what was noticed and not used (said in the import's log)


def convert_networks(content: Any, source: str = "the file") -> ImportedNetworks:
    """styleray's configuration and state dicts for the content of an NVIDIA network pickle
    (``nvidia_pickle.read_network_pickle``); NetworkPickleError naming ``source`` and the problem."""
    nets = _networks(content, source)
    for name in NETWORKS:
        check_architecture(nets[name], name, source)
    model = infer_model_config(nets["G_ema"], nets["D"], source)
    with torch.device("meta"):
        reference = {"G": Generator(model), "D": Discriminator(model)}
    states = {}
    for name in NETWORKS:
        expected = reference[name[0]].state_dict()
        states[name] = map_tensors(nets[name].tensors(), G_RULES if name[0] == "G" else D_RULES, expected, model,
                                   f"{source}: {name}")
    return ImportedNetworks(
        model=model,
        states=states,
        parameters={k: count_parameters(m) for k, m in reference.items()},
        augment_p=_augment_p(content.get("augment_pipe")),
        training_set=_plain_mapping(content.get("training_set_kwargs")),
        notes=tuple(_notes(nets, model)),
    )


def _networks(content: Any, source: str) -> dict[str, PersistentObject]:
    if not isinstance(content, dict):
        raise NetworkPickleError(f"{source} holds a {type(content).__name__}, not the dict of networks "
                                 "(G, D, G_ema) that stylegan2-ada-pytorch writes")
    missing = [k for k in NETWORKS if not isinstance(content.get(k), PersistentObject)]
    if missing:
        raise NetworkPickleError(f"{source} has no {', '.join(missing)} network (it holds: "
                                 f"{', '.join(map(str, content)) or 'nothing'}); a stylegan2-ada-pytorch snapshot "
                                 "holds G, D and G_ema")
    return {k: content[k] for k in NETWORKS}


# ---------------------------------------------------------------------------------------------------------
# Architecture and configuration
# ---------------------------------------------------------------------------------------------------------


def check_architecture(net: PersistentObject, name: str, source: str) -> None:
    """Refuse, by name, what styleray does not implement."""
    if any(obj.class_name in STYLEGAN3_CLASSES for _, obj in net.walk()):
        raise NetworkPickleError(f"{source}: {name} is a StyleGAN3 (alias-free, networks_stylegan3) generator: "
                                 "not supported; styleray implements StyleGAN2-ADA (config F)")
    expected = "Discriminator" if name == "D" else "Generator"
    if net.class_name != expected:
        raise NetworkPickleError(f"{source}: {name} is a {net.class_name}, not stylegan2-ada-pytorch's {expected}")
    if name == "D":
        _require(net.init_kwargs, "architecture", "resnet", f"{source}: D", "the 'resnet' discriminator")
        return
    synthesis, mapping = net.children().get("synthesis"), net.children().get("mapping")
    if not isinstance(synthesis, PersistentObject) or not isinstance(mapping, PersistentObject):
        raise NetworkPickleError(f"{source}: {name} has no mapping and synthesis networks")
    _require(synthesis.init_kwargs, "architecture", "skip", f"{source}: {name}.synthesis", "the 'skip' generator")
    kwargs = mapping.init_kwargs
    _require(kwargs, "lr_multiplier", 0.01, f"{source}: {name}.mapping", "mapping layers at lr_multiplier 0.01")
    _require(kwargs, "activation", "lrelu", f"{source}: {name}.mapping", "leaky ReLU mapping layers")
    for key in ("embed_features", "layer_features"):
        if kwargs.get(key) not in (None, net.attr("w_dim")):
            raise NetworkPickleError(f"{source}: {name}.mapping was built with {key}={kwargs[key]}; styleray's "
                                     "mapping layers are w_dim wide (not supported)")


def _require(kwargs: dict, key: str, value: Any, where: str, what: str) -> None:
    if key in kwargs and kwargs[key] != value:
        raise NetworkPickleError(f"{where} was built with {key}={kwargs[key]!r}; styleray implements {what} "
                                 "(not supported)")


def infer_model_config(G: PersistentObject, D: PersistentObject, source: str) -> ModelConfig:
    """The ModelConfig NVIDIA's G (its synthesis and mapping) and D were built with."""
    synthesis = G.children()["synthesis"].init_kwargs
    epilogue = D.children().get("b4")
    mbstd = epilogue.children().get("mbstd") if isinstance(epilogue, PersistentObject) else None
    if not isinstance(mbstd, PersistentObject):
        raise NetworkPickleError(f"{source}: D has no minibatch standard deviation layer (b4.mbstd); styleray's "
                                 "discriminator always has one (not supported)")
    if mbstd.attr("group_size") is None:
        raise NetworkPickleError(f"{source}: D's minibatch-std group is the whole minibatch (group_size=None); "
                                 "styleray needs a fixed group size (not supported)")
    values = dict(
        resolution=G.attr("img_resolution"), img_channels=G.attr("img_channels"), c_dim=G.attr("c_dim"),
        z_dim=G.attr("z_dim"), w_dim=G.attr("w_dim"), mapping_layers=G.children()["mapping"].attr("num_layers"),
        channel_base=synthesis.get("channel_base", 32768), channel_max=synthesis.get("channel_max", 512),
        num_fp16_res=synthesis.get("num_fp16_res", 0), mbstd_group=mbstd.attr("group_size"),
        mbstd_channels=mbstd.attr("num_channels", 1),
    )
    bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int)}
    if bad:
        raise NetworkPickleError(f"{source}: cannot read the configuration ({', '.join(f'{k}={v!r}' for k, v in bad.items())})")
    clamp = synthesis.get("conv_clamp")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float))):
        raise NetworkPickleError(f"{source}: cannot read the configuration (conv_clamp={clamp!r})")
    try:
        return ModelConfig(**values, conv_clamp=None if clamp is None else float(clamp))
    except ValueError as e:
        raise NetworkPickleError(f"{source}: the networks' configuration is not one styleray can build: {e}") from None


def _notes(nets: dict[str, PersistentObject], model: ModelConfig) -> list[str]:
    """Settings of D that styleray shares with G (one value for both): say when the file's differ."""
    notes = []
    d = nets["D"].init_kwargs
    for key, ours in (("num_fp16_res", model.num_fp16_res), ("conv_clamp", model.conv_clamp)):
        if key in d and d[key] != ours:
            notes.append(f"D was built with {key}={d[key]!r}, G with {ours!r}: styleray uses G's for both")
    return notes


# ---------------------------------------------------------------------------------------------------------
# Parameters and buffers
# ---------------------------------------------------------------------------------------------------------


def translate(name: str, rules: list[Rule], model: ModelConfig) -> str | None:
    """styleray's name for one of NVIDIA's tensor names, or None when no rule places it."""
    for pattern, target in rules:
        m = pattern.fullmatch(name)
        if m:
            return target(m, model)
    return None


def map_tensors(
    tensors: dict[str, torch.Tensor],  # NVIDIA's parameters and buffers by state_dict name
    rules: list[Rule],
    expected: dict[str, torch.Tensor],  # styleray's state dict (meta tensors: names and shapes)
    model: ModelConfig,
    where: str,  # "FILE: G", for the messages
) -> dict[str, torch.Tensor]:
    """styleray's state dict from NVIDIA's tensors; NetworkPickleError naming any tensor that does not fit."""
    fir = make_fir_filter()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name == FILTER or name.endswith("." + FILTER):
            if tensor.shape != fir.shape or not torch.allclose(tensor.float(), fir):
                raise NetworkPickleError(f"{where}.{name} is not the [1, 3, 3, 1] low-pass filter styleray uses "
                                         "(other resampling filters are not supported)")
            continue
        target = translate(name, rules, model)
        if target is None or target not in expected:
            raise NetworkPickleError(f"{where}.{name} has no counterpart in styleray's network "
                                     f"({'no rule places it' if target is None else f'{target} does not exist'})")
        if target in out:
            raise NetworkPickleError(f"{where}.{name} lands on {target}, which another tensor already filled")
        if tuple(tensor.shape) != tuple(expected[target].shape):
            raise NetworkPickleError(f"{where}.{name} has shape {list(tensor.shape)}, styleray's {target} "
                                     f"{list(expected[target].shape)} (for the configuration read from the file)")
        out[target] = tensor.detach().to(expected[target].dtype).contiguous()
    missing = sorted(set(expected) - set(out))
    if missing:
        raise NetworkPickleError(f"{where} lacks {len(missing)} tensor(s) styleray's network has: "
                                 f"{', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}")
    return out


def _augment_p(pipe: Any) -> float | None:
    if not isinstance(pipe, PersistentObject):
        return None
    p = pipe.own_tensors().get("p")
    return float(p) if isinstance(p, torch.Tensor) and p.numel() == 1 else None


def _plain_mapping(value: Any) -> dict[str, Any] | None:
    """training_set_kwargs with its plain values (text, numbers, switches, None)."""
    if not isinstance(value, dict):
        return None
    return {str(k): v for k, v in value.items() if v is None or isinstance(v, (str, int, float, bool))}
