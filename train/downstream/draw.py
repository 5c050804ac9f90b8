"""A prediction drawn on its input image, as a PNG: a quick look at what a model does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# one colour per parsing class (index 0, background, is left undrawn)
PALETTE = np.array([[0, 0, 0], [255, 85, 0], [255, 170, 0], [255, 0, 85], [255, 0, 170], [0, 255, 0], [85, 255, 0],
                    [170, 255, 0], [0, 255, 85], [0, 255, 170], [0, 0, 255], [85, 0, 255], [170, 0, 255],
                    [0, 85, 255], [0, 170, 255], [255, 255, 0], [255, 255, 85], [255, 255, 170], [255, 0, 255],
                    [255, 85, 255]], dtype=np.uint8)


def draw_prediction(image: np.ndarray, prediction: np.ndarray, path: Path, task: str) -> None:
    """`image` (H, W, 3) uint8; `prediction` a label map (parsing; any size, resized to the image)
    or (K, 2) landmarks in image pixels (alignment)."""
    canvas = Image.fromarray(image).convert("RGB")
    if task == "parsing":
        labels = Image.fromarray(prediction.astype(np.uint8)).resize(canvas.size, Image.NEAREST)
        colours = Image.fromarray(PALETTE[np.asarray(labels) % len(PALETTE)])
        mask = Image.fromarray(((np.asarray(labels) > 0) * 128).astype(np.uint8))
        canvas.paste(colours, (0, 0), mask)
    else:
        pen = ImageDraw.Draw(canvas)
        radius = max(1.0, max(canvas.size) / 200)
        for x, y in prediction:
            pen.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(0, 255, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
