"""The built-in sample dataset: deterministic cartoon superhero figures.

Every figure is fully determined by ``(seed, index)``: a :class:`SyntheticSpec` picks the palette, pose,
framing and background, and :func:`render_figure` draws it with PIL at 4x and box-downsamples. The figure is
drawn onto its own RGBA layer, so the layer's alpha *is* the mask: the returned boolean mask is exactly the
pixels whose figure coverage is at least one half, and pixels with no coverage hold the pure background.

Two uses:
- ``make_sample_dataset``: "raw" images (varied backgrounds, canvas aspects, some JPEGs) plus true masks,
  the ground truth for the background-removal tests and the input of ``styleray prepare``.
- ``make_clean_training_set``: figures on white, square, with a StyleGAN2-ADA ``dataset.json``, so the demo
  and the tests can train without running the preparation pipeline.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from styleray import storage

logger = logging.getLogger(__name__)

BACKGROUNDS = ("solid", "gradient", "noise", "stripes")
FRAMINGS = ("upper-body", "full-body")
POSES = ("down", "up", "hips", "raised", "flex")
EMBLEMS = ("circle", "triangle", "star", "diamond", "bolt")
HEADGEAR = ("hair", "cowl", "bare")
ASPECTS = (1.0, 4 / 3, 3 / 4)  # canvas width / height used by make_sample_dataset
ASPECT_WEIGHTS = (0.5, 0.25, 0.25)

SUITS = {
    "red": (214, 40, 40), "blue": (33, 87, 201), "green": (40, 150, 60), "purple": (123, 63, 181),
    "orange": (242, 128, 32), "teal": (0, 148, 158), "yellow": (247, 205, 30), "black": (44, 44, 54),
    "magenta": (206, 36, 136), "navy": (32, 44, 112),
}
ACCENTS = {**SUITS, "gold": (240, 186, 36), "silver": (186, 192, 204), "white": (244, 244, 244)}
SKINS = {
    "porcelain": (255, 224, 196), "peach": (241, 194, 155), "tan": (214, 160, 115),
    "bronze": (176, 118, 78), "brown": (131, 84, 55), "deep": (92, 58, 40),
}
HAIRS = {"black": (30, 28, 32), "brown": (102, 62, 30), "blonde": (236, 200, 92), "ginger": (184, 70, 28),
         "white": (236, 236, 236)}
BG_COLORS = {
    "sky": (168, 208, 240), "mint": (178, 228, 198), "cream": (246, 238, 214), "lavender": (210, 200, 240),
    "rose": (242, 200, 212), "grey": (200, 200, 206), "sand": (226, 210, 168), "slate": (92, 106, 128),
    "paper": (248, 248, 244), "lime": (214, 236, 150),
}
OUTLINE = (22, 22, 32)
WHITE = (255, 255, 255)
_OUTLINE_UNITS = 0.13  # outline width in figure units (the head is ~2.5 units tall)
_WAIST_Y = 6.6  # where the upper-body framing cuts the figure, in figure units


@dataclass(frozen=True)
class SyntheticSpec:
    """One figure's parameters, fully determined by ``(seed, index)`` (see :func:`make_spec`)."""

    index: int  # position in the dataset
    seed: int  # dataset seed
    background: str  # one of BACKGROUNDS
    framing: str  # one of FRAMINGS
    pose: str  # one of POSES
    mirrored: bool  # asymmetric poses ("raised") use the other arm
    skin: str  # key of SKINS
    suit: str  # key of SUITS: torso, arms, legs
    accent: str  # key of ACCENTS: gloves, boots, belt, trunks
    cape: str | None  # key of ACCENTS; None: no cape
    mask: str  # key of ACCENTS: domino mask (and cowl)
    headgear: str  # one of HEADGEAR
    hair: str  # key of HAIRS (used when headgear == "hair")
    emblem: str  # one of EMBLEMS
    emblem_color: str  # key of ACCENTS
    trunks: bool  # briefs over the suit in the accent colour
    build: float  # shoulder and hip width factor, ~1
    head_scale: float  # head size factor, ~1
    fill: float  # visible figure height as a fraction of the canvas height
    shift: tuple[float, float]  # figure centre offset as a fraction of the canvas (x, y)
    bg_colors: tuple[str, str]  # keys of BG_COLORS; "solid" uses the first
    bg_angle: float  # degrees: gradient direction, stripe orientation
    stripe_period: float  # stripe period as a fraction of the canvas' longer side
    noise_seed: int  # seed of the low-frequency noise field

    def palette(self) -> dict[str, str | None]:
        return {"skin": self.skin, "suit": self.suit, "accent": self.accent, "cape": self.cape,
                "mask": self.mask, "hair": self.hair if self.headgear == "hair" else None,
                "emblem": self.emblem_color}


