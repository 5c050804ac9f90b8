"""train.transfer's picture, drawn with PIL (no plotting library in the lock): a panel per task, its
number against the training fraction (log scale), a line per init."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = ("#0a84ff", "#ff453a", "#30d158", "#ff9f0a", "#bf5af2", "#64d2ff", "#ffd60a", "#8e8e93")
PANEL, MARGIN = (420, 300), 56


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_transfer(rows: list[dict], higher_is_better: dict[str, bool], path: Path) -> None:
    """rows: train.transfer.collect's (the validation-chosen number, else the best-epoch one)."""
    tasks = list(higher_is_better)
    inits = list(dict.fromkeys(r["init"] for r in rows))
    image = Image.new("RGB", (PANEL[0] * max(1, len(tasks)), PANEL[1] + 24 * max(1, len(inits))), "white")
    pen = ImageDraw.Draw(image)
    for panel, task in enumerate(tasks):
        left, mine = panel * PANEL[0], [r for r in rows if r["task"] == task]
        x0, y0, x1, y1 = left + MARGIN, 34, left + PANEL[0] - 16, PANEL[1] - 40
        pen.rectangle([x0, y0, x1, y1], outline="#c7c7cc")
        arrow = "higher is better" if higher_is_better[task] else "lower is better"
        pen.text((x0, 8), f"{task} ({mine[0]['metric'] if mine else 'not run'}, {arrow})", fill="black", font=_font(14))
        if not mine:
            continue
        values = [r["val_chosen_test"] if r["val_chosen_test"] is not None else r["best_epoch_test"] for r in mine]
        fractions = sorted({r["fraction"] for r in mine})
        low, high = min(values), max(values)
        span, xspan = (high - low) or 1.0, (math.log10(fractions[-1]) - math.log10(fractions[0])) or 1.0

        def at(fraction: float, value: float) -> tuple[float, float]:
            x = x0 + 12 + (x1 - x0 - 24) * (math.log10(fraction) - math.log10(fractions[0])) / xspan
            return x, y1 - 12 - (y1 - y0 - 24) * (value - low) / span

        for fraction in fractions:
            pen.text((at(fraction, low)[0] - 10, y1 + 6), f"{fraction:g}", fill="black", font=_font(12))
        for value in (low, high):
            pen.text((left + 4, at(fractions[0], value)[1] - 7), f"{value:.3f}", fill="black", font=_font(12))
        pen.text((x0 + (x1 - x0) // 2 - 50, y1 + 22), "training fraction", fill="#3a3a3c", font=_font(12))
        for n, init in enumerate(inits):
            points = sorted((r["fraction"], v) for r, v in zip(mine, values) if r["init"] == init)
            xy = [at(f, v) for f, v in points]
            color = COLORS[n % len(COLORS)]
            if len(xy) > 1:
                pen.line(xy, fill=color, width=3)
            for x, y in xy:
                pen.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
    for n, init in enumerate(inits):
        y = PANEL[1] + 4 + 24 * n
        pen.rectangle([MARGIN, y + 4, MARGIN + 18, y + 14], fill=COLORS[n % len(COLORS)])
        pen.text((MARGIN + 26, y), init, fill="black", font=_font(14))
    image.save(path)
