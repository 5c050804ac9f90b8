"""`python -m bench.plan_scale`: the driver at LAION size, measured with `--plan-only`.

Generates LAION-400M-schema metadata (one part file per 1M rows, as LAION ships them; a URL
repeated now and then, as in LAION, so the URL dedupe has work), then runs the builder's own CLI
with `--plan-only` on 1M and 10M rows: input checks, registration of the inputs, unit planning and
the URL dedupe, everything but the downloads. Each size runs in a fresh process, which reports its
own peak RSS (the driver's) and, sampled from /proc every 0.2 s, the largest Ray worker's (VmRSS,
which counts the object-store pages it maps, and its private RssAnon).

    python -m bench.plan_scale --sizes 1000000,10000000 --data /tmp/laion-meta --out out/bench/plan_scale.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.machine_load import MemorySampler

ROWS_PER_FILE = 1_000_000
HOSTS = 5_000  # LAION's URLs come from a long tail of hosts
REPEATED_URL_SHARE = 0.03  # rows whose URL an earlier row already had


def part_file(rng: np.random.Generator, first_row: int, rows: int) -> pa.Table:
    """LAION-400M's columns and types, with web-like lengths: ~90-character URLs, 10-40-word captions."""
    ids = np.arange(first_row, first_row + rows, dtype=np.int64)
    source = np.where(rng.random(rows) < REPEATED_URL_SHARE, rng.integers(0, first_row + rows, rows), ids)
    source = np.minimum(source, ids)  # a repeat points back, so the first of a URL's rows is its own
    host = source % HOSTS
    urls = [f"https://img{h}.example-cdn.com/uploads/2019/{s % 12 + 1:02d}/{s:016x}-photo-large.jpg"
            for h, s in zip(host.tolist(), (source * 2654435761 % (1 << 60)).tolist())]
    words = np.array(["portrait", "woman", "man", "smiling", "face", "close", "up", "of", "a", "with", "the",
                      "stock", "photo", "young", "old", "happy", "studio", "light", "beard", "hair", "glasses"])
    lengths = rng.integers(10, 41, rows)
    picks = rng.integers(0, len(words), int(lengths.sum()))
    bounds = np.r_[0, np.cumsum(lengths)]
    captions = [" ".join(words[picks[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]
    size = rng.integers(64, 2048, (2, rows))
    return pa.table({
        "SAMPLE_ID": pa.array(ids), "URL": urls, "TEXT": captions,
        "HEIGHT": pa.array(size[0], pa.int32()), "WIDTH": pa.array(size[1], pa.int32()),
        "LICENSE": pa.array(np.where(rng.random(rows) < 0.9, "?", "creativecommons.org/licenses/by/4.0/")),
        "NSFW": pa.array(np.array(["UNLIKELY", "UNSURE", "NSFW"])[rng.choice(3, rows, p=[0.9, 0.07, 0.03])]),
        "similarity": pa.array(rng.uniform(0.3, 0.45, rows)),
    })


def generate(folder: Path, rows: int) -> list[Path]:
    """The part files of `rows` rows, written once and reused (a file is complete when it exists)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, first in enumerate(range(0, rows, ROWS_PER_FILE)):
        path = folder / f"part-{index:05d}.parquet"
        if not path.exists():
            table = part_file(np.random.default_rng(index), first, min(ROWS_PER_FILE, rows - first))
            tmp = path.with_suffix(".tmp")
            # one row group per file, as Spark's 128 MB blocks give for LAION's 1M-row parts
            pq.write_table(table, tmp, row_group_size=ROWS_PER_FILE, compression="snappy")
            tmp.rename(path)
        paths.append(path)
    return paths


def run_once(inputs: list[str], output: str) -> dict:
    """One --plan-only run in this process (started fresh by `measure`)."""
    from pipeline.build import build
    from pipeline.build_config import BuildConfig

    workers = MemorySampler()
    workers.start()
    started = time.time()
    plan = build(BuildConfig(input=inputs, output=output, plan_only=True, progress=False))
    seconds = time.time() - started
    return {**plan, "wall_s": round(seconds, 1), **workers.finish().ray_worker_peaks(),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def measure(rows: int, data: Path) -> dict:
    paths = generate(data, rows)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "bench.plan_scale", "--once", "--output", out, *map(str, paths)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"plan of {rows} rows failed:\n{result.stderr[-3000:]}")
    return {"rows": rows, **json.loads(result.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="comma-separated row counts")
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "laion-meta"),
                        help="folder for the generated part files (kept for reruns)")
    parser.add_argument("--out", help="also write the results to this JSON file")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once:
        print(json.dumps(run_once(args.inputs, args.output)))
        return
    results = [measure(int(size), Path(args.data)) for size in args.sizes.split(",")]
    for r in results:
        print(json.dumps(r))
    if len(results) > 1:
        small, large = results[0], results[-1]
        print(f"{large['rows'] // small['rows']}x the rows: {large['wall_s'] / small['wall_s']:.2f}x the time, "
              f"{large['driver_peak_rss_mb'] / small['driver_peak_rss_mb']:.2f}x the driver's peak RSS")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