def _distance(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def _pick(rng: np.random.Generator, names: Sequence[str]) -> str:
    return names[int(rng.integers(len(names)))]


def _pick_far(rng: np.random.Generator, table: dict, avoid: Iterable[tuple], min_dist: float) -> str:
    """A random key of `table` whose colour is at least `min_dist` from every colour in `avoid`."""
    avoid = list(avoid)
    names = [k for k, c in table.items() if all(_distance(c, a) >= min_dist for a in avoid)]
    return _pick(rng, names or list(table))


def _check_choice(value: str, options: Sequence[str], flag: str) -> None:
    if value not in options:
        raise ValueError(f"{flag}={value!r} is not one of {', '.join(options)}")


def make_spec(index: int, seed: int = 0, *, background: str | None = None,
              framing: str | None = None) -> SyntheticSpec:
    """The figure at `index` of the dataset `seed`. Backgrounds and framings cycle with the index
    (background = index % 4, framing = index // 4 % 2) so that any 8 consecutive figures cover them all."""
    if index < 0 or seed < 0:
        raise ValueError(f"index={index} and seed={seed} must be >= 0")
    background = BACKGROUNDS[index % len(BACKGROUNDS)] if background is None else background
    framing = FRAMINGS[(index // len(BACKGROUNDS)) % len(FRAMINGS)] if framing is None else framing
    _check_choice(background, BACKGROUNDS, "background")
    _check_choice(framing, FRAMINGS, "framing")
    rng = np.random.default_rng([seed, index])
    skin = _pick(rng, list(SKINS))
    suit = _pick(rng, list(SUITS))
    accent = _pick_far(rng, ACCENTS, [SUITS[suit]], 120)
    cape = None if rng.random() < 0.3 else (accent if rng.random() < 0.5 else
                                           _pick_far(rng, ACCENTS, [SUITS[suit]], 120))
    mask = "black" if rng.random() < 0.45 else _pick_far(rng, ACCENTS, [SKINS[skin]], 120)
    emblem_color = _pick_far(rng, ACCENTS, [SUITS[suit]], 150)
    figure_colors = [SUITS[suit], ACCENTS[accent], SKINS[skin], OUTLINE] + ([ACCENTS[cape]] if cape else [])
    bg0 = _pick_far(rng, BG_COLORS, figure_colors, 70)
    bg1 = _pick_far(rng, {k: v for k, v in BG_COLORS.items() if k != bg0}, figure_colors, 70)
    upper = framing == "upper-body"
    return SyntheticSpec(
        index=index, seed=seed, background=background, framing=framing,
        pose=_pick(rng, POSES), mirrored=bool(rng.random() < 0.5),
        skin=skin, suit=suit, accent=accent, cape=cape, mask=mask,
        headgear=_pick(rng, HEADGEAR), hair=_pick(rng, list(HAIRS)),
        emblem=_pick(rng, EMBLEMS), emblem_color=emblem_color, trunks=bool(rng.random() < 0.5),
        build=float(rng.uniform(0.9, 1.12)), head_scale=float(rng.uniform(0.92, 1.08)),
        fill=float(rng.uniform(0.84, 0.9) if upper else rng.uniform(0.76, 0.86)),
        shift=(float(rng.uniform(-0.04, 0.04)), 0.0 if upper else float(rng.uniform(-0.02, 0.02))),
        bg_colors=(bg0, bg1), bg_angle=float(rng.uniform(0, 180)),
        stripe_period=float(rng.uniform(0.08, 0.16)), noise_seed=int(rng.integers(2**31)),
    )


# ---------------------------------------------------------------------------------------------- figure

# A shape in figure units (x right, y down, the figure's centre line at x = 0, head top near y = 0):
# ("ellipse", cx, cy, rx, ry) | ("capsule", x0, y0, x1, y1, r) | ("rrect", x0, y0, x1, y1, r)
# | ("chord", cx, cy, rx, ry, start_deg, end_deg) | ("poly", ((x, y), ...))
# A part is (rgb, shapes, style): an outlined shape is drawn in the outline colour, then inset by the outline
# width in its own colour; style "group" outlines the union of its shapes, "each" outlines every shape on its
# own, "flat" draws no outline.
Part = tuple[tuple[int, int, int], tuple[tuple, ...], str]

_ARMS = {  # (elbow, hand) of the figure's right arm (x > 0) per pose; "raised" and "flex" list both arms
    "down": ((2.05, 4.5), (2.2, 5.8)),
    "up": ((2.35, 1.9), (2.55, 0.45)),
    "hips": ((2.75, 4.5), (1.5, 5.8)),
    "flex": ((2.9, 3.3), (2.45, 1.75)),
}


def _arm_joints(spec: SyntheticSpec) -> list[tuple[float, tuple, tuple, tuple]]:
    """[(side, shoulder, elbow, hand)] for both arms; side is +1 for the figure's right (x > 0)."""
    b = spec.build
    out = []
    for side in (1.0, -1.0):
        pose = spec.pose
        if pose == "raised":
            pose = "up" if (side > 0) != spec.mirrored else "down"
        (ex, ey), (hx, hy) = _ARMS[pose]
        if pose == "up" and spec.pose == "raised":
            ex, hx = 2.2, 2.0  # a straight fist-up arm
        out.append((side, (side * 1.45 * b, 3.15), (side * ex * b, ey), (side * hx * b, hy)))
    return out


def _emblem_shapes(kind: str, cx: float, cy: float, r: float) -> tuple[tuple, ...]:
    if kind == "circle":
        return (("ellipse", cx, cy, r, r),)
    if kind == "triangle":
        return (("poly", ((cx - r, cy - 0.7 * r), (cx + r, cy - 0.7 * r), (cx, cy + r))),)
    if kind == "diamond":
        return (("poly", ((cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy))),)
    if kind == "star":
        pts = []
        for k in range(10):
            rad = r * (1.0 if k % 2 == 0 else 0.45)
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + 0.1 * r + rad * math.sin(ang)))
        return (("poly", tuple(pts)),)
    bolt = ((0.2, -1.0), (-0.55, 0.15), (-0.05, 0.15), (-0.25, 1.0), (0.6, -0.2), (0.1, -0.2), (0.35, -1.0))
    return (("poly", tuple((cx + r * x, cy + r * y) for x, y in bolt)),)


def _figure_parts(spec: SyntheticSpec) -> list[Part]:
    """The figure as parts, back to front."""
    b, hs = spec.build, spec.head_scale
    suit, accent, skin = SUITS[spec.suit], ACCENTS[spec.accent], SKINS[spec.skin]
    mask = ACCENTS[spec.mask]
    hy = 1.25  # head centre
    parts: list[Part] = []
    if spec.cape:
        hem = (2.75, 1.65, 0.55, -0.55, -1.65, -2.75)
        wave = [(x * b, 9.15 if k % 2 == 0 else 8.8) for k, x in enumerate(hem)]
        parts.append((ACCENTS[spec.cape], (("poly", ((-1.4 * b, 2.7), (1.4 * b, 2.7), *wave)),), "each"))
    spread = {"hips": 1.15, "flex": 1.15, "up": 1.05}.get(spec.pose, 0.9)
    legs, boots = [], []
    for side in (1.0, -1.0):
        foot_x = side * spread * b
        legs.append(("capsule", side * 0.72 * b, 6.0, foot_x, 8.3, 0.62))
        boots.append(("capsule", side * 0.8 * b + (foot_x - side * 0.8 * b) * 0.7, 7.7, foot_x, 9.05, 0.68))
        boots.append(("ellipse", foot_x + side * 0.25, 9.3, 0.85, 0.45))
    parts += [(suit, tuple(legs), "group"), (accent, tuple(boots), "group")]
    parts.append((skin, (("capsule", 0.0, 2.0, 0.0, 2.9, 0.45),), "group"))  # neck
    torso = (("rrect", -1.6 * b, 2.55, 1.6 * b, 5.2, 0.8),
             ("poly", ((-1.5 * b, 4.6), (1.5 * b, 4.6), (1.2 * b, 6.45), (-1.2 * b, 6.45))))
    parts.append((suit, torso, "group"))
    if spec.trunks:
        parts.append((accent, (("poly", ((-1.22 * b, 5.85), (1.22 * b, 5.85), (1.32 * b, 6.75), (0.35, 7.05),
                                          (0.0, 6.85), (-0.35, 7.05), (-1.32 * b, 6.75))),), "each"))
    parts.append((accent, (("rrect", -1.25 * b, 5.55, 1.25 * b, 6.05, 0.15),), "group"))  # belt
    parts.append((ACCENTS[spec.emblem_color], _emblem_shapes(spec.emblem, 0.0, 3.85, 0.78 * b), "each"))
    for _side, shoulder, elbow, hand in _arm_joints(spec):
        parts.append((suit, (("capsule", *shoulder, *elbow, 0.5), ("capsule", *elbow, *hand, 0.47)), "group"))
        cuff = (hand[0] + 0.35 * (elbow[0] - hand[0]), hand[1] + 0.35 * (elbow[1] - hand[1]))
        parts.append((accent, (("capsule", *cuff, *hand, 0.52), ("ellipse", *hand, 0.56, 0.56)), "group"))
    if spec.headgear == "cowl":
        ears = tuple(("poly", ((s * 0.35 * hs, hy - 0.9 * hs), (s * 1.0 * hs, hy - 0.55 * hs),
                               (s * 0.85 * hs, hy - 1.85 * hs))) for s in (1, -1))
        parts.append((mask, ears, "each"))
    parts.append((skin, (("ellipse", 0.0, hy, 1.1 * hs, 1.3 * hs),), "group"))
    if spec.headgear == "cowl":
        parts.append((mask, (("chord", 0.0, hy, 1.1 * hs, 1.3 * hs, 172, 368),), "group"))
    elif spec.headgear == "hair":
        parts.append((HAIRS[spec.hair], (("chord", 0.0, hy - 0.12, 1.18 * hs, 1.32 * hs, 190, 350),), "group"))
    domino = ((-1.02, 1.1), (-0.5, 0.82), (0.0, 1.0), (0.5, 0.82), (1.02, 1.1), (0.6, 1.52), (0.0, 1.34),
              (-0.6, 1.52))
    parts.append((mask, (("poly", tuple((x * hs, hy - 0.1 + (y - 1.2) * hs) for x, y in domino)),), "each"))
    eyes = tuple(("ellipse", s * 0.45 * hs, hy - 0.12, 0.2 * hs, 0.12 * hs) for s in (1, -1))
    parts.append((WHITE, eyes, "flat"))
    parts.append((OUTLINE, (("capsule", -0.32 * hs, hy + 0.68 * hs, 0.32 * hs, hy + 0.68 * hs, 0.07),), "flat"))
    return parts


def _shape_bounds(shape: tuple, y_cut: float) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) of the part of `shape` above y_cut, in figure units (ellipses conservatively)."""
    kind = shape[0]
    if kind in ("ellipse", "chord"):
        _, cx, cy, rx, ry = shape[:5]
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
    elif kind == "capsule":
        _, x0, y0, x1, y1, r = shape
        if (y0 - y_cut) * (y1 - y_cut) < 0:  # keep the segment's part above the cut
            xc = x0 + (y_cut - y0) / (y1 - y0) * (x1 - x0)
            x0, y0, x1, y1 = (x0, y0, xc, y_cut) if y0 < y_cut else (xc, y_cut, x1, y1)
        box = (min(x0, x1) - r, min(y0, y1) - r, max(x0, x1) + r, max(y0, y1) + r)
    elif kind == "rrect":
        box = shape[1:5]
    else:
        pts = list(shape[1])
        keep = [p for p in pts if p[1] <= y_cut]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
            if (y0 - y_cut) * (y1 - y_cut) < 0:
                keep.append((x0 + (y_cut - y0) / (y1 - y0) * (x1 - x0), y_cut))
        if not keep:
            return None
        xs, ys = zip(*keep)
        box = (min(xs), min(ys), max(xs), max(ys))
    if box[1] > y_cut:
        return None
    return box[0], box[1], box[2], min(box[3], y_cut)


def _figure_transform(spec: SyntheticSpec, parts: list[Part], width: float, height: float):
    """Scale (pixels per figure unit) and origin (pixel position of figure point (0, 0)) on a canvas."""
    y_cut = _WAIST_Y if spec.framing == "upper-body" else math.inf
    boxes = [bx for _, shapes, _ in parts for s in shapes if (bx := _shape_bounds(s, y_cut)) is not None]
    x0, y0 = min(bx[0] for bx in boxes), min(bx[1] for bx in boxes)
    x1, y1 = max(bx[2] for bx in boxes), max(bx[3] for bx in boxes)
    scale = min(spec.fill * height / (y1 - y0), 0.86 * width / (x1 - x0))
    cx = width * (0.5 + spec.shift[0]) - scale * (x0 + x1) / 2
    if spec.framing == "upper-body":  # the waist sits on the bottom edge, the head keeps its margin
        cut = [bx for bx in boxes if bx[3] >= y_cut]  # what the bottom edge crosses: at most half of it
        scale = min(scale, 0.5 * width / (max(bx[2] for bx in cut) - min(bx[0] for bx in cut)))
        cx = width * (0.5 + spec.shift[0]) - scale * (x0 + x1) / 2
        cy = height - scale * y1
    else:
        cy = height * (0.5 + spec.shift[1]) - scale * (y0 + y1) / 2
    return scale, (cx, cy)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: tuple, fill, inset: float, to_px, scale: float) -> None:
    kind = shape[0]
    if kind in ("ellipse", "chord"):
        (cx, cy), rx, ry = to_px(shape[1], shape[2]), shape[3] * scale - inset, shape[4] * scale - inset
        if rx > 0 and ry > 0:
            box = (cx - rx, cy - ry, cx + rx, cy + ry)
            if kind == "ellipse":
                draw.ellipse(box, fill=fill)
            else:
                draw.chord(box, shape[5], shape[6], fill=fill)
    elif kind == "capsule":
        p0, p1, r = to_px(shape[1], shape[2]), to_px(shape[3], shape[4]), shape[5] * scale - inset
        if r > 0:
            draw.line([p0, p1], fill=fill, width=max(1, round(2 * r)))
            for px, py in (p0, p1):
                draw.ellipse((px - r, py - r, px + r, py + r), fill=fill)
    elif kind == "rrect":
        (ax, ay), (bx, by) = to_px(shape[1], shape[2]), to_px(shape[3], shape[4])
        r = max(0.0, shape[5] * scale - inset)
        if bx - ax > 2 * inset and by - ay > 2 * inset:
            draw.rounded_rectangle((ax + inset, ay + inset, bx - inset, by - inset), radius=r, fill=fill)
    else:
        pts = [to_px(x, y) for x, y in shape[1]]
        draw.polygon(_inset_polygon(pts, inset) if inset else pts, fill=fill)


def _inset_polygon(pts: list[tuple[float, float]], d: float) -> list[tuple[float, float]]:
    """Moves every edge of a simple polygon inwards by d (mitred corners)."""
    n = len(pts)
    area2 = sum(pts[i][0] * pts[(i + 1) % n][1] - pts[(i + 1) % n][0] * pts[i][1] for i in range(n))
    sign = 1.0 if area2 > 0 else -1.0  # pixel coordinates: positive area means clockwise on screen
    lines = []
    for i in range(n):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % n]
        length = math.hypot(x1 - x0, y1 - y0) or 1.0
        nx, ny = -sign * (y1 - y0) / length, sign * (x1 - x0) / length  # inward normal
        lines.append(((x0 + d * nx, y0 + d * ny), (x1 - x0, y1 - y0)))
    out = []
    for i in range(n):
        (p, r), (q, t) = lines[i - 1], lines[i]
        cross = r[0] * t[1] - r[1] * t[0]
        if abs(cross) < 1e-9:  # collinear edges: the shifted vertex
            out.append(q)
            continue
        u = ((q[0] - p[0]) * t[1] - (q[1] - p[1]) * t[0]) / cross
        out.append((p[0] + u * r[0], p[1] + u * r[1]))
    return out


def _draw_figure(layer: Image.Image, parts: list[Part], scale: float, origin: tuple[float, float]) -> None:
    """Draws opaque parts onto an RGBA layer: its alpha becomes the figure mask."""
    draw = ImageDraw.Draw(layer)
    width = _OUTLINE_UNITS * scale
    outline, ox, oy = OUTLINE + (255,), origin[0], origin[1]

    def to_px(x: float, y: float) -> tuple[float, float]:
        return ox + x * scale, oy + y * scale

    for rgb, shapes, style in parts:
        fill = tuple(rgb) + (255,)
        if style == "flat":
            for shape in shapes:
                _draw_shape(draw, shape, fill, 0.0, to_px, scale)
            continue
        for group in [shapes] if style == "group" else [(shape,) for shape in shapes]:
            for shape in group:
                _draw_shape(draw, shape, outline, 0.0, to_px, scale)
            for shape in group:
                _draw_shape(draw, shape, fill, width, to_px, scale)


# ------------------------------------------------------------------------------------------ background


def _background(spec: SyntheticSpec, width: int, height: int) -> np.ndarray:
    """The background as float64 [height, width, 3] in 0..255."""
    c0, c1 = (np.asarray(BG_COLORS[name], dtype=np.float64) for name in spec.bg_colors)
    if spec.background == "solid":
        return np.broadcast_to(c0, (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    angle = math.radians(spec.bg_angle)
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    if spec.background == "gradient":
        t = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-9)
    elif spec.background == "stripes":
        period = spec.stripe_period * max(width, height)
        t = (np.floor(proj / (period / 2)) % 2).astype(np.float64)
    else:  # noise: a random 5x5 grid upsampled bicubically is smooth and low-frequency
        grid = np.random.default_rng(spec.noise_seed).random((5, 5)).astype(np.float32)
        field = np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))
        t = np.clip((field - field.min()) / max(float(field.max() - field.min()), 1e-6), 0.0, 1.0)
    return c0 + t[..., None] * (c1 - c0)


def _render(spec: SyntheticSpec, width: int, height: int, *, on_white: bool = False):
    """(uint8 RGB [H, W, 3], bool mask [H, W]) of `spec` on a width x height canvas."""
    ss = 4 if max(width, height) <= 256 else 2
    parts = _figure_parts(spec)
    scale, origin = _figure_transform(spec, parts, width * ss, height * ss)
    layer = Image.new("RGBA", (width * ss, height * ss), (0, 0, 0, 0))
    _draw_figure(layer, parts, scale, origin)
    fig = np.asarray(layer, dtype=np.float64)
    bg = np.full((height * ss, width * ss, 3), 255.0) if on_white else _background(spec, width * ss, height * ss)
    alpha = fig[..., 3:] / 255.0  # exactly 0 or 1: PIL draws without anti-aliasing
    full = fig[..., :3] * alpha + bg * (1.0 - alpha)
    down = full.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
    coverage = alpha[..., 0].reshape(height, ss, width, ss).mean(axis=(1, 3))
    return np.clip(np.rint(down), 0, 255).astype(np.uint8), coverage >= 0.5


def _canvas(size: int, aspect: float) -> tuple[int, int]:
    if size < 16:
        raise ValueError(f"size={size} is too small for a figure (use size >= 16)")
    if not 0.25 <= aspect <= 4:
        raise ValueError(f"aspect={aspect} (width / height) must be within 0.25..4")
    if aspect >= 1:
        return size, max(16, round(size / aspect))
    return max(16, round(size * aspect)), size


def render_figure(index: int, *, size: int = 128, seed: int = 0, background: str | None = None,
                  framing: str | None = None, aspect: float = 1.0) -> tuple[Image.Image, np.ndarray, dict]:
    """RGB image, bool mask (True = figure) and metadata of figure `index` of dataset `seed`.

    The canvas is `size` pixels on its longer side with width / height = `aspect` (square by default).
    `background` / `framing` override the ones the index selects (None: keep them).
    """
    spec = make_spec(index, seed, background=background, framing=framing)
    width, height = _canvas(size, aspect)
    pixels, mask = _render(spec, width, height)
    ys, xs = np.nonzero(mask)
    meta = {
        "index": index, "seed": seed, "background": spec.background, "framing": spec.framing,
        "pose": spec.pose, "palette": spec.palette(), "emblem": spec.emblem, "cape": spec.cape is not None,
        "headgear": spec.headgear, "width": width, "height": height,
        "background_colors": [list(BG_COLORS[c]) for c in spec.bg_colors[: 1 if spec.background == "solid" else 2]],
        "mask_fraction": round(float(mask.mean()), 6),
        "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None,
    }
    return Image.fromarray(pixels), mask, meta


# -------------------------------------------------------------------------------------------- datasets


def _atomic_save(image: Image.Image, path: Path, fmt: str, **params) -> None:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    storage.write_bytes(str(path), buf.getvalue())


def _atomic_write_json(obj, path: Path) -> None:
    storage.write_bytes(str(path), (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _progress(items: Iterable[int], enabled: bool, desc: str, total: int) -> Iterable[int]:
    if not enabled:
        return items
    from tqdm import tqdm  # lazy: only when asked for

    return tqdm(items, desc=desc, total=total)


def make_sample_dataset(out_dir, n: int = 200, *, size: int = 128, seed: int = 0,
                        backgrounds: Sequence[str] = BACKGROUNDS, framings: Sequence[str] = FRAMINGS,
                        jpeg_fraction: float = 0.25, masks: bool = True, progress: bool = False) -> Path:
    """Writes `n` raw figures: out_dir/images/000000.png (or .jpg, quality 92, for ~jpeg_fraction of them),
    out_dir/masks/000000.png (L, 255 = figure) when `masks`, and out_dir/manifest.json, a list of records
    {file, mask, background, framing, width, height, format, ...} with paths relative to out_dir.

    Backgrounds and framings cycle through the given lists; canvases are square, 4:3 or 3:4 with `size` the
    longer side. Deterministic: the same arguments give identical bytes. Returns out_dir.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if not 0.0 <= jpeg_fraction <= 1.0:
        raise ValueError(f"jpeg_fraction={jpeg_fraction} must be within 0..1")
    backgrounds, framings = tuple(backgrounds), tuple(framings)
    if not backgrounds or not framings:
        raise ValueError("backgrounds and framings must each name at least one option")
    for name in backgrounds:
        _check_choice(name, BACKGROUNDS, "backgrounds")
    for name in framings:
        _check_choice(name, FRAMINGS, "framings")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "masks").mkdir(parents=True, exist_ok=True)
    records = []
    for i in _progress(range(n), progress, "sample figures", n):
        rng = np.random.default_rng([seed, i, 1])  # canvas and format, independent of the figure's stream
        aspect = ASPECTS[int(rng.choice(len(ASPECTS), p=ASPECT_WEIGHTS))]
        jpeg = bool(rng.random() < jpeg_fraction)
        image, mask, meta = render_figure(
            i, size=size, seed=seed, aspect=aspect, background=backgrounds[i % len(backgrounds)],
            framing=framings[(i // len(backgrounds)) % len(framings)])
        name = f"{i:06d}.jpg" if jpeg else f"{i:06d}.png"
        if jpeg:
            _atomic_save(image, out / "images" / name, "JPEG", quality=92)
        else:
            _atomic_save(image, out / "images" / name, "PNG")
        record = {"file": f"images/{name}", "mask": None, "format": "jpeg" if jpeg else "png", **meta}
        if masks:
            record["mask"] = f"masks/{i:06d}.png"
            _atomic_save(Image.fromarray(mask.astype(np.uint8) * 255), out / record["mask"], "PNG")
        records.append(record)
    _atomic_write_json(records, out / "manifest.json")
    logger.info("wrote %d synthetic figures to %s", n, out)
    return out


def make_clean_training_set(out_dir, n: int = 256, *, resolution: int = 32, seed: int = 0,
                            progress: bool = False) -> Path:
    """Writes `n` figures on white, square RGB PNGs at `resolution`, as a prepared dataset: out_dir/*.png and
    out_dir/dataset.json = {"labels": [["000000.png", framing_class], ...], "classes": list(FRAMINGS)}
    (the StyleGAN2-ADA label format plus class names). Framings alternate with the index. Returns out_dir."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if resolution < 16:
        raise ValueError(f"resolution={resolution} is too small for a figure (use resolution >= 16)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in _progress(range(n), progress, "training figures", n):
        framing = FRAMINGS[i % len(FRAMINGS)]
        pixels, _ = _render(make_spec(i, seed, background="solid", framing=framing), resolution, resolution,
                            on_white=True)
        name = f"{i:06d}.png"
        _atomic_save(Image.fromarray(pixels), out / name, "PNG")
        labels.append([name, FRAMINGS.index(framing)])
    _atomic_write_json({"labels": labels, "classes": list(FRAMINGS)}, out / "dataset.json")
    logger.info("wrote %d clean %dpx training figures to %s", n, resolution, out)
    return out
