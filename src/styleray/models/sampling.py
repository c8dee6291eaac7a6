"""Sampling from a trained generator: seeds, truncation, interpolation (morphs) and style mixing.

A seed determines its latent on any machine and in any batch: z comes from NumPy's Mersenne Twister (as in
the reference's generate.py), and with ``noise_mode="random"`` the per-pixel noise comes from a torch
generator seeded by the same seed, one per sample.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from styleray.models.networks import Generator

NOISE_MODES = ("const", "random", "none")
MAX_SEED = 2**32 - 1
CHUNK = 8  # networks always run on exactly this many rows (padded), see _chunked


def _chunked(fn, x: torch.Tensor, chunk: int = CHUNK, extra: Sequence | None = None) -> torch.Tensor:
    """fn over x in chunks of exactly `chunk` rows, padding the last one with copies of its first row.

    Matrix-multiply and convolution kernels pick their algorithm (and so their rounding) by batch size, so
    a sample computed alone and in a batch of 5 can differ in the last bit and, once quantised to uint8, by
    one level. Running every chunk at the same size makes each sample's result independent of what else is
    in the batch: the same seed gives the same bytes whether a request was batched or not.
    ``extra`` is split alongside x (one item per row) and passed to fn as its second argument.
    """
    outs = []
    for i in range(0, x.shape[0], chunk):
        part = x[i : i + chunk]
        n = part.shape[0]
        if n < chunk:
            part = torch.cat([part, part[:1].expand(chunk - n, *part.shape[1:])])
        items = None
        if extra is not None:
            items = list(extra[i : i + chunk])
            items += [items[0]] * (chunk - n)
        out = fn(part, items) if extra is not None else fn(part)
        outs.append(out[:n])
    return torch.cat(outs)


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed!r} must be an integer in [0, {MAX_SEED}]")
    return int(seed)


def seed_to_z(seed: int, z_dim: int) -> torch.Tensor:
    """The latent of a seed: [z_dim] float32, identical on every platform."""
    rs = np.random.RandomState(check_seed(seed))
    return torch.from_numpy(rs.randn(z_dim)).float()


def seeds_to_z(seeds: Sequence[int], z_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.stack([seed_to_z(s, z_dim) for s in seeds]).to(device)  # [N, z_dim]


def class_labels(G: Generator, class_idx: int | None, n: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """One-hot labels [n, c_dim] for a conditional generator; None for an unconditional one."""
    if G.c_dim == 0:
        if class_idx is not None:
            raise ValueError("class: this generator is unconditional; omit the class")
        return None
    if class_idx is None:
        raise ValueError(f"class: this generator is conditional; give a class in [0, {G.c_dim - 1}]")
    if not 0 <= int(class_idx) < G.c_dim:
        raise ValueError(f"class {class_idx} is out of range [0, {G.c_dim - 1}]")
    c = torch.zeros([n, G.c_dim], device=device)
    c[:, int(class_idx)] = 1
    return c


def _noise_generators(seeds: Sequence[int], noise_mode: str, device) -> list[torch.Generator] | None:
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise mode {noise_mode!r} must be one of {', '.join(NOISE_MODES)}")
    if noise_mode != "random":
        return None
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8."""
    img = (img.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return img.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def seeds_to_ws(
    G: Generator,
    seeds: Sequence[int],
    truncation_psi: float = 1.0,
    truncation_cutoff: int | None = None,
    class_idx: int | None = None,
) -> torch.Tensor:
    """The (truncated) w of each seed: [N, num_ws, w_dim]."""
    device = next(G.parameters()).device
    z = seeds_to_z(seeds, G.z_dim, device)
    c = class_labels(G, class_idx, len(seeds), device)
    return _mapping(G, z, c, truncation_psi, truncation_cutoff)


def _mapping(G: Generator, z: torch.Tensor, c: torch.Tensor | None, psi: float = 1.0, cutoff: int | None = None):
    """G.mapping in fixed-size chunks (batch-invariant, see _chunked); c must be constant over rows."""
    c_row = c[:1] if c is not None else None
    return _chunked(
        lambda zz: G.mapping(zz, c_row.expand(zz.shape[0], -1) if c_row is not None else None, psi, cutoff), z
    )


@torch.no_grad()
def synthesize(
    G: Generator, ws: torch.Tensor, seeds: Sequence[int] | None = None, noise_mode: str = "const", batch_size: int = CHUNK
) -> np.ndarray:
    """Images from ws: [N, H, W, C] uint8. ``seeds`` seed random noise per sample.

    ``batch_size`` is the fixed chunk the network runs on; results are identical for any batch composition
    at the same chunk size (keep the default for reproducible bytes across callers).
    """
    device = ws.device
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise mode {noise_mode!r} must be one of {', '.join(NOISE_MODES)}")
    if noise_mode == "random" and seeds is None:
        raise ValueError("noise_mode='random' needs the seeds that seed each sample's noise")
    if ws.shape[0] == 0:
        return np.zeros([0, G.img_resolution, G.img_resolution, G.img_channels], np.uint8)

    def run(chunk_ws, chunk_seeds=None):
        gens = _noise_generators(chunk_seeds, noise_mode, device) if chunk_seeds is not None else None
        return G.synthesis(chunk_ws, noise_mode=noise_mode, generators=gens)

    img = _chunked(run, ws, batch_size, extra=list(seeds) if seeds is not None else None)
    return to_uint8(img)


def generate_images(
    G: Generator,
    seeds: Sequence[int],
    truncation_psi: float = 1.0,
    truncation_cutoff: int | None = None,
    class_idx: int | None = None,
    noise_mode: str = "const",
    batch_size: int = CHUNK,
) -> np.ndarray:
    """One image per seed: [N, H, W, C] uint8; the same seed gives the same image in any batch."""
    ws = seeds_to_ws(G, seeds, truncation_psi, truncation_cutoff, class_idx)
    return synthesize(G, ws, seeds, noise_mode, batch_size)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation along the last dim (direction on the sphere, length linear); exact endpoints."""
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    an, bn = a / na, b / nb
    omega = torch.acos((an * bn).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    direction = (torch.sin((1 - t) * omega) / so) * an + (torch.sin(t * omega) / so) * bn
    return direction * torch.lerp(na, nb, t)  # the angle moves uniformly, the length linearly


def morph_schedule(num_seeds: int, steps: int, loop: bool = False) -> list[tuple[int, int, float]]:
    """(from_index, to_index, t) per frame: `steps` frames per segment, plus the final endpoint unless looping."""
    if num_seeds < 2:
        raise ValueError("a morph needs at least two seeds")
    if steps < 1:
        raise ValueError(f"steps {steps} must be >= 1")
    segments = num_seeds if loop else num_seeds - 1
    frames = [(i, (i + 1) % num_seeds, k / steps) for i in range(segments) for k in range(steps)]
    if not loop:
        frames.append((num_seeds - 2, num_seeds - 1, 1.0))
    return frames


@torch.no_grad()
def morph_ws(
    G: Generator,
    seeds: Sequence[int],
    steps: int = 30,
    space: str = "w",
    loop: bool = False,
    truncation_psi: float = 1.0,
    class_idx: int | None = None,
) -> torch.Tensor:
    """The w of every frame of a morph through the seeds: [F, num_ws, w_dim] (see ``morph``)."""
    if space not in ("w", "z"):
        raise ValueError(f"space {space!r} must be 'w' or 'z'")
    schedule = morph_schedule(len(seeds), steps, loop)
    device = next(G.parameters()).device
    if space == "w":
        return lerp_frames(seeds_to_ws(G, seeds, truncation_psi, class_idx=class_idx), steps, loop)
    z = seeds_to_z(seeds, G.z_dim, device)
    zs = torch.stack([slerp(z[i], z[j], t) for i, j, t in schedule])
    c = class_labels(G, class_idx, len(schedule), device)
    return _mapping(G, zs, c, truncation_psi)


def lerp_frames(
    ws: torch.Tensor,  # [S, num_ws, w_dim]: any latents (seeds' ws, projected images' latents), S >= 2
    steps: int = 30,
    loop: bool = False,
) -> torch.Tensor:
    """The w of every frame of a morph linear in W through the given latents: [F, num_ws, w_dim], the
    endpoints exactly the latents."""
    schedule = morph_schedule(ws.shape[0], steps, loop)
    return torch.stack([ws[i].lerp(ws[j], t) if t not in (0.0, 1.0) else ws[i if t == 0 else j] for i, j, t in schedule])


@torch.no_grad()
def morph(
    G: Generator,
    seeds: Sequence[int],
    steps: int = 30,
    space: str = "w",
    loop: bool = False,
    truncation_psi: float = 1.0,
    class_idx: int | None = None,
    noise_mode: str = "const",
    batch_size: int = CHUNK,
) -> np.ndarray:
    """Frames morphing through the seeds: linear in W, spherical in Z. [F, H, W, C] uint8.

    Frame count is ``(len(seeds) - 1) * steps + 1`` (``len(seeds) * steps`` when looping); the first and last
    frames are exactly the samples of the first and last seeds. The frames of ``synthesize`` over slices of
    ``morph_ws`` that start at multiples of ``CHUNK`` are the same bytes (how a server interleaves them).
    """
    check_frame_noise(noise_mode)
    frames_ws = morph_ws(G, seeds, steps, space, loop, truncation_psi, class_idx)
    return synthesize(G, frames_ws, None, noise_mode, batch_size)


def check_frame_noise(noise_mode: str) -> None:
    """Morphs and style-mixing grids use const or no noise: random noise is seeded per sample, and their
    frames and cells are not samples of one seed."""
    if noise_mode == "random":
        raise ValueError("morphs and style mixing use noise_mode const or none (random noise is seeded per sample)")


@torch.no_grad()
def style_mix_ws(
    G: Generator,
    row_seeds: Sequence[int],
    col_seeds: Sequence[int],
    layers: Sequence[int] | None = None,
    truncation_psi: float = 1.0,
    class_idx: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ws of the row seeds then the column seeds [R + C, num_ws, w_dim], mixed ws [R * C, num_ws, w_dim])."""
    _check_layers(G.num_ws, layers)  # before the mapping runs
    ws = seeds_to_ws(G, list(row_seeds) + list(col_seeds), truncation_psi, class_idx=class_idx)
    return ws, mix_latents(ws[: len(row_seeds)], ws[len(row_seeds) :], layers)


def _check_layers(num_ws: int, layers: Sequence[int] | None) -> None:
    bad = [int(i) for i in layers or () if not 0 <= int(i) < num_ws]
    if bad:
        raise ValueError(f"layers {bad} out of range [0, {num_ws - 1}]")


def mix_latents(
    row_ws: torch.Tensor,  # [R, num_ws, w_dim]: any latents (seeds' ws, projected images' latents)
    col_ws: torch.Tensor,  # [C, num_ws, w_dim]
    layers: Sequence[int] | None = None,  # from the column latents; None: the coarse layers 0-5
) -> torch.Tensor:
    """The mixed ws of a style-mixing grid, row-major: [R * C, num_ws, w_dim]."""
    num_ws = row_ws.shape[1]
    layers = list(range(min(6, num_ws))) if layers is None else [int(i) for i in layers]
    _check_layers(num_ws, layers)
    mixed = row_ws[:, None].repeat(1, col_ws.shape[0], 1, 1)  # [R, C, num_ws, w_dim]
    mixed[:, :, layers] = col_ws[None][:, :, layers]
    return mixed.flatten(0, 1)


def style_mix_grid(singles: np.ndarray, cells: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Assemble [rows + 1, cols + 1, H, W, C]: white corner, column seeds on top, row seeds at the left."""
    h, w, ch = singles.shape[1:]
    grid = np.full([rows + 1, cols + 1, h, w, ch], 255, np.uint8)
    grid[0, 1:] = singles[rows:]
    grid[1:, 0] = singles[:rows]
    grid[1:, 1:] = cells.reshape(rows, cols, h, w, ch)
    return grid


@torch.no_grad()
def style_mix(
    G: Generator,
    row_seeds: Sequence[int],
    col_seeds: Sequence[int],
    layers: Sequence[int] | None = None,
    truncation_psi: float = 1.0,
    class_idx: int | None = None,
    noise_mode: str = "const",
) -> np.ndarray:
    """Style mixing grid [rows + 1, cols + 1, H, W, C] uint8.

    Cell (0, 0) is white; row 0 holds the column seeds' images, column 0 the row seeds'; cell (r, c) takes
    the row seed's w everywhere except ``layers`` (default: the coarse layers 0-5), which come from the
    column seed.
    """
    check_frame_noise(noise_mode)
    ws, mixed = style_mix_ws(G, row_seeds, col_seeds, layers, truncation_psi, class_idx)
    singles = synthesize(G, ws, noise_mode=noise_mode)
    cells = synthesize(G, mixed, noise_mode=noise_mode)
    return style_mix_grid(singles, cells, len(row_seeds), len(col_seeds))


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 0, pad_value: int = 255) -> np.ndarray:
    """Tile [N, H, W, C] uint8 images into one [rows*H, cols*W, C] array (row-major)."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full([rows * (h + pad) - pad, cols * (w + pad) - pad, c], pad_value, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, k * (w + pad) : k * (w + pad) + w] = images[i]
    return out


def to_pil(array: np.ndarray):
    """uint8 [H, W, C] (C = 1 or 3) -> PIL image."""
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
