"""`python -m bench.scale_rows`: the real build at 1k, 4k and 16k rows, against img2dataset.

Per size, the builder (`--detector none --image-max-side 0`, 1,000 rows per unit) and
img2dataset (no resize, 1,000 rows per shard), equal work: download, decode, write webdataset
shards. The input is bench.speed_input's (48 real photos, each row distinct bytes) on a loopback
server in this process. Runs are interleaved, smallest size first, after one unmeasured run of
each tool (the first run after boot reads its libraries from disk). Reported per run:
- time per row after start-up (the builder's stage seconds; img2dataset's first-to-last shard);
- CPU-seconds per image: the machine's CPU time during the run, less other processes' and this
  process's (the image server), over the images decoded; what decides a cluster's bill;
- peak RSS of the largest worker process (Ray workers; img2dataset's processes), and its private
  memory (RssAnon: VmRSS also counts the object-store pages a Ray worker maps), and the peak RSS
  of the command's own process (the driver).

    .venv/bin/python -m bench.scale_rows --sizes 1000,4000,16000 --out out/bench/scale_rows.json
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

from bench.build_speed import run_builder, run_img2dataset
from bench.machine_load import MemorySampler, Phase
from bench.speed_input import make_rows, start_server, write_input

ROWS_PER_UNIT = 1000


def measured(fn) -> dict:
    """fn() with the machine's CPU use and the processes' peak RSS recorded."""
    memory = MemorySampler(interval=0.3)
    memory.start()
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    with Phase(max_wait=60) as phase:
        result = fn()
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    server_cpu = (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime)
    tool_cpu = phase.info["machine_cpu_s"] - phase.info["foreign_cpu_s"] - server_cpu
    return {**result, "machine": phase.info, "server_cpu_s": round(server_cpu, 1), "tool_cpu_s": round(tool_cpu, 1),
            **memory_peaks(memory.finish())}


def memory_peaks(memory: MemorySampler) -> dict:
    """The command's process (the driver) and the largest process below it (Ray workers,
    img2dataset's processes): VmRSS, and for the workers also their private RssAnon."""
    workers = memory.peaks.keys() - memory.direct
    return {"command_peak_rss_mb": memory.largest_mb(memory.direct, "VmRSS"),
            "largest_worker_peak_rss_mb": memory.largest_mb(workers, "VmRSS"),
            "largest_worker_peak_anon_mb": memory.largest_mb(workers, "RssAnon")}


def builder_run(work: Path, parquet: Path, port: int, name: str) -> dict:
    r = run_builder(work, parquet, port, "none", ROWS_PER_UNIT, timed=False, name=name)
    return {"images": r["images"], "wall_s": r["wall_s"], "after_startup_s": r["after_startup_s"],
            "startup_s": r["startup_s"]}


def img2dataset_run(work: Path, parquet: Path, name: str) -> dict:
    r = run_img2dataset(work, parquet, ROWS_PER_UNIT, processes=2, threads=32, name=name)
    return {"images": r["successes"], "wall_s": r["wall_s"], "after_startup_s": r["shards_span_s"],
            "startup_s": r["startup_s"]}


def summarise(run: dict, rows: int) -> dict:
    return {**run, "ms_per_row_after_startup": round(1000 * run["after_startup_s"] / rows, 3),
            "cpu_ms_per_image": round(1000 * run["tool_cpu_s"] / max(1, run["images"]), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,4000,16000")
    parser.add_argument("--out", default="out/bench/scale_rows.json")
    args = parser.parse_args()
    work = Path(args.out).parent / "scale_work"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    sizes = [int(size) for size in args.sizes.split(",")]
    for size in sizes:
        rows = make_rows(size)
        server, _ = start_server(rows, seconds=3600)
        try:
            parquet = work / f"input-{size}.parquet"
            write_input(parquet, rows, server)
            runs = {"img2dataset": lambda name: img2dataset_run(work, parquet, name),
                    "builder": lambda name: builder_run(work, parquet, server.port, name)}
            if size == sizes[0]:  # unmeasured: the first run after boot reads its libraries from disk
                for tool, run in runs.items():
                    run(f"warm-up-{tool}")
            for tool, run in runs.items():
                result = {"tool": tool, "rows": size, **summarise(measured(lambda: run(f"{tool}-{size}")), size)}
                print(json.dumps(result), flush=True)
                results.append(result)
        finally:
            server.stop()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for tool in ("builder", "img2dataset"):
        mine = [r for r in results if r["tool"] == tool]
        if len(mine) > 1:
            print(f"{tool}: ms per row after start-up {mine[-1]['ms_per_row_after_startup']} at {mine[-1]['rows']} rows "
                  f"vs {mine[0]['ms_per_row_after_startup']} at {mine[0]['rows']} "
                  f"({mine[-1]['ms_per_row_after_startup'] / mine[0]['ms_per_row_after_startup']:.2f} x)")


if __name__ == "__main__":
    main()
