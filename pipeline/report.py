"""A self-contained HTML report of a build: OUT/report/index.html plus its PNG/JPEG images.

    python -m pipeline.report OUT          # OUT: local path or fsspec URL

Made to be looked at: where the input rows went (counts and a funnel), histograms of what was
written, a seeded contact sheet of written samples with their faces drawn, and examples of
what was rejected and why. No scripts, no external resources: plain HTML, one inline <style>.
Gathering (pure functions over the output tables) is kept apart from drawing (report_draw.py)
and rendering.
"""

from __future__ import annotations

import argparse
import html
import random
import sys
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.report_draw import LANDMARK_COLORS, LANDMARK_NAMES, as_jpeg, draw_histogram, draw_sample
from pipeline.schema import STATUSES
from pipeline.storage import Output

# Rows that never got an HTTP body; every other status was downloaded.
NOT_DOWNLOADED = frozenset({
    "not_in_allowlist", "filtered_metadata", "invalid_url", "duplicate_url", "blocked_address", "opted_out",
    "robots_disallowed",
    "timeout", "rate_limited", "server_error", "connection_error", "http_error", "too_many_redirects", "too_large",
})
NOT_DECODED = frozenset({"decode_error", "image_too_large"})
HAS_FACE = frozenset({"ok", "duplicate_image", "near_duplicate", "benchmark_overlap"})
DUPLICATES = frozenset({"duplicate_image", "near_duplicate"})
HIST_MAX_ROWS = 500_000  # metadata rows read for the histograms (files picked in a seeded order)
METADATA_COLUMNS = ["key", "shard", "caption", "width", "height", "original_width", "original_height",
                    "num_faces", "faces"]
MIN_REJECT_FILES = 16  # reject files read at least (when there are as many), for variety
EXAMPLES_PER_STATUS = 8  # reject thumbnails shown per status
URL_EXAMPLES = 4  # example URLs and reasons shown per status when it has no thumbnails


@dataclass
class ReportData:
    url: str
    stats: dict[str, Any]
    counts: Counter
    examples: dict[str, list[dict[str, Any]]]  # status -> rows with reason, url and maybe thumbnail
    written_total: int = 0
    metadata_rows: int = 0  # how many of them the histograms cover
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # histogram name -> values
    samples: list[dict[str, Any]] = field(default_factory=list)  # metadata rows of the contact sheet


# --- gathering -------------------------------------------------------------------------------

def funnel(counts: Counter) -> list[tuple[str, int, dict[str, int]]]:
    """(stage, rows reaching it, {status: rows lost on the way there}) from input to written.

    Unknown statuses (a newer pipeline's) count as decoded but without a face."""
    known = NOT_DOWNLOADED | NOT_DECODED | HAS_FACE
    lost_at = [set(), NOT_DOWNLOADED, NOT_DECODED, set(counts) - known, DUPLICATES, HAS_FACE - DUPLICATES - {"ok"}]
    names = ("input", "downloaded", "decoded", "has face", "unique", "written")
    steps, left = [], sum(counts.values())
    for name, statuses in zip(names, lost_at):
        lost = {s: counts[s] for s in sorted(statuses, key=status_order) if counts[s]}
        left -= sum(lost.values())
        steps.append((name, left, lost))
    return steps


def status_order(status: str) -> tuple[int, str]:
    """Schema order first, unknown statuses after them by name."""
    order = list(STATUSES)
    return (order.index(status), "") if status in STATUSES else (len(order), status)


def gather_statuses(output: Output, per_status: int) -> tuple[Counter, dict[str, list[dict[str, Any]]]]:
    """Counts per status, and the first few rejected rows of each status (URL and reason)."""
    counts: Counter = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    for name in output.list("status", ".parquet"):
        path = output.path("status", name)
        statuses = output.read_table(path, columns=["status"])["status"]
        here = {row["values"]: row["counts"] for row in pc.value_counts(statuses).to_pylist()}
        counts.update({k: v for k, v in here.items() if k is not None})
        if any(s != "ok" and len(examples.get(s, [])) < per_status for s in here if s is not None):
            for row in output.read_table(path, columns=["status", "reason", "url"]).to_pylist():
                bucket = examples.setdefault(row["status"], [])
                if row["status"] not in ("ok", None) and len(bucket) < per_status:
                    bucket.append({**row, "thumbnail": None})
    return counts, {s: rows for s, rows in examples.items() if rows}


