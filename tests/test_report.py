"""pipeline.report: the HTML report of a build, checked on the real demo build and in Chromium.

Most checks read the generated HTML and the output tables directly (pyarrow, PIL), so they run
anywhere. A small hand-made output (no Ray, no detector) covers what the demo cannot show on
its own: unknown statuses, reject thumbnails, an fsspec URL, the command line.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chromium import Browser, ensure_chromium
from outputs import metadata_table, status_table
from pipeline import report
from pipeline.schema import METADATA_SCHEMA, STATUS_SCHEMA

REJECTS_SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                            ("url", pa.string()), ("thumbnail", pa.binary())])


# --- reading the page back ---------------------------------------------------------------------

def references(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]*)"', page)


def page_counts(page: str) -> dict[str, int]:
    rows = re.findall(r'<tr data-status="([^"]+)"><td><code>[^<]*</code></td><td class="n">([\d,]+)</td>', page)
    return {status: int(n.replace(",", "")) for status, n in rows}


def page_funnel(page: str) -> dict[str, int]:
    stages = re.findall(r'<div class="row" data-stage="([^"]+)">.*?<span class="count">([\d,]+)</span>', page)
    return {stage: int(n.replace(",", "")) for stage, n in stages}


def sheet_images(page: str) -> list[str]:
    return re.findall(r'<img src="(sample_\d+\.jpg)"', page)


def check_self_contained(index: Path) -> str:
    """Every reference is a file beside index.html (or an anchor); nothing inline, nothing remote."""
    page = index.read_text()
    folder = index.parent
    for ref in references(page):
        if ref.startswith("#"):
            assert f'id="{ref[1:]}"' in page, ref
            continue
        assert "/" not in ref and ":" not in ref, f"not a file beside index.html: {ref}"
        assert (folder / ref).is_file(), f"missing: {ref}"
        with Image.open(folder / ref) as image:
            assert image.format in ("PNG", "JPEG") and image.width > 0
    assert "<script" not in page and "<link" not in page and "<iframe" not in page, "no scripts or linked resources"
    style = page.split("<style>")[1].split("</style>")[0]
    assert "@import" not in style and "url(" not in style, "no resources from the style sheet"
    return page


# --- the real demo build -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_report(built_output: Path) -> Path:
    index = Path(report.write_report(str(built_output)))
    assert index == built_output / "report" / "index.html"
    return index


def test_report_is_self_contained(demo_report: Path) -> None:
    page = check_self_contained(demo_report)
    for name, *_ in report.HISTOGRAMS:
        assert f'src="hist_{name}.png"' in page
    stats = json.loads((demo_report.parent.parent / "stats.json").read_text())
    assert stats["last_run"]["finished_at"] in page


def test_counts_and_funnel_match_the_status_tables(demo_report: Path, built_output: Path) -> None:
    page = demo_report.read_text()
    counts = Counter(status_table(built_output)["status"].to_pylist())
    assert page_counts(page) == dict(counts)
    funnel = page_funnel(page)
    total = sum(counts.values())
    assert funnel["input"] == total and funnel["written"] == counts["ok"]
    assert funnel["downloaded"] == total - sum(counts[s] for s in report.NOT_DOWNLOADED)
    assert funnel["decoded"] == funnel["downloaded"] - counts["decode_error"] - counts["image_too_large"]
    faces = counts["ok"] + counts["duplicate_image"] + counts["near_duplicate"] + counts["benchmark_overlap"]
    assert funnel["has face"] == faces
    assert funnel["unique"] == faces - counts["duplicate_image"] - counts["near_duplicate"]
    assert list(funnel.values()) == sorted(funnel.values(), reverse=True)


def test_contact_sheet_shows_written_samples(demo_report: Path, built_output: Path) -> None:
    page = demo_report.read_text()
    metadata = metadata_table(built_output)
    shown = sheet_images(page)
    assert len(shown) == min(24, metadata.num_rows) > 0
    keys = re.findall(r'<figcaption><code>(\d{14})</code>', page)
    assert len(keys) == len(shown) and set(keys) <= set(metadata["key"].to_pylist())
    by_key = {row["key"]: row for row in metadata.to_pylist()}
    for name, key in zip(shown, keys):
        with Image.open(demo_report.parent / name) as image:
            assert max(image.size) <= 280
            assert image.width / image.height == pytest.approx(by_key[key]["width"] / by_key[key]["height"], rel=0.05)


def test_rejected_rows_are_shown_per_status(demo_report: Path, built_output: Path) -> None:
    page = demo_report.read_text()
    rejected = {s for s in status_table(built_output)["status"].to_pylist() if s != "ok"}
    assert set(re.findall(r'<h3 id="reject-([a-z_]+)">', page)) == rejected
    if list(built_output.glob("rejects/*.parquet")):
        assert re.findall(r'<img src="(reject_\d+\.jpg)"', page), "the build kept reject thumbnails: they are drawn"


def test_report_is_deterministic(demo_report: Path, built_output: Path) -> None:
    before = {p.name: p.read_bytes() for p in demo_report.parent.iterdir()}
    report.write_report(str(built_output))
    assert {p.name: p.read_bytes() for p in demo_report.parent.iterdir()} == before


def test_report_renders_in_chromium(demo_report: Path, tmp_path: Path) -> None:
    """Open the report in headless Chromium and check that it renders, cleanly, from local files only.

    Chromium is driven over the DevTools protocol through `--remote-debugging-pipe` (tests/chromium.py):
    no port, no websocket package, and the browser's own view of the page rather than a scraped
    `--dump-dom`. After the load event, every <img> must have loaded (complete, naturalWidth > 0),
    every network request must be for a file:// URL, no exception, console error or error log
    entry (a failed image load is one) may have been reported, and a full-page screenshot must be
    tall and not blank.
    """
    executable, why_not = ensure_chromium()
    if executable is None:
        pytest.skip(why_not)
    with Browser(executable) as browser:
        browser.call("Network.enable")
        browser.open(demo_report.as_uri())
        images = browser.evaluate(
            "[...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}))")
        shot = browser.screenshot(tmp_path / "report.png")
        requests = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
        errors = browser.errors()
    page = demo_report.read_text()
    assert len(images) == page.count("<img ") > len(report.HISTOGRAMS)
    assert [i["src"] for i in images if not i["ok"]] == []
    assert requests and all(url.startswith("file://") for url in requests), requests
    assert errors == []
    with Image.open(shot) as image:
        assert image.width >= 1000 and image.height > 2000
        colours = image.convert("L").resize((64, 256)).getextrema()
        assert colours[1] - colours[0] > 100, "the screenshot is blank"


# --- a hand-made output: unknown statuses, reject thumbnails, fsspec, the command line ------------

def jpeg(colour: str, size: tuple[int, int] = (80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def status_row(row: int, status: str, reason: str | None = None) -> dict:
    key = f"{row:014d}"
    return {"input_file": "in.parquet", "input_row": row, "unit": 0, "sample_id": row, "url": f"http://x/{row}.jpg",
            "key": key if status == "ok" else None, "shard": "00000" if status == "ok" else None,
            "status": status, "reason": reason or f"because {status}", "duplicate_of": None, "http_status": 200}


@pytest.fixture()
def small_output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    for sub in ("status", "metadata", "shards", "rejects"):
        (out / sub).mkdir(parents=True)
    statuses = ["ok"] * 3 + ["no_face"] * 4 + ["timeout", "near_duplicate", "benchmark_overlap", "mystery_status",
                                                "duplicate_image", "decode_error"]
    rows = [status_row(i, s, "<b>&amp; escaped</b>" if s == "no_face" else None) for i, s in enumerate(statuses)]
    pq.write_table(pa.Table.from_pylist(rows, schema=STATUS_SCHEMA), out / "status" / "00000.parquet")
    face = {"box": [10.0, 10.0, 110.0, 130.0], "landmarks": [[40.0, 50.0], [80.0, 50.0], [60.0, 80.0],
                                                                [45.0, 100.0], [75.0, 100.0]], "score": 0.97}
    meta = [{"key": f"{i:014d}", "shard": "00000", "url": f"http://x/{i}.jpg", "caption": "<script>x</script> " * i,
             "sample_id": i, "width": 80, "height": 60, "original_width": 160, "original_height": 120,
             "sha256": str(i), "num_faces": 1, "faces": [face], "license": None, "nsfw": None, "similarity": 0.3}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(meta, schema=METADATA_SCHEMA), out / "metadata" / "00000.parquet")
    with tarfile.open(out / "shards" / "00000.tar", "w") as tar:
        for row in meta:
            data = jpeg("#c08060")
            info = tarfile.TarInfo(f"{row['key']}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rejects = [{"key": f"{i:014d}", "status": "no_face", "reason": "the detector found no face",
                "url": f"http://x/{i}.jpg", "thumbnail": jpeg("#3060a0")} for i in range(3, 7)]
    rejects.append({"key": "00000000000012", "status": "decode_error", "reason": "x", "url": "u", "thumbnail": b"junk"})
    pq.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), out / "rejects" / "00000.parquet")
    return out


def test_funnel_places_every_status() -> None:
    counts = Counter(ok=5, timeout=2, decode_error=1, no_face=3, duplicate_image=2, near_duplicate=1,
                     benchmark_overlap=1, something_new=4)
    assert [(name, n) for name, n, _ in report.funnel(counts)] == [
        ("input", 19), ("downloaded", 17), ("decoded", 16), ("has face", 9), ("unique", 6), ("written", 5)]
    assert report.funnel(counts)[3][2] == {"no_face": 3, "something_new": 4}
    assert [n for _, n, _ in report.funnel(Counter())] == [0] * 6


def test_small_output_unknown_statuses_and_thumbnails(small_output: Path) -> None:
    index = Path(report.write_report(str(small_output)))
    page = check_self_contained(index)
    assert page_counts(page)["mystery_status"] == 1 and "does not know" in page
    funnel = page_funnel(page)
    assert (funnel["has face"], funnel["unique"], funnel["written"]) == (6, 4, 3)
    assert len(sheet_images(page)) == 3
    no_face = page.split('id="reject-no_face"')[1].split("<h3")[0]
    assert len(re.findall(r'src="reject_\d+\.jpg"', no_face)) == 4, "thumbnails from OUT/rejects"
    timeout = page.split('id="reject-timeout"')[1].split("<h3")[0]
    assert "http://x/7.jpg" in timeout and "<table" in timeout, "no thumbnails: example URLs instead"
    assert "&lt;script&gt;" in page and "<script>" not in page
    with Image.open(index.parent / sheet_images(page)[0]) as image:  # box scaled by width/original_width
        inside, outside = image.convert("RGB").getpixel((5, 15)), image.convert("RGB").getpixel((2, 15))
        assert inside[1] > inside[0] + 50, f"the box is drawn at x=5 (10 original px, halved): {inside}"
        assert outside[1] < outside[0], f"and not left of it: {outside}"
    (small_output / "rejects" / "00000.parquet").unlink()
    (index.parent / "stale.png").write_bytes(b"")
    page = Path(report.write_report(str(small_output))).read_text()
    assert not re.search(r'src="reject_', page) and "http://x/3.jpg" in page
    assert not (index.parent / "stale.png").exists()


def test_fsspec_url_and_command_line(small_output: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.put(str(small_output), "/report-test/out", recursive=True)
    try:
        assert report.write_report("memory://report-test/out") == "memory://report-test/out/report/index.html"
        assert fs.exists("/report-test/out/report/hist_faces.png")
    finally:
        fs.rm("/report-test", recursive=True)
    done = subprocess.run([sys.executable, "-m", "pipeline.report", str(small_output), "--samples", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(small_output / "report" / "index.html")
    assert len(sheet_images((small_output / "report" / "index.html").read_text())) == 2
    missing = subprocess.run([sys.executable, "-m", "pipeline.report", str(small_output / "nothing")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and not missing.stdout


@pytest.mark.parametrize("values", [[0.5, 0.9, 1.3], [0.1, 0.15, 0.2], [0.85, 1.0, 1.24]])
def test_histogram_edges_hold_every_value(values: list[float]) -> None:
    """Decimal steps are inexact in binary: without care the first or last edge misses the extreme value."""
    from pipeline.report_draw import histogram_edges

    edges = histogram_edges(np.array(values), 12, integer=False)
    assert np.histogram(values, bins=edges)[0].sum() == len(values)
    rng = np.random.default_rng(0)
    for _ in range(500):  # about 10 % of such ranges lost a value before
        sample = np.round(rng.uniform(0, rng.choice([0.5, 2.0, 50.0]), size=rng.integers(2, 30)), rng.integers(1, 4))
        assert np.histogram(sample, bins=histogram_edges(sample, 12, integer=False))[0].sum() == len(sample)
