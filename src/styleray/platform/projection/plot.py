"""The distance/PSNR curve of a projection as a PNG, drawn with Pillow (no plotting library needed).

Two panels over the same step axis: the distance (top) and the PSNR in dB (bottom), each with its range,
five labelled ticks and a grid; pivotal-tuning steps follow the search's, after a dashed marker.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

WIDTH, PANEL_HEIGHT = 720, 240
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 28, 34
COLORS = {"distance": (31, 119, 180), "psnr": (214, 39, 40), "axis": (60, 60, 60), "grid": (225, 225, 225)}


@dataclass(frozen=True)
class Series:
    title: str
    values: list[float]  # one per step (non-finite values are skipped)
    color: tuple[int, int, int]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / (n - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _panel(draw: ImageDraw.ImageDraw, top: int, series: Series, steps: int, marker: int | None, font) -> None:
    finite = [v for v in series.values if math.isfinite(v)]
    x0, x1 = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    y0, y1 = top + MARGIN_TOP, top + PANEL_HEIGHT - MARGIN_BOTTOM
    draw.text((x0, top + 6), series.title, fill=series.color, font=font)
    ticks = _nice_ticks(min(finite, default=0.0), max(finite, default=1.0))
    lo, hi = ticks[0], ticks[-1]

    def y_of(v: float) -> float:
        return y1 - (v - lo) / (hi - lo) * (y1 - y0)

    def x_of(step: int) -> float:
        return x0 + (step - 1) / max(steps - 1, 1) * (x1 - x0)

    for t in ticks:
        draw.line([(x0, y_of(t)), (x1, y_of(t))], fill=COLORS["grid"])
        draw.text((4, y_of(t) - 6), _label(t), fill=COLORS["axis"], font=font)
    for t in _nice_ticks(1, steps):
        if 1 <= t <= steps:
            draw.line([(x_of(int(t)), y1), (x_of(int(t)), y1 + 4)], fill=COLORS["axis"])
            draw.text((x_of(int(t)) - 8, y1 + 6), f"{int(t)}", fill=COLORS["axis"], font=font)
    draw.rectangle([x0, y0, x1, y1], outline=COLORS["axis"])
    draw.text((x1 - 24, y1 + 18), "step", fill=COLORS["axis"], font=font)
    if marker is not None:
        for y in range(y0, y1, 8):
            draw.line([(x_of(marker), y), (x_of(marker), min(y + 4, y1))], fill=COLORS["axis"])
        draw.text((x_of(marker) + 4, y0 + 2), "pivotal tuning", fill=COLORS["axis"], font=font)
    points = [(x_of(i + 1), y_of(v)) for i, v in enumerate(series.values) if math.isfinite(v)]
    if len(points) > 1:
        draw.line(points, fill=series.color, width=2)


def curve_png(history: list[tuple[int, float, float]], distance_name: str, tuning_from: int | None = None) -> bytes:
    """PNG of (step, distance, psnr) rows; ``tuning_from``: the first pivotal-tuning row (a marker there)."""
    if not history:
        raise ValueError("a curve needs at least one step")
    steps = len(history)
    panels = [
        Series(f"distance ({distance_name}) per step", [h[1] for h in history], COLORS["distance"]),
        Series("PSNR (dB) per step", [h[2] for h in history], COLORS["psnr"]),
    ]
    image = Image.new("RGB", (WIDTH, PANEL_HEIGHT * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i, series in enumerate(panels):
        _panel(draw, i * PANEL_HEIGHT, series, steps, tuning_from, font)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
