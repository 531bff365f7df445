"""Small PNG line charts drawn with Pillow, for evaluation artifacts logged to MLflow.

Pillow rather than matplotlib because matplotlib's import alone costs more than
scoring a small validation set, and the charts needed here are simple: a few
named series of (x, y) points, optionally on log axes, with a legend and a note
line (e.g. which lengths a model could not score).
"""

from __future__ import annotations

import math
from pathlib import Path

COLORS = [(70, 110, 180), (200, 80, 60), (60, 150, 90), (150, 90, 170), (220, 150, 40), (40, 160, 170),
          (120, 120, 120), (180, 60, 130)]


def _ticks(lo: float, hi: float, log: bool, n: int = 5) -> list[float]:
    """Round tick values enclosing [lo, hi]: powers of two on a log axis spanning an octave or more,
    else steps of 1, 2 or 5 times a power of ten."""
    if log and hi / lo >= 2:
        a, b = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
        step = max(1, math.ceil((b - a) / 8))
        return [2.0 ** e for e in range(a, b + 1, step)]
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / (n - 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = [start + i * step for i in range(math.ceil((hi - start) / step - 1e-9) + 1)]
    return [t for t in ticks if t > 0] if log else ticks


def _label(v: float) -> str:
    return f"{v:.6g}"  # ticks are round numbers: this only drops float noise (249.20000000000002)


def line_chart(path: str | Path, series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str,
               y_label: str, log_x: bool = False, log_y: bool = False, note: str = "") -> None:
    """Write a PNG with one polyline (and dots) per named series; non-finite points are left out."""
    from PIL import Image, ImageDraw

    pts = {k: [(x, y) for x, y in v if math.isfinite(x) and math.isfinite(y) and (not log_x or x > 0)
               and (not log_y or y > 0)] for k, v in series.items()}
    xs = [x for v in pts.values() for x, _ in v] or [1.0]
    ys = [y for v in pts.values() for _, y in v] or [1.0]
    fx = (lambda v: math.log2(v)) if log_x else (lambda v: v)
    fy = (lambda v: math.log2(v)) if log_y else (lambda v: v)
    x_ticks, y_ticks = _ticks(min(xs), max(xs), log_x), _ticks(min(ys), max(ys), log_y)
    x0, x1 = fx(min(x_ticks + xs)), fx(max(x_ticks + xs))
    y0, y1 = fy(min(y_ticks + ys)), fy(max(y_ticks + ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    W, H, left, right, top, bottom = 760, 420, 70, 170, 46, 50
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (fy(y) - y0) / (y1 - y0) * (H - top - bottom))

    draw.text((left, 8), title, fill="black")
    if note:
        draw.text((left, 24), note, fill=(150, 40, 40))
    draw.line([left, H - bottom, W - right, H - bottom], fill="black")
    draw.line([left, top, left, H - bottom], fill="black")
    for t in x_ticks:
        px, _ = at(t, y_ticks[0])
        draw.line([px, H - bottom, px, H - bottom + 4], fill="black")
        draw.text((px - 8, H - bottom + 6), _label(t), fill="black")
    for t in y_ticks:
        _, py = at(x_ticks[0], t)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), _label(t), fill="black")
    draw.text(((left + W - right) / 2 - 30, H - 18), x_label, fill="black")
    draw.text((4, top - 30), y_label, fill="black")
    for i, (name, v) in enumerate(pts.items()):
        color = COLORS[i % len(COLORS)]
        xy = [at(x, y) for x, y in sorted(v)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        ly = top + 16 * i
        draw.line([W - right + 12, ly + 6, W - right + 32, ly + 6], fill=color, width=3)
        draw.text((W - right + 38, ly), name, fill="black")
    img.save(path, format="PNG")
