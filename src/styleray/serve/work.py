"""The model work of the sampler replicas: plain functions that run on the model thread (see scheduler).

Heavy requests are split here into a plan (their ws: cheap, the mapping network) and chunks of
``sampling.CHUNK`` rows through the synthesis network. ``sampling.synthesize`` always runs the network on
chunks of exactly that many rows, so a chunk computed on its own gives the same bytes as the whole
request computed at once.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from styleray.serve.loading import LoadedModel
from styleray.serve.schemas import InvalidRequest, MixRequest, MorphRequest, SampleRequest, Sampling


def check_sampling(G: Any, s: Sampling) -> None:
    """Model-dependent checks (the ingress already checked the static bounds)."""
    if G.c_dim == 0 and s.class_idx is not None:
        raise InvalidRequest(f"class={s.class_idx}: this generator is unconditional; omit class")
    if G.c_dim > 0 and s.class_idx is None:
        raise InvalidRequest(f"class: this generator is conditional; give class in [0, {G.c_dim - 1}]")
    if G.c_dim > 0 and not 0 <= s.class_idx < G.c_dim:
        raise InvalidRequest(f"class={s.class_idx} is out of range: this generator has classes 0-{G.c_dim - 1}")


def check_layers(G: Any, layers: tuple[int, ...] | None) -> None:
    bad = [i for i in layers or () if i >= G.num_ws]
    if bad:
        raise InvalidRequest(f"layers {bad} out of range: this generator has layers 0-{G.num_ws - 1}")


def sample_group(items: list[tuple[LoadedModel, SampleRequest]]) -> list[Any]:
    """One image per request: ``(image, requests of its model in this call)``. Requests sharing a model and
    sampling settings run as one batch; the network never sees two models in one call. A request the model
    rejects gets its exception back instead of failing the others."""
    groups: dict[tuple[int, Sampling], list[int]] = defaultdict(list)
    per_model: dict[int, int] = defaultdict(int)
    for i, (model, req) in enumerate(items):
        groups[(id(model), req.sampling)].append(i)
        per_model[id(model)] += 1
    out: list[Any] = [None] * len(items)
    for (key, sampling), idx in groups.items():
        model = items[idx[0]][0]
        try:
            check_sampling(model.G, sampling)
            images = generate(model, [items[i][1].seed for i in idx], sampling)
        except InvalidRequest as e:
            for i in idx:
                out[i] = e
            continue
        for k, i in enumerate(idx):
            out[i] = (images[k], per_model[key])
    return out


def generate(model: LoadedModel, seeds: list[int], s: Sampling) -> np.ndarray:
    import torch

    from styleray.models.sampling import generate_images

    with torch.inference_mode():
        return generate_images(model.G, seeds, truncation_psi=s.truncation, class_idx=s.class_idx, noise_mode=s.noise)


# -- heavy requests: a plan of ws, then chunks --------------------------------------------------------------


def seeds_ws(model: LoadedModel, seeds: list[int], s: Sampling):
    import torch

    from styleray.models.sampling import seeds_to_ws

    with torch.inference_mode():
        return seeds_to_ws(model.G, seeds, s.truncation, class_idx=s.class_idx)


def morph_ws(model: LoadedModel, req: MorphRequest):
    import torch

    from styleray.models.sampling import morph_ws as plan

    s = req.sampling
    with torch.inference_mode():
        return plan(model.G, list(req.seeds), req.steps, req.space, req.loop, s.truncation, s.class_idx)


def mix_ws(model: LoadedModel, req: MixRequest):
    """(ws of the row then column seeds, mixed ws of the cells), see ``sampling.style_mix_ws``."""
    import torch

    from styleray.models.sampling import style_mix_ws

    s = req.sampling
    layers = list(req.layers) if req.layers is not None else None
    with torch.inference_mode():
        return style_mix_ws(model.G, list(req.rows), list(req.cols), layers, s.truncation, s.class_idx)


# -- with projected images (proj:ID): their latents in place of seeds ---------------------------------------


def latents_ws(model: LoadedModel, refs, fetched: dict[str, np.ndarray], s: Sampling):
    """[N, num_ws, w_dim] on the model's device: seeds through the mapping (truncation, class), projections'
    latents (``fetched``: id -> [num_ws, w_dim]) as they are."""
    import torch

    from styleray.models.sampling import seeds_to_ws

    seeds = [r for r in refs if isinstance(r, int)]
    with torch.inference_mode():
        seed_ws = iter(seeds_to_ws(model.G, seeds, s.truncation, class_idx=s.class_idx)) if seeds else iter(())
        device = next(model.G.parameters()).device
        return torch.stack([next(seed_ws) if isinstance(r, int) else
                            torch.from_numpy(fetched[r[len("proj:"):]]).to(device) for r in refs])


def morph_latents_ws(model: LoadedModel, req: MorphRequest, fetched: dict[str, np.ndarray]):
    """The frames' ws of a morph in W through seeds and projections (see ``sampling.lerp_frames``)."""
    from styleray.models.sampling import lerp_frames

    return lerp_frames(latents_ws(model, req.seeds, fetched, req.sampling), req.steps, req.loop)


def mix_latents_ws(model: LoadedModel, req: MixRequest, fetched: dict[str, np.ndarray]):
    """(ws of the rows then the columns, mixed ws of the cells) with projections among them."""
    from styleray.models.sampling import mix_latents

    ws = latents_ws(model, req.rows + req.cols, fetched, req.sampling)
    layers = list(req.layers) if req.layers is not None else None
    return ws, mix_latents(ws[: len(req.rows)], ws[len(req.rows):], layers)


def synthesize(model: LoadedModel, ws, seeds: list[int] | None, noise: str) -> np.ndarray:
    """Images of one chunk of ws (at most ``sampling.CHUNK`` rows for a fair share of the model thread)."""
    import torch

    from styleray.models.sampling import synthesize as run

    with torch.inference_mode():
        return run(model.G, ws, seeds, noise)


def encode_grid(images: np.ndarray, cols: int | None, pad: int) -> bytes:
    from styleray.models.sampling import image_grid
    from styleray.serve import encode

    return encode.encode_image(image_grid(images, cols=cols, pad=pad), "png")
