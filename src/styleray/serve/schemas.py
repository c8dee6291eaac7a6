"""What a client may ask for: the bounds, the request objects the deployments exchange, and their parsing.

Every bound is a module constant so the API, the web page (via ``/v1/info``) and the tests agree on them.
Bounds cap the work one request can cause: at most ``MAX_SEEDS`` network evaluations for a grid,
``MAX_FRAMES`` for a morph and ``MAX_MIX_SIDE ** 2 + 2 * MAX_MIX_SIDE`` for a style-mixing grid.

Pure Python (pydantic, no torch, no Ray): the ingress validates with it before any work is queued.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

# -- bounds -------------------------------------------------------------------------------------------------
MAX_SEED = 2**32 - 1  # seeds are NumPy RandomState seeds: [0, 2**32 - 1]
MAX_SEEDS = 64  # seeds in one grid (POST /v1/samples) or one morph
MAX_FRAMES = 240  # frames in one morph animation (after the schedule: (seeds - 1) * steps + 1)
MAX_STEPS = 120  # frames between two consecutive morph seeds
MAX_MIX_SIDE = 8  # row seeds and column seeds of a style-mixing grid, each
TRUNCATION_RANGE = (-2.0, 2.0)  # psi: 1 = none, 0 = the average face, < 0 or > 1 extrapolates
FPS_RANGE = (1, 50)  # GIF frame delays are multiples of 10 ms; browsers clamp faster ones
QUALITY_RANGE = (1, 100)  # JPEG / WebP quality; 100 makes WebP lossless
MAX_GRID_COLS = MAX_SEEDS
MAX_BODY_BYTES = 64 * 1024  # a POST body larger than this is refused before parsing (413)
ID_PATTERN = re.compile(r"[0-9a-f]{12}")  # a projection id (serve/projections.py)
LatentRef = int | str  # a seed, or "proj:<id>": a finished projection's latent

ImageFormat = Literal["png", "jpeg", "webp"]
AnimationFormat = Literal["gif", "webp"]
NoiseMode = Literal["const", "random", "none"]
FrameNoise = Literal["const", "none"]  # morphs and mixing grids: random noise is seeded per sample
LatentSpace = Literal["w", "z"]
GridFormat = Literal["png", "zip"]

MEDIA_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "zip": "application/zip",
}


class InvalidRequest(ValueError):
    """A request the model cannot serve (e.g. a class it does not have): answered 422 with this message."""


def limits() -> dict:
    """The bounds, as published by ``GET /v1/info``."""
    return {
        "max_seed": MAX_SEED,
        "max_seeds": MAX_SEEDS,
        "max_frames": MAX_FRAMES,
        "max_steps": MAX_STEPS,
        "max_mix_side": MAX_MIX_SIDE,
        "truncation": list(TRUNCATION_RANGE),
        "fps": list(FPS_RANGE),
        "quality": list(QUALITY_RANGE),
    }


# -- parsing: one parser for seeds and integer lists, ASCII digits only -------------------------------------
# str.isdigit() accepts superscripts ('²') that int() refuses and other scripts' digits ('١') that int()
# accepts; a seed is written with 0-9 only, on every route, and every route refuses it with the same words.

_UINT = re.compile(r"[0-9]{1,20}")
SEED_RULE = f"seeds are integers in [0, {MAX_SEED}] written with the digits 0-9"


def seed_problem(value: object) -> str | None:
    """Why ``value`` (a query string or a JSON value) is not a seed, or None when it is one."""
    if isinstance(value, str):
        text = value.strip()
        if not _UINT.fullmatch(text):
            return f"{value[:40]!r} is not a seed; {SEED_RULE}"
        value = int(text)
    elif isinstance(value, bool) or not isinstance(value, int):  # JSON true, 1.5, 1.0, null, lists...
        return f"{json.dumps(value, default=str)[:40]} is not a seed; {SEED_RULE}"
    if not 0 <= value <= MAX_SEED:
        return f"seed {str(value)[:40]} is out of range [0, {MAX_SEED}]"
    return None


def parse_seed(value: object, name: str = "seed") -> int:
    """A seed from a query string or a JSON value; InvalidRequest naming the parameter otherwise."""
    problem = seed_problem(value)
    if problem is not None:
        raise InvalidRequest(f"{name}: {problem}")
    return _as_int(value)


def _seed_field(value: object) -> int:
    """Pydantic's view of a seed (query ``seed``, JSON ``seeds``): the same rule and words as parse_seed."""
    problem = seed_problem(value)
    if problem is not None:
        raise PydanticCustomError("seed", problem)
    return _as_int(value)


def _as_int(value: object) -> int:
    return int(value.strip()) if isinstance(value, str) else int(value)


Seed = Annotated[int, BeforeValidator(_seed_field)]


def parse_seed_list(text: str, name: str, max_count: int = MAX_SEEDS, min_count: int = 1) -> list[int]:
    """'3,17,42' -> [3, 17, 42]; InvalidRequest naming the parameter, the bad value and the limit."""
    return [parse_seed(p, name) for p in _list_parts(text, name, max_count, min_count)]


def _list_parts(text: str, name: str, max_count: int, min_count: int, what: str = "seeds") -> list[str]:
    parts = text.split(",") if text.strip() else []
    if len(parts) > max_count:
        raise InvalidRequest(f"{name}: {len(parts)} seeds given, at most {max_count} allowed")
    if len(parts) < min_count:
        raise InvalidRequest(f"{name}: give at least {min_count} comma-separated {what}, e.g. {name}=3,17,42")
    return parts


# A latent reference names a latent wherever the API takes seeds (morphs, mixes, grids): 42 or seed:42 (a
# seed), or proj:ID (a finished projection's latent, serve/projections.py).


