"""The contact sheet of a preparation run: accepted examples, then rejected ones captioned with their reason."""

from __future__ import annotations

import io
import os
from collections import defaultdict
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 112  # thumbnail side, pixels
CAPTION = 30  # caption height under each thumbnail, pixels
COLS = 8
HEADER = 26


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def pick_examples(records: list[dict], n: int, status: str) -> list[dict]:
    """Up to n records of `status`; for rejections, round-robin over reasons so that every reason shows."""
    chosen = [r for r in records if r["status"] == status]
    if status == "accepted":
        if len(chosen) <= n:
            return chosen
        idx = np.linspace(0, len(chosen) - 1, n).round().astype(int)
        return [chosen[i] for i in idx]
    by_reason = defaultdict(list)
    for r in chosen:
        by_reason[r["reason"]].append(r)
    out: list[dict] = []
    while len(out) < n and any(by_reason.values()):
        for reason in sorted(by_reason):
            if by_reason[reason] and len(out) < n:
                out.append(by_reason[reason].pop(0))
    return out


def _placeholder(text: str) -> Image.Image:
    im = Image.new("RGB", (TILE, TILE), (90, 90, 96))
    d = ImageDraw.Draw(im)
    d.line([(0, 0), (TILE, TILE)], fill=(140, 60, 60), width=3)
    d.line([(0, TILE), (TILE, 0)], fill=(140, 60, 60), width=3)
    d.text((6, TILE // 2 - 6), text[:16], fill=(255, 255, 255), font=_font(11))
    return im


def _thumb(data: bytes | None, reason: str) -> Image.Image:
    if data is None:
        return _placeholder(reason)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > 40_000_000:
                return _placeholder(reason)
            im.draft("RGB", (TILE * 2, TILE * 2))
            im = im.convert("RGB")
            scale = TILE / max(im.size)  # up or down: small outputs fill the tile too
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.LANCZOS)
    except Exception:  # an unreadable file is exactly what some rejections are
        return _placeholder(reason)
    tile = Image.new("RGB", (TILE, TILE), (235, 235, 240))
    tile.paste(im, ((TILE - im.width) // 2, (TILE - im.height) // 2))
    return tile


def render(sections: list[tuple[str, list[dict]]], image_bytes: Callable[[dict], bytes | None]) -> Image.Image:
    """A sheet with one block per (title, records); `image_bytes(record)` gives the picture to show."""
    font, small = _font(14), _font(10)
    height = sum(HEADER + max(1, -(-len(recs) // COLS)) * (TILE + CAPTION) for _, recs in sections) + 8
    sheet = Image.new("RGB", (COLS * TILE + 8, height), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    y = 4
    for title, recs in sections:
        d.text((6, y + 5), title, fill=(20, 20, 30), font=font)
        y += HEADER
        for i, r in enumerate(recs):
            x0, y0 = 4 + (i % COLS) * TILE, y + (i // COLS) * (TILE + CAPTION)
            reason = r.get("reason") or r["status"]
            sheet.paste(_thumb(image_bytes(r), reason), (x0, y0))
            colour = (20, 110, 40) if r["status"] == "accepted" else (170, 30, 30)
            label = r.get("framing") or "" if r["status"] == "accepted" else reason
            d.text((x0 + 3, y0 + TILE + 2), str(label)[:22], fill=colour, font=small)
            d.text((x0 + 3, y0 + TILE + 15), os.path.basename(r["source"])[:22], fill=(80, 80, 90), font=small)
        y += max(1, -(-len(recs) // COLS)) * (TILE + CAPTION)
    return sheet
