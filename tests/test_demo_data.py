"""The embedded demo input: real photos, their variants, and the LAION-format parquet."""

from __future__ import annotations

import collections
import io
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import insightface
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from demo.data import EXIF_ORIENTATION, LAION_SCHEMA, DemoImage, make_demo_images, write_demo_input
from demo.server import ImageServer

NUM_ROWS = 300


@pytest.fixture(scope="module")
def images() -> list[DemoImage]:
    return make_demo_images(0)


@pytest.fixture(scope="module")
def by_name(images: list[DemoImage]) -> dict[str, DemoImage]:
    return {img.name: img for img in images}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ImageServer, dict[str, int], pa.Table]]:
    path = tmp_path_factory.mktemp("demo") / "sub" / "laion.parquet"
    with ImageServer() as srv:
        counts = write_demo_input(str(path), srv, num_rows=NUM_ROWS, seed=0)
        yield srv, counts, pq.read_table(path)


def open_image(img: DemoImage) -> Image.Image:
    return Image.open(io.BytesIO(img.data))


def test_images_are_real_photos_with_and_without_faces(images: list[DemoImage], by_name: dict[str, DemoImage]) -> None:
    assert len({img.name for img in images}) == len(images)
    shipped = Path(os.path.dirname(insightface.__file__)) / "data" / "images" / "t1.jpg"
    assert by_name["t1.jpg"].data == shipped.read_bytes() and by_name["t1.jpg"].has_face
    faces = collections.Counter(img.has_face for img in images)
    assert faces[True] >= 15 and faces[False] >= 15 and faces[None] >= 1
    assert sum(len(img.data) for img in images) < 25_000_000
    for img in images:
        with open_image(img) as decoded:
            decoded.load()
            assert decoded.format.lower() == img.content_type.removeprefix("image/")
        assert img.note.startswith(img.source + ":")


def test_mask_photos_are_faceless(by_name: dict[str, DemoImage]) -> None:
    # insightface ships product shots of surgical masks, not masked faces.
    masks = [img for name, img in by_name.items() if name.startswith("mask_")]
    assert len(masks) == 4 and not any(img.has_face for img in masks)


def test_deterministic_per_seed(images: list[DemoImage]) -> None:
    assert [(i.name, i.data) for i in make_demo_images(0)] == [(i.name, i.data) for i in images]
    assert [i.name for i in make_demo_images(1)] != [i.name for i in images]


def test_variants(images: list[DemoImage], by_name: dict[str, DemoImage]) -> None:
    sizes = [max(img.size) for img in images]
    assert max(sizes) >= 3000 and min(sizes) <= 40
    assert by_name["astronaut_tiny.jpg"].has_face is None
    assert open_image(by_name["t1_grey.jpg"]).mode == "L"
    assert open_image(by_name["camera.png"]).mode == "L"
    assert any("pair" in name for name in by_name) and any("inset" in name for name in by_name)
    alpha = open_image(by_name["astronaut_alpha.png"])
    assert alpha.mode == "RGBA" and alpha.getchannel("A").getextrema() == (0, 255)


def test_exif_rotated_jpeg(by_name: dict[str, DemoImage]) -> None:
    img = by_name["t1_exif6.jpg"]
    stored = open_image(img)
    assert stored.getexif()[EXIF_ORIENTATION] == 6
    upright = ImageOps.exif_transpose(stored)
    assert stored.size == upright.size[::-1] == img.size[::-1]
    assert upright.width > upright.height  # t1 is landscape once turned


def test_parquet_has_laion_columns_and_types(served: tuple[ImageServer, dict[str, int], pa.Table]) -> None:
    _, counts, table = served
    assert table.schema.equals(LAION_SCHEMA)
    assert table.num_rows == counts["rows"] == NUM_ROWS
    ids = table["SAMPLE_ID"].to_pylist()
    assert len(set(ids)) == NUM_ROWS
    assert set(table["NSFW"].to_pylist()) <= {"UNLIKELY", "UNSURE", "NSFW"}
    assert table["NSFW"].to_pylist().count("UNLIKELY") > 0.8 * NUM_ROWS
    sims = table["similarity"].to_pylist()
    assert 0.25 <= min(sims) and max(sims) <= 0.45
    assert all(text for text in table["TEXT"].to_pylist())
    assert table["WIDTH"].null_count > 0 and table["LICENSE"].null_count == 0


def test_parquet_rows_cover_the_faults(served: tuple[ImageServer, dict[str, int], pa.Table]) -> None:
    srv, counts, table = served
    urls = table["URL"].to_pylist()
    assert sum(v for k, v in counts.items() if k not in ("rows", "images", "face_rows", "nonface_rows")) == NUM_ROWS
    assert max(collections.Counter(urls).values()) >= 3 and counts["duplicate_url"] >= 3
    assert counts["broken"] == round(0.05 * NUM_ROWS)
    for route in ("404", "500", "stall", "drip", "truncated", "html", "429"):
        assert any(f"/fault/{route}?" in url for url in urls), route
    assert "file:///etc/passwd" in urls
    assert srv.url("/fault/redirect?to=http%3A%2F%2F127.0.0.1%3A1%2Fx") in urls
    for fragment in ("/fault/optout?tag=noai", "/fault/bomb", "/fault/oversize?", "/fault/loop"):
        assert any(fragment in url for url in urls), fragment
    assert counts["face_rows"] > 50 and counts["nonface_rows"] > 50
    assert counts["images"] < counts["image_rows"]  # so the same bytes recur at different URLs


def test_image_urls_serve_their_images_at_their_sizes(served: tuple[ImageServer, dict[str, int], pa.Table],
                                                     by_name: dict[str, DemoImage]) -> None:
    srv, _, table = served
    seen: set[str] = set()
    for row in table.to_pylist():
        name = row["URL"].partition("/img/")[2].partition("?")[0]
        if not name or name in seen:
            continue
        seen.add(name)
        with urllib.request.urlopen(row["URL"], timeout=5) as resp:
            assert resp.read() == by_name[name].data
        if row["WIDTH"] is not None:
            assert (row["WIDTH"], row["HEIGHT"]) == by_name[name].size
    assert "t1.jpg" in seen and len(seen) == len(by_name)


def test_too_few_rows_is_refused(tmp_path: Path) -> None:
    with ImageServer() as srv, pytest.raises(ValueError):
        write_demo_input(str(tmp_path / "x.parquet"), srv, num_rows=10)
