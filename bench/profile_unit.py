"""`python -m bench.profile_unit [--rows N] [--top K]`: where one work unit's time goes, without Ray.

Serves N generated rows (bench.build_speed's input) from a loopback ImageServer and runs the
builder's per-unit functions in this one process, each timed on its own, then the whole unit
under cProfile:

  read_unit -> fetch_samples -> decode_sample -> pack (pickle)       (source_fetch_decode)
  iter_units (unpickle) -> commit_unit (tar + metadata + status)      (filter_and_commit)

and, for comparison, what img2dataset does per image after the download: cv2.imdecode +
cv2.imencode (q95) + exifread + sha256. Prints the timings and the top functions by
cumulative time; writes them as JSON next to build_speed's results.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench.speed_input import make_rows, start_server, write_input  # noqa: E402
from pipeline.build_config import BuildConfig  # noqa: E402
from pipeline.decode import decode_sample  # noqa: E402
from pipeline.fetch import fetch_samples  # noqa: E402
from pipeline.schema import iter_units, pack  # noqa: E402
from pipeline.source import Unit, read_unit  # noqa: E402
from pipeline.storage import Output  # noqa: E402
from pipeline.write import commit_unit  # noqa: E402


def img2dataset_per_image(contents: list[bytes]) -> dict:
    """img2dataset's post-download work with resize_mode='no' (Resizer + exif + hash), timed."""
    import logging

    import cv2
    import exifread
    import numpy as np

    logging.getLogger("exifread").setLevel(logging.CRITICAL)  # as img2dataset does

    t = {"imdecode_s": 0.0, "imencode_s": 0.0, "exif_s": 0.0, "sha256_s": 0.0}
    for data in contents:
        t0 = time.perf_counter()
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        t1 = time.perf_counter()
        cv2.imencode(".jpg", img, params=[cv2.IMWRITE_JPEG_QUALITY, 95])
        t2 = time.perf_counter()
        exifread.process_file(io.BytesIO(data), details=False)
        t3 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t4 = time.perf_counter()
        t["imdecode_s"] += t1 - t0
        t["imencode_s"] += t2 - t1
        t["exif_s"] += t3 - t2
        t["sha256_s"] += t4 - t3
    return t


def run_unit(unit: Unit, config: BuildConfig, output: Output) -> dict:
    t = {}
    t0 = time.perf_counter()
    samples = read_unit(unit, config, None, {})
    t["read_unit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    list(fetch_samples(samples, config))  # timed apart from the decode here; a build decodes as they come
    t["fetch_s"] = time.perf_counter() - t0
    downloaded = [s.content for s in samples if s.content is not None]
    t0 = time.perf_counter()
    for sample in samples:
        decode_sample(sample, config)
    t["decode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = pack(unit.unit, f"{unit.unit:05d}", samples)
    t["pickle_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    [(u, shard, unpacked)] = list(iter_units({k: [v] for k, v in packed.items()}))
    t["unpickle_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    counts = commit_unit(output, u, shard, unpacked)
    t["commit_s"] = time.perf_counter() - t0
    t["counts"] = counts
    t["downloaded"] = downloaded
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=250, help="rows of the one unit (default 250, bench's shard size)")
    p.add_argument("--top", type=int, default=25, help="functions to list (default 25)")
    p.add_argument("--out", default="out/bench", help="results directory (default out/bench)")
    args = p.parse_args(argv)
    out = Path(args.out)
    work = out / "work" / "profile_unit"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = make_rows(args.rows)
    server, watchdog = start_server(rows, 600)
    try:
        parquet = work / "input.parquet"
        write_input(parquet, rows, server)
        config = BuildConfig(input=[str(parquet)], output=str(work / "build"), detector="none", image_max_side=0,
                             shard_size=args.rows, allow_host=[f"127.0.0.1:{server.port}"], progress=False)
        unit = Unit(0, 0, str(parquet), 0, args.rows)
        output = Output(config.output)
        output.make_dirs()
        run_unit(unit, config, output)  # warm-up: imports, first connections
        for sub in ("shards", "metadata", "status"):
            shutil.rmtree(work / "build" / sub)
        output.make_dirs()
        timings = run_unit(unit, config, output)
        downloaded = timings.pop("downloaded")
        for sub in ("shards", "metadata", "status"):
            shutil.rmtree(work / "build" / sub)
        output.make_dirs()
        profiler = cProfile.Profile()
        profiler.enable()
        run_unit(unit, config, output)
        profiler.disable()
    finally:
        watchdog.cancel()
        server.stop()
    i2d = img2dataset_per_image(downloaded)
    n = args.rows
    print(f"one unit of {n} rows, in-process (no Ray), detector none, image_max_side 0:")
    for name, value in timings.items():
        if name.endswith("_s"):
            print(f"  {name:14s} {value:7.3f} s  {1000 * value / n:6.2f} ms/row  ({n / value:7.0f} rows/s)")
    print(f"  counts {timings['counts']}")
    print("img2dataset's post-download work per image (resize_mode='no'):")
    for name, value in i2d.items():
        print(f"  {name:14s} {value:7.3f} s  {1000 * value / n:6.2f} ms/row")
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(args.top)
    print(stream.getvalue())
    stream2 = io.StringIO()
    pstats.Stats(profiler, stream=stream2).sort_stats("tottime").print_stats(args.top)
    print(stream2.getvalue())
    (out / "profile_unit.json").write_text(json.dumps({"rows": n, "unit_timings": timings,
                                                        "img2dataset_post_download": i2d,
                                                        "cprofile_cumulative": stream.getvalue(),
                                                        "cprofile_tottime": stream2.getvalue()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
