"""Starting from another model's weights (transfer learning): what it means for the networks.

- ``start_from``: a run's freshly built G, D and G_ema take the source's weights. A source without classes
  can start a conditional run: G gains a class embedding (the first mapping layer reads [z, embed(c)]; its z
  columns are the source's, rescaled for the wider input, and its class columns start at zero, so G starts as
  the source for every class), and D gains its label mapping and a projection head (``b4.out``), fresh.
- ``freeze_discriminator_layers`` (FreezeD, Mo et al. 2020; the reference's ``--freezed``): the
  discriminator's first N layers, counted from the image (fromrgb, then each block's conv0, conv1 and skip),
  keep their weights. Their weight and bias become buffers, so no optimizer, gradient or all-reduce touches
  them while the state dict keeps the same names (a frozen run's checkpoint loads into any D).
"""

from __future__ import annotations

import math

import torch

from styleray.config import ModelConfig
from styleray.models.networks import Discriminator, Generator

EMBED_KEYS = ("mapping.embed.weight", "mapping.embed.bias")
FIRST_MAPPING_WEIGHT = "mapping.layers.0.weight"
PROJECTION_PREFIXES = ("mapping.", "b4.out.")  # D's parts that exist only with classes (or change shape)


def discriminator_layer_count(cfg: ModelConfig) -> int:
    """Layers FreezeD can freeze: fromrgb, then conv0, conv1 and skip per block (the epilogue never)."""
    return 1 + 3 * (cfg.log2_resolution - 2)


def discriminator_layers(D: Discriminator) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of D's block layers in FreezeD's order, from the image inwards."""
    layers = []
    for i, block in enumerate(D.blocks):
        for name in ("fromrgb", "conv0", "conv1", "skip"):
            if getattr(block, name) is not None:
                layers.append((f"blocks.{i}.{name}", getattr(block, name)))
    return layers


def freeze_discriminator_layers(D: Discriminator, n: int) -> list[str]:
    """Freeze D's first ``n`` layers (weights become buffers); returns their names. ValueError past the last."""
    layers = discriminator_layers(D)
    if not 0 <= n <= len(layers):
        raise ValueError(f"--freeze-d {n}: the discriminator at {D.img_resolution} px has {len(layers)} layers in its "
                         f"blocks (fromrgb, then conv0, conv1 and skip per block): use 0 to {len(layers)}")
    for _, layer in layers[:n]:
        for name in ("weight", "bias"):
            param = layer._parameters.get(name)
            if param is not None:
                delattr(layer, name)
                layer.register_buffer(name, param.detach())
    return [name for name, _ in layers[:n]]


def start_from(
    G: Generator, D: Discriminator, G_ema: Generator,
    source: dict[str, dict[str, torch.Tensor]],  # the source's "G", "D", "G_ema" state dicts
    source_cfg: ModelConfig,
) -> list[str]:
    """Load the source's weights into freshly built networks; returns what changed on the way (for the log).
    ValueError when the source does not fit (only the class embedding may be added)."""
    cfg = G.cfg
    states = {k: dict(source[k]) for k in ("G", "D", "G_ema")}
    notes = []
    if source_cfg.c_dim == 0 and cfg.c_dim > 0:
        states["G"] = with_class_embedding(states["G"], G.state_dict(), source_cfg)
        states["G_ema"] = with_class_embedding(states["G_ema"], G_ema.state_dict(), source_cfg)
        states["D"] = with_projection_head(states["D"], D.state_dict())
        notes.append(f"the source is unconditional and this run has {cfg.c_dim} classes: G gets a new class "
                     "embedding (its class columns start at zero, so G starts as the source for every class) and "
                     "D a new label mapping and projection head (mapping, b4.out)")
    elif source_cfg.c_dim != cfg.c_dim:
        raise ValueError(f"the source has {source_cfg.c_dim} classes, this run {cfg.c_dim}")
    for net, name in ((G, "G"), (D, "D"), (G_ema, "G_ema")):
        net.load_state_dict(states[name])
    return notes


def with_class_embedding(state: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], source_cfg: ModelConfig):
    """An unconditional G's state dict for a conditional G (``fresh``: its newly built state)."""
    out = dict(state)
    for key in EMBED_KEYS:
        out[key] = fresh[key]
    old, new = state[FIRST_MAPPING_WEIGHT], fresh[FIRST_MAPPING_WEIGHT]  # [w, z] and [w, z + embed]
    z = source_cfg.z_dim
    weight = torch.zeros_like(new)
    # The layer scales its weight by 1/sqrt(inputs): keep the z columns' effective weight as it was.
    weight[:, :z] = old.to(new.dtype) * math.sqrt(new.shape[1] / z)
    out[FIRST_MAPPING_WEIGHT] = weight
    return out


def with_projection_head(state: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An unconditional D's state dict for a conditional D: the label mapping and projection head fresh."""
    out = {k: v for k, v in state.items() if not k.startswith(PROJECTION_PREFIXES)}
    out.update({k: v for k, v in fresh.items() if k.startswith(PROJECTION_PREFIXES)})
    return out
