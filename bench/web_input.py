"""A web-like input for bench.web_speed: distinct photos at web sizes, with copies and failures.

bench.speed_input serves 48 photos each varied by one pixel: every row a near-copy of 40 others,
which no crawl looks like. Here, per 100 rows, about:
- 80 distinct images: a random crop (35-90 % of each side, anywhere) of one of the demo's photos
  (demo.data.make_demo_images: insightface's and skimage's photos, faces and not), its longer side
  drawn log-uniform from 160 to 1,600 px (LAION's advertised sizes spread over that range), JPEG
  quality 70-95, one in ten a PNG;
- 8 near-copies of an earlier distinct image: the same crop at 0.5-1.5 x its size and another quality;
- 4 exact copies: an earlier image's bytes at another URL;
- 2 rows repeating an earlier row's URL;
- 6 failures: 404, 500, and an HTML page where an image was expected.
Two distinct crops of one photo can still be near-copies (a large crop of a small photo); the
builder's statuses say how many it removed.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from demo.data import LAION_SCHEMA, make_demo_images
from demo.server import ImageServer

FAILURES = ("404", "500", "html")
SHARES = {"distinct": 0.80, "near_copy": 0.08, "exact_copy": 0.04, "same_url": 0.02, "failure": 0.06}


@dataclass
class WebRow:
    kind: str  # a SHARES key
    path: str  # on the server
    data: bytes | None  # None: a failure route or a repeated URL
    width: int
    height: int


def _photos() -> list[Image.Image]:
    return [Image.open(io.BytesIO(image.data)).convert("RGB") for image in make_demo_images(0)]


def _render(args: tuple[int, int, tuple[float, float, float, float], int, bool]) -> tuple[bytes, int, int]:
    """One image: crop (fractions of the photo) of photo `index`, longer side `side`, JPEG at `quality` or PNG."""
    index, side, (left, top, width, height), quality, png = args
    photo = _PHOTOS[index]
    box = (int(left * photo.width), int(top * photo.height),
           int((left + width) * photo.width), int((top + height) * photo.height))
    crop = photo.crop(box)
    scale = side / max(crop.size)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    crop.save(out, format="PNG") if png else crop.save(out, format="JPEG", quality=quality)
    return out.getvalue(), crop.width, crop.height


_PHOTOS: list[Image.Image] = []


def _init() -> None:
    _PHOTOS.extend(_photos())


def make_web_rows(n: int, seed: int = 0) -> list[WebRow]:
    """n rows as the module docstring describes, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(list(SHARES), size=n, p=list(SHARES.values()))
    kinds[0] = "distinct"  # the copies need something earlier to copy
    photos = len(make_demo_images(0))
    specs, origin = [], {}  # specs of rendered rows; the distinct row a copy renders from
    for i, kind in enumerate(kinds):
        if kind == "distinct":
            w, h = rng.uniform(0.35, 0.9, 2)
            crop = (float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h)), float(w), float(h))
            specs.append((i, (int(rng.integers(photos)), int(np.exp(rng.uniform(np.log(160), np.log(1600)))), crop,
                              int(rng.integers(70, 96)), bool(rng.random() < 0.1))))
        elif kind == "near_copy":
            index, side, crop, _, png = dict(specs)[int(rng.choice([j for j, _ in specs]))]
            specs.append((i, (index, max(64, int(side * rng.uniform(0.5, 1.5))), crop, int(rng.integers(70, 96)), png)))
        elif kind in ("exact_copy", "same_url"):
            origin[i] = int(rng.choice([j for j, _ in specs]))
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=mp.get_context("fork"),
                             initializer=_init) as pool:
        rendered = dict(zip([i for i, _ in specs], pool.map(_render, [spec for _, spec in specs], chunksize=16)))
    rows = []
    for i, kind in enumerate(kinds):
        if i in rendered or kind == "exact_copy":
            data, width, height = rendered[i if i in rendered else origin[i]]
            suffix = "png" if data.startswith(b"\x89PNG") else "jpg"
            rows.append(WebRow(str(kind), f"/w/{i:07d}.{suffix}", data, width, height))
        elif kind == "same_url":
            rows.append(WebRow("same_url", rows[origin[i]].path, None, rows[origin[i]].width, rows[origin[i]].height))
        else:
            rows.append(WebRow("failure", f"/fault/{FAILURES[i % len(FAILURES)]}?row={i}", None, 640, 480))
    return rows


def serve(rows: list[WebRow], server: ImageServer) -> None:
    for row in rows:
        if row.data is not None:
            server.add(row.path, row.data, "image/png" if row.path.endswith(".png") else "image/jpeg")


def write_web_input(path: str, rows: list[WebRow], server: ImageServer) -> None:
    n = len(rows)
    rng = np.random.default_rng(1)
    pq.write_table(pa.table({
        "SAMPLE_ID": np.arange(1, n + 1, dtype=np.int64), "URL": [server.url(r.path) for r in rows],
        "TEXT": [f"a photo, row {i}" for i in range(n)], "HEIGHT": [r.height for r in rows],
        "WIDTH": [r.width for r in rows], "LICENSE": ["?"] * n, "NSFW": ["UNLIKELY"] * n,
        "similarity": rng.uniform(0.25, 0.45, size=n)}, schema=LAION_SCHEMA), path)