def latent_problem(value: object) -> str | None:
    """Why ``value`` is neither a seed nor proj:ID, or None when it is one of them."""
    if isinstance(value, str) and ":" in value:
        kind, _, rest = value.strip().partition(":")
        if kind == "proj":
            return None if ID_PATTERN.fullmatch(rest) else \
                f"{value[:40]!r}: a projection reference is proj: and 12 hexadecimal characters"
        if kind != "seed":
            return f"{value[:40]!r}: give a seed (42 or seed:42) or a projection (proj:ID)"
        value = rest
    return seed_problem(value)


def parse_latent_ref(value: object, name: str) -> LatentRef:
    """'42', 42 or 'seed:42' -> 42; 'proj:0123456789ab' -> 'proj:0123456789ab'; InvalidRequest naming ``name``."""
    problem = latent_problem(value)
    if problem is not None:
        raise InvalidRequest(f"{name}: {problem}")
    return _as_latent(value)


def _as_latent(value: object) -> LatentRef:
    if isinstance(value, str) and value.strip().startswith("proj:"):
        return value.strip()
    return _as_int(value.strip().removeprefix("seed:") if isinstance(value, str) else value)


def _latent_field(value: object) -> LatentRef:
    """Pydantic's view of a latent reference (JSON ``seeds``): the same rule and words as parse_latent_ref."""
    problem = latent_problem(value)
    if problem is not None:
        raise PydanticCustomError("seed", problem)
    return _as_latent(value)


Latent = Annotated[LatentRef, BeforeValidator(_latent_field)]


def parse_latent_list(text: str, name: str, max_count: int = MAX_SEEDS, min_count: int = 1) -> list[LatentRef]:
    """'3,proj:0123456789ab,seed:42' -> [3, 'proj:0123456789ab', 42]; bounded like seed lists."""
    parts = _list_parts(text, name, max_count, min_count, "seeds (or proj:ID)")
    return [parse_latent_ref(p, name) for p in parts]


def projection_ids(refs) -> list[str]:
    """The projection ids among latent references (without the proj: prefix)."""
    return [r[len("proj:"):] for r in refs if isinstance(r, str)]


def parse_layers(text: str | None, name: str = "layers") -> list[int] | None:
    """'0-3,6' -> [0, 1, 2, 3, 6]; None or '' -> None (the model's coarse layers). Bounded to 0..63."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not _UINT.fullmatch(lo) or (sep and not _UINT.fullmatch(hi)):
            raise InvalidRequest(f"{name}: {part[:40]!r} is not a layer index or range like 0-5 (digits 0-9)")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a or b > 63:
            raise InvalidRequest(f"{name}: {part!r} must be an increasing range within 0-63")
        out.extend(range(a, b + 1))
    return sorted(set(out))


# -- request objects (ingress -> generator) -----------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How seeds become images; shared by every endpoint."""

    truncation: float = 1.0
    class_idx: int | None = None
    noise: str = "const"


@dataclass(frozen=True)
class SampleRequest:
    seed: int
    sampling: Sampling = field(default_factory=Sampling)
    format: str = "png"
    quality: int = 90


@dataclass(frozen=True)
class GridRequest:
    seeds: tuple[LatentRef, ...]
    sampling: Sampling = field(default_factory=Sampling)
    format: str = "png"  # png grid or zip of PNGs
    cols: int | None = None
    pad: int = 0


@dataclass(frozen=True)
class MorphRequest:
    seeds: tuple[LatentRef, ...]
    steps: int = 30
    space: str = "w"
    loop: bool = False
    fps: int = 24
    sampling: Sampling = field(default_factory=Sampling)
    format: str = "gif"
    quality: int = 90

    @property
    def frames(self) -> int:
        n = len(self.seeds)
        return n * self.steps if self.loop else (n - 1) * self.steps + 1


@dataclass(frozen=True)
class MixRequest:
    rows: tuple[LatentRef, ...]
    cols: tuple[LatentRef, ...]
    layers: tuple[int, ...] | None = None
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class Encoded:
    """An encoded response body and what the client should know about it."""

    data: bytes
    media_type: str
    checkpoint: str  # name of the checkpoint that made it
    headers: dict[str, str] = field(default_factory=dict)


# -- JSON bodies --------------------------------------------------------------------------------------------


class SamplesBody(BaseModel):
    """POST /v1/samples: a list of seeds -> one grid PNG, or a zip with one PNG per seed."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    seeds: list[Latent] = Field(min_length=1, max_length=MAX_SEEDS,
                                description=f"1 to {MAX_SEEDS} seeds, or proj:ID for a projected image")
    truncation: float = Field(1.0, ge=TRUNCATION_RANGE[0], le=TRUNCATION_RANGE[1], allow_inf_nan=False)
    class_idx: int | None = Field(None, alias="class", ge=0, description="class index of a conditional model")
    noise: NoiseMode = "const"
    format: GridFormat = "png"
    cols: int | None = Field(None, ge=1, le=MAX_GRID_COLS, description="grid columns (default: square)")
    pad: int = Field(0, ge=0, le=16, description="pixels between grid cells")

    def to_request(self) -> GridRequest:
        return GridRequest(
            seeds=tuple(self.seeds),
            sampling=Sampling(self.truncation, self.class_idx, self.noise),
            format=self.format,
            cols=self.cols,
            pad=self.pad,
        )


class ReloadBody(BaseModel):
    """POST /v1/reload: switch every replica to a checkpoint (default: the newest of the configured path)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str | None = Field(
        None, max_length=4096, description="checkpoint or run folder, local or s3://; default: the served path"
    )
    wait_s: float = Field(60.0, ge=0, le=600, description="wait this long for every replica to switch")
