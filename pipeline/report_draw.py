"""The report's pictures, drawn with PIL: histograms as PNG and samples with their faces as JPEG."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SCALE = 2  # charts are drawn at twice their CSS size, to stay sharp on high-DPI screens
LANDMARK_COLORS = ("#ff3b30", "#007aff", "#ffcc00", "#ff2dff", "#00e5ff")  # eyes, nose, mouth corners
LANDMARK_NAMES = ("left eye", "right eye", "nose", "mouth left", "mouth right")


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size * SCALE)


def nice_step(span: float, bins: int, steps: Sequence[float] = (1, 2, 2.5, 5, 10)) -> float:
    """The smallest round step (1, 2, 2.5 or 5 times a power of ten) that cuts span in at most bins."""
    raw = max(span, 1e-9) / bins
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in steps if m * power >= raw)


def short(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:g}"


def histogram_edges(values: np.ndarray, bins: int, integer: bool) -> np.ndarray:
    """Bin edges at round numbers that hold every one of the (finite) values; one bin per value
    for integers that span at most 30."""
    spread = float(values.max() - values.min()) if len(values) else 0.0
    if len(values) and (spread == 0 or integer and spread <= 30):
        return np.arange(values.min(), values.max() + 1.5) - 0.5
    if not len(values):
        return np.array([0.0, 1.0])
    step = nice_step(spread, bins)
    lo, hi = math.floor(values.min() / step) * step, math.ceil(values.max() / step) * step
    edges = np.arange(lo, hi + step * 0.999, step) if hi > lo else np.array([lo, lo + step])
    # decimal steps are not exact in binary: np.histogram drops what falls outside the edges
    edges[0], edges[-1] = min(edges[0], values.min()), max(edges[-1], values.max())
    return edges


def draw_histogram(values: np.ndarray, title: str, xlabel: str, ylabel: str,
                   bins: int = 12, integer: bool = False) -> bytes:
    """A bar chart of values as PNG bytes: title, axes with labels and ticks, a count over each bar."""
    w, h, left, right, top, bottom = 520, 270, 58, 14, 34, 50
    img = Image.new("RGB", (w * SCALE, h * SCALE), "white")
    d = ImageDraw.Draw(img)
    S = lambda *xy: [v * SCALE for v in xy]  # noqa: E731 - points in CSS pixels
    d.text(S(left, 8), title, fill="#222", font=font(14))
    x0, x1, y0, y1 = left, w - right, h - bottom, top
    values = values[np.isfinite(values)]
    edges = histogram_edges(values, bins, integer)
    counts, _ = np.histogram(values, bins=edges)
    peak = max(int(counts.max()) if len(counts) else 0, 1)
    xs = lambda v: x0 + (v - edges[0]) / (edges[-1] - edges[0]) * (x1 - x0)  # noqa: E731
    ys = lambda c: y0 - c / peak * (y0 - y1 - 14)  # noqa: E731 - room for the top count
    for i, c in enumerate(counts):
        a, b = xs(edges[i]) + 1, xs(edges[i + 1]) - 1
        if c:
            d.rectangle(S(a, ys(c), b, y0), fill="#4c78a8")
        if c and b - a >= 14:
            d.text(S((a + b) / 2, ys(c) - 2), short(c), fill="#333", font=font(9), anchor="md")
    d.line(S(x0, y1, x0, y0, x1, y0), fill="#444", width=SCALE)
    ystep = max(1, int(nice_step(peak, 3, (1, 2, 5, 10))))
    for c in range(0, peak + 1, ystep):
        d.line(S(x0 - 4, ys(c), x0, ys(c)), fill="#444", width=SCALE)
        d.text(S(x0 - 6, ys(c)), short(c), fill="#444", font=font(10), anchor="rm")
    if integer:
        ticks = [(xs(e + 0.5), f"{e + 0.5:g}") for e in edges[:-1]]
    else:
        step = edges[1] - edges[0]
        decimals = next((n for n in range(8) if abs(round(step, n) - step) < 1e-9 * max(1.0, step)), 8)
        ticks = [(xs(e), f"{e:.{decimals}f}") for e in edges]
    every = max(1, math.ceil(len(ticks) * 44 / (x1 - x0)))  # at most one label per 44 px
    for x, label in ticks[::every]:
        d.line(S(x, y0, x, y0 + 4), fill="#444", width=SCALE)
        d.text(S(x, y0 + 6), label, fill="#444", font=font(10), anchor="ma")
    d.text(S((x0 + x1) / 2, h - 6), xlabel, fill="#222", font=font(11), anchor="md")
    text = Image.new("RGB", (int(d.textlength(ylabel, font=font(11))) + 4, 16 * SCALE), "white")
    ImageDraw.Draw(text).text((0, 0), ylabel, fill="#222", font=font(11))
    text = text.rotate(90, expand=True)
    img.paste(text, (4 * SCALE, int((y0 + y1) / 2 * SCALE - text.height / 2)))
    if not len(values):
        d.text(S((x0 + x1) / 2, (y0 + y1) / 2), "no data", fill="#999", font=font(14), anchor="mm")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def draw_sample(jpeg: bytes, row: dict[str, Any], side: int = 280) -> bytes:
    """The stored image as a thumbnail with its face boxes and 5 landmarks drawn (JPEG bytes)."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    img.thumbnail((side, side))
    scale = img.width / (row["original_width"] or img.width)  # faces are in original-image pixels
    d = ImageDraw.Draw(img)
    for face in row["faces"] or []:
        box = [v * scale for v in face["box"]]
        d.rectangle(box, outline="#000", width=4)
        d.rectangle(box, outline="#39ff6a", width=2)
        for (x, y), color in zip(face["landmarks"] or [], LANDMARK_COLORS):
            r = max(2.0, (box[2] - box[0]) / 30)
            d.ellipse([x * scale - r, y * scale - r, x * scale + r, y * scale + r], fill=color, outline="#000")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def as_jpeg(data: bytes | None) -> bytes | None:
    """JPEG bytes as they are, other images re-encoded, None for what is no image."""
    try:
        with Image.open(io.BytesIO(data or b"")) as img:
            if img.format == "JPEG":
                return data
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=88)
            return buf.getvalue()
    except (OSError, ValueError, SyntaxError):
        return None
