"""The end of a build: OUT/sizes.json (open_clip's format), OUT/stats.json and a short summary."""

from __future__ import annotations

import time
from collections import Counter

import pyarrow.parquet as pq

from pipeline.build_config import LAION_COLUMNS
from pipeline.schema import STATUSES
from pipeline.storage import Output


def shard_sizes(output: Output) -> dict[str, int]:
    """{'00000.tar': samples, ...}: what open_clip's webdataset loader reads to size an epoch."""
    sizes = {}
    for name in output.list("metadata", ".parquet"):
        with output.fs.open(output.path("metadata", name), "rb") as f:
            rows = pq.read_metadata(f).num_rows
        if rows:
            sizes[name[: -len(".parquet")] + ".tar"] = rows
    return sizes


def status_counts(output: Output) -> Counter:
    counts: Counter = Counter()
    for name in output.list("status", ".parquet"):
        counts.update(output.read_table(output.path("status", name), columns=["status"])["status"].to_pylist())
    return counts


def finish(output: Output, started: float, timings: dict[str, float], rows_done: int, units_done: int,
           url_duplicates: int, images_removed: int, near_removed: int, columns: dict[str, str],
           taken_down_removed: int) -> dict:
    """Write sizes.json and stats.json (totals over every run into OUT, plus this run's speed and the
    input columns it read: our field -> theirs)."""
    sizes = shard_sizes(output)
    counts = status_counts(output)
    seconds = time.time() - started
    stats = {
        "input_rows": sum(counts.values()),
        "written": sum(sizes.values()),
        "shards": len(sizes),
        "counts": {status: counts[status] for status in STATUSES if counts[status]},
        "last_run": {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(seconds, 2),
            "stage_seconds": {k: round(v, 2) for k, v in timings.items()},
            "units_processed": units_done,
            "rows_processed": rows_done,
            "rows_per_second": round(rows_done / seconds, 2) if seconds else 0.0,
            "url_duplicates_planned": url_duplicates,
            "image_duplicates_removed": images_removed,
            "near_duplicates_and_overlaps_removed": near_removed,
            "taken_down_removed": taken_down_removed,
            "columns": columns,
        },
    }
    output.write_json("sizes.json", sizes)
    output.write_json("shards/sizes.json", sizes)  # where open_clip's loader looks: beside the shards
    output.write_json("stats.json", stats)
    return stats


def describe_columns(columns: dict[str, str]) -> str:
    """'url <- URL, caption <- TEXT, ...; absent: license': which input column fed which field."""
    absent = [field for field in LAION_COLUMNS if field not in columns]
    return ", ".join(f"{ours} <- {theirs}" for ours, theirs in columns.items()) + (
        f"; absent (null): {', '.join(absent)}" if absent else "")


def describe(output: Output, stats: dict, report: str) -> str:
    """The few lines printed at the end of a build: what was made and where it is."""
    out = output.url.rstrip("/")
    counts = ", ".join(f"{status} {n}" for status, n in stats["counts"].items())
    run = stats["last_run"]
    return "\n".join([
        f"LAION-FACE build done in {run['seconds']:.1f} s ({run['rows_processed']} rows this run, "
        f"{run['rows_per_second']:.1f} rows/s): {stats['input_rows']} input rows -> "
        f"{stats['written']} samples in {stats['shards']} shards",
        f"  shards    {out}/shards/*.tar  (webdataset: KEY.jpg, KEY.txt, KEY.json; sizes in {out}/sizes.json)",
        f"  metadata  {out}/metadata/*.parquet  (one row per sample, faces included)",
        f"  status    {out}/status/*.parquet  (every input row, its status and reason)",
        f"  stats     {out}/stats.json",
        f"  report    {report}",
        f"  statuses  {counts}",
        f"  columns   {describe_columns(run['columns'])}",
        f"  explore   python -m queries overview --data {out}",
    ])