def gather_rejects(output: Output, per_status: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """A seeded pick of OUT/rejects/*.parquet thumbnails per status; {} where there are none.

    Files are read in a seeded order until every status met has plenty to pick from."""
    names = output.list("rejects", ".parquet")
    rng = random.Random(seed)
    rng.shuffle(names)
    rows: dict[str, list[dict[str, Any]]] = {}
    for i, name in enumerate(names):
        if i >= MIN_REJECT_FILES and all(len(r) >= 2 * per_status for r in rows.values()):
            break
        for row in output.read_table(output.path("rejects", name)).to_pylist():
            if row.get("thumbnail"):
                rows.setdefault(row["status"], []).append(row)
    return {s: sorted(rng.sample(r, min(per_status, len(r))), key=lambda r: r["key"]) for s, r in sorted(rows.items())}


def gather_metadata(output: Output, seed: int, max_rows: int) -> tuple[int, pa.Table | None]:
    """(written rows in total, up to about max_rows of metadata from files taken in a seeded order)."""
    names = output.list("metadata", ".parquet")
    random.Random(seed).shuffle(names)
    tables, read, total = [], 0, 0
    for name in names:
        path = output.path("metadata", name)
        if read < max_rows:
            tables.append(output.read_table(path, columns=METADATA_COLUMNS))
            read += tables[-1].num_rows
            total += tables[-1].num_rows
        else:
            with output.fs.open(path, "rb") as f:
                total += pq.read_metadata(f).num_rows
    return total, (pa.concat_tables(tables) if tables else None)


def histogram_columns(meta: pa.Table) -> dict[str, np.ndarray]:
    faces = pc.list_flatten(meta["faces"])
    boxes = np.asarray(pc.list_flatten(pc.struct_field(faces, "box")), dtype=np.float64).reshape(-1, 4)
    return {
        "faces": np.asarray(meta["num_faces"], dtype=np.float64),
        "face_size": np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]),
        "score": np.asarray(pc.struct_field(faces, "score"), dtype=np.float64),
        "caption": np.asarray(pc.fill_null(pc.utf8_length(meta["caption"]), 0), dtype=np.float64),
        "resolution": np.maximum(np.asarray(meta["original_width"], dtype=np.float64),
                                 np.asarray(meta["original_height"], dtype=np.float64)),
    }


def gather(output: Output, seed: int = 0, samples: int = 24) -> ReportData:
    counts, examples = gather_statuses(output, EXAMPLES_PER_STATUS)
    for status, rows in gather_rejects(output, EXAMPLES_PER_STATUS, seed).items():
        examples[status] = rows  # thumbnails win over bare URLs
    total, meta = gather_metadata(output, seed, HIST_MAX_ROWS)
    data = ReportData(output.url, output.read_json("stats.json") or {}, counts, examples, written_total=total)
    if meta is not None and meta.num_rows:
        data.metadata_rows = meta.num_rows
        data.columns = histogram_columns(meta)
        keys = sorted(meta["key"].to_pylist())
        chosen = pa.array(random.Random(seed).sample(keys, min(samples, len(keys))), pa.string())
        data.samples = sorted(meta.filter(pc.is_in(meta["key"], chosen)).to_pylist(), key=lambda r: r["key"])
    return data


def read_images(output: Output, rows: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    """key -> stored JPEG bytes, read from the shards the rows are in."""
    found: dict[str, bytes] = {}
    for shard in sorted({r["shard"] for r in rows}):
        wanted = {f"{r['key']}.jpg" for r in rows if r["shard"] == shard}
        with output.fs.open(output.shard_path(shard), "rb") as f, tarfile.open(fileobj=f) as tar:
            for member in tar:  # tarfile parses every header it passes (~70 us each): stop when done
                if member.name in wanted:
                    found[member.name[:-4]] = tar.extractfile(member).read()
                    wanted.discard(member.name)
                    if not wanted:
                        break
    return found


# --- rendering -------------------------------------------------------------------------------

HISTOGRAMS = (  # name, title, x label, y label, integer bins
    ("faces", "Faces per image", "faces", "images", True),
    ("face_size", "Face size", "shorter box side (original px)", "faces", False),
    ("score", "Detection score", "score", "faces", False),
    ("caption", "Caption length", "characters", "images", False),
    ("resolution", "Image resolution", "original longer side (px)", "images", False),
)

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;background:#f6f7f9;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{margin:0 0 4px;font-size:26px} h2{margin:32px 0 12px;font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{margin:18px 0 8px;font-size:15px} .muted{color:#666} code{font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:16px}
.card{background:#fff;border:1px solid #e2e4e8;border-radius:8px;padding:10px 16px;min-width:120px}
.card b{display:block;font-size:22px}
.two{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(480px,100%),1fr));gap:24px;align-items:start}
table{border-collapse:collapse;background:#fff;width:100%}
td,th{padding:4px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.funnel .row{display:grid;grid-template-columns:96px 1fr;column-gap:8px;align-items:center;margin:2px 0}
.funnel .track{grid-column:2;display:flex;align-items:center;gap:6px;white-space:nowrap}
.funnel .track,.counts{font-variant-numeric:tabular-nums}
.funnel .bar{background:#4c78a8;height:22px;border-radius:3px;flex:none}
.funnel .count{font-weight:600}
.funnel .lost{grid-column:2;font-size:12px;color:#b03030;margin:2px 0 0}
.funnel .row>span{grid-row:span 2;align-self:end;padding-bottom:2px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(520px,100%),1fr));gap:16px}
.charts img{width:100%;background:#fff;border:1px solid #e2e4e8;border-radius:6px}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #e2e4e8;border-radius:6px;padding:6px;overflow:hidden}
figure .img{height:200px;display:flex;align-items:center;justify-content:center;background:#eef0f3}
figure img{display:block;max-width:100%;max-height:100%}
.rejects figure .img{height:150px}
figcaption{font-size:12px;margin-top:4px;overflow-wrap:anywhere}
.rejects{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
table.examples{table-layout:fixed;font-size:13px} table.examples td{overflow-wrap:anywhere}
table.examples td:first-child,table.examples th:first-child{width:55%}
nav{margin-top:16px;display:flex;flex-wrap:wrap;gap:4px 18px} nav a{color:#2a5db0;text-decoration:none}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;border:1px solid #000;margin:0 4px 0 10px}
"""


def esc(value: Any, limit: int | None = None) -> str:
    text = "" if value is None else str(value)
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text)


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def render_funnel(counts: Counter) -> str:
    steps = funnel(counts)
    total = max(steps[0][1], 1)
    out = []
    for name, n, lost in steps:
        why = ", ".join(f"{s} {c:,}" for s, c in lost.items())
        lost_html = f'<div class="lost">−{sum(lost.values()):,}: {esc(why)}</div>' if lost else ""
        out.append(f'<div class="row" data-stage="{esc(name)}"><span>{esc(name)}</span>{lost_html}'
                   f'<div class="track"><div class="bar" style="width:{max(75 * n / total, 0.3):.1f}%"></div>'
                   f'<span class="count">{n:,}</span> <span class="muted">{100 * n / total:.1f}%</span></div></div>')
    return f'<div class="funnel">{"".join(out)}</div>'


def render_counts(counts: Counter) -> str:
    total = max(sum(counts.values()), 1)
    order = sorted((s for s in counts if counts[s]), key=status_order)
    rows = "".join(
        f'<tr data-status="{esc(s)}"><td><code>{esc(s)}</code></td><td class="n">{counts[s]:,}</td>'
        f'<td class="n">{100 * counts[s] / total:.1f}%</td>'
        f'<td>{esc(STATUSES.get(s, "(a status this version of the report does not know)"))}</td></tr>'
        for s in order)
    return (f'<table class="counts"><tr><th>status</th><th>rows</th><th>share</th><th>meaning</th></tr>{rows}'
            f'<tr><th>total</th><td class="n">{sum(counts.values()):,}</td><td class="n">100%</td><td></td></tr>'
            '</table>')


def render_rejects(examples: dict[str, list[dict[str, Any]]], images: dict[tuple[str, int], str],
                   counts: Counter) -> str:
    """Statuses with thumbnails first, as image grids; then the others as tables of example URLs."""
    grids, tables = [], []
    for status in sorted(examples, key=status_order):
        rows = examples[status]
        title = (f'<h3 id="reject-{esc(status)}"><code>{esc(status)}</code> · {plural(counts[status], "row")} '
                 f'<span class="muted">— {esc(STATUSES.get(status, "unknown status"))}</span></h3>')
        if any((status, i) in images for i in range(len(rows))):
            figures = "".join(
                f'<figure><div class="img"><img src="{images[(status, i)]}" alt="{esc(status)}"></div>'
                f'<figcaption title="{esc(r["url"])}">{esc(r["reason"], 110)}</figcaption></figure>'
                for i, r in enumerate(rows) if (status, i) in images)
            grids.append(f'{title}<div class="rejects">{figures}</div>')
        else:
            trs = "".join(f'<tr><td><code>{esc(r["url"], 90)}</code></td><td>{esc(r["reason"], 160)}</td></tr>'
                          for r in rows[:URL_EXAMPLES])
            tables.append(f'<div>{title}<table class="examples"><tr><th>url</th><th>reason</th></tr>{trs}</table>'
                          '</div>')
    if not grids and not tables:
        return '<p class="muted">No row was rejected.</p>'
    return "".join(grids) + (f'<div class="two">{"".join(tables)}</div>' if tables else "")


def render_html(data: ReportData, charts: list[tuple[str, str]], sheet: list[tuple[str, dict[str, Any]]],
                reject_images: dict[tuple[str, int], str]) -> str:
    total, written = sum(data.counts.values()), data.counts["ok"]
    run = data.stats.get("last_run", {})
    cards = [("input rows", f"{total:,}"), ("written", f"{written:,}"),
             ("yield", f"{100 * written / total:.1f}%" if total else "–"),
             ("shards", f"{data.stats.get('shards', '–')}"), ("last run", f"{run.get('seconds', '–')} s")]
    card_html = "".join(f'<div class="card"><span class="muted">{k}</span><b>{esc(v)}</b></div>' for k, v in cards)
    covered = ("" if data.metadata_rows >= data.written_total else
               f'<p class="muted">Over {data.metadata_rows:,} of the {data.written_total:,} written samples.</p>')
    chart_html = "".join(f'<img src="{name}" alt="{esc(title)}">' for name, title in charts)
    figures = "".join(
        f'<figure><div class="img"><img src="{name}" alt="{esc(row["key"])}"></div>'
        f'<figcaption><code>{esc(row["key"])}</code> · {plural(row["num_faces"], "face")}<br>'
        f'<span title="{esc(row["caption"])}">{esc(row["caption"], 120)}</span></figcaption></figure>'
        for name, row in sheet)
    legend = "".join(f'<span class="dot" style="background:{c}"></span>{n}'
                     for c, n in zip(LANDMARK_COLORS, LANDMARK_NAMES))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>LAION-FACE build report</title><style>{STYLE}</style></head>
<body><main>
<h1>LAION-FACE build report</h1>
<div class="muted"><code>{esc(data.url)}</code> · built {esc(run.get("finished_at", "(unknown)"))}</div>
<div class="cards">{card_html}</div>
<nav><a href="#rows">Where the rows went</a><a href="#written">What was written</a><a href="#samples">Samples</a>
<a href="#rejected">Rejected</a></nav>
<h2 id="rows">Where the rows went</h2>
<div class="two"><div>{render_funnel(data.counts)}</div><div>{render_counts(data.counts)}</div></div>
<h2 id="written">What was written</h2>{covered}<div class="charts">{chart_html}</div>
<h2 id="samples">Samples</h2>
<p class="muted">{len(sheet)} written samples picked at random (seeded). Boxes in green; landmarks: {legend}</p>
<div class="sheet">{figures}</div>
<h2 id="rejected">Rejected</h2>{render_rejects(data.examples, reject_images, data.counts)}
</main></body></html>
"""


# --- writing ---------------------------------------------------------------------------------

def write_report(output_url: str, seed: int = 0, samples: int = 24) -> str:
    """Write OUT/report/index.html and its images; returns the index.html path (or URL)."""
    output = Output(output_url)
    if not output.fs.exists(output.path("status")):
        raise FileNotFoundError(f"no build at {output_url}: it has no status/ folder")
    data = gather(output, seed, samples)
    files: dict[str, bytes] = {}
    charts = []
    for name, title, xlabel, ylabel, integer in HISTOGRAMS:
        values = data.columns.get(name, np.array([]))
        files[f"hist_{name}.png"] = draw_histogram(values, title, xlabel, ylabel, integer=integer)
        charts.append((f"hist_{name}.png", title))
    images = read_images(output, data.samples)
    sheet = []
    for i, row in enumerate(data.samples):
        if row["key"] in images:
            files[f"sample_{i:03d}.jpg"] = draw_sample(images[row["key"]], row)
            sheet.append((f"sample_{i:03d}.jpg", row))
    reject_images: dict[tuple[str, int], str] = {}
    for status, rows in sorted(data.examples.items()):
        for i, row in enumerate(rows):
            if jpeg := as_jpeg(row.get("thumbnail")):
                name = f"reject_{len(reject_images):03d}.jpg"
                files[name] = jpeg
                reject_images[(status, i)] = name
    files["index.html"] = render_html(data, charts, sheet, reject_images).encode()
    output.makedirs(output.path("report"))
    for name, content in files.items():  # index.html last: it appears once its images are there
        output.write_atomic(output.path("report", name), lambda f, c=content: f.write(c))
    for name in set(output.list("report", "")) - set(files):  # images of an earlier, larger report
        if name.endswith((".png", ".jpg")):
            output.fs.rm(output.path("report", name))
    index = output.path("report", "index.html")
    return index if isinstance(output.fs, LocalFileSystem) else f"{output.url.rstrip('/')}/report/index.html"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="the build's output: local path or fsspec URL")
    parser.add_argument("--seed", type=int, default=0, help="picks the contact sheet and reject examples")
    parser.add_argument("--samples", type=int, default=24, help="images on the contact sheet")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.output, seed=args.seed, samples=args.samples))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, pa.ArrowException) as e:  # a corrupt or unreadable file in OUT
        print(f"error: {args.output}: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
