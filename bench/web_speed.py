"""`python -m bench.web_speed`: the builder (`--detector none`) against img2dataset on a web-like input.

The input is bench.web_input's (distinct photos at web sizes, 8 % near-copies, 4 % exact copies,
2 % repeated URLs, 6 % failures) on a loopback server in this process. Three comparisons, each
tool run `--repeat` times, interleaved:
- `no_resize`: equal work, images stored as fetched. Builder `--image-max-side 0 --retries 0`;
  img2dataset `resize_mode="no"`. Both 2 processes' worth of work: img2dataset 2 processes x 32
  threads (ours: 32 threads a task), shards of the builder's unit size.
- `resize_512`: equal work, the longer side brought down to 512 px, never up. Builder's default
  `--image-max-side 512`, `--retries 0`; img2dataset `resize_mode="keep_ratio_largest"`,
  `image_size=512`, `resize_only_if_bigger=True` (its `keep_ratio` resizes the *shorter* side).
- `defaults`: each tool as a new user runs it. Builder: `--detector none` and nothing else (2 retries,
  512 px, exact and near dedupe, the report); img2dataset: `download()`'s defaults (1 process x 256
  threads, 256 px with a border, shards of 10,000) but for what reading our parquet and writing
  webdataset needs.
The builder always dedupes (exact and near) and writes its report: work img2dataset does not do.
Per run: wall time (process start to exit), images decoded per second of it, and CPU-seconds per
image (the machine's CPU time less others' and the image server's: what a cluster bill follows).

    .venv/bin/python -m bench.web_speed --rows 6000 --repeat 3 --out out/bench/web_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.build_speed import run_builder, run_img2dataset
from bench.scale_rows import measured
from bench.web_input import make_web_rows, serve, write_web_input
from demo.server import ImageServer
from pipeline.source import auto_shard_size

CPUS = 2


def comparisons(rows: int) -> dict[str, tuple[list[str], dict]]:
    """name -> (builder flags, img2dataset settings)."""
    equal = {"processes_count": CPUS, "thread_count": 32, "number_sample_per_shard": auto_shard_size(rows, CPUS)}
    return {
        "no_resize": (["--detector", "none", "--image-max-side", "0", "--retries", "0", "--no-progress"],
                      {**equal, "resize_mode": "no"}),
        "resize_512": (["--detector", "none", "--retries", "0", "--no-progress"],
                       {**equal, "resize_mode": "keep_ratio_largest", "image_size": 512,
                        "resize_only_if_bigger": True}),
        "defaults": (["--detector", "none", "--no-progress"], {}),
    }


def run_once(tool: str, work: Path, parquet: Path, server: ImageServer, name: str,
             flags: list[str], settings: dict) -> dict:
    if tool == "builder":
        def fn() -> dict:
            r = run_builder(work, parquet, server.port, "none", 0, timed=False, name=name, args=flags)
            return {"images": r["images"], "wall_s": r["wall_s"], "counts": r["counts"],
                    "stage_seconds": r["stage_seconds"], "startup_s": r["startup_s"]}  # where ours goes
    else:
        def fn() -> dict:
            r = run_img2dataset(work, parquet, 0, 0, 0, name=name, settings=settings)
            return {"images": r["successes"], "wall_s": r["wall_s"], "counts": r["statuses"]}
    run = measured(fn)
    run["images_per_s"] = run["images"] / run["wall_s"]
    run["cpu_ms_per_image"] = 1000 * run["tool_cpu_s"] / max(1, run["images"])
    return run


def summary(results: list[dict]) -> dict:
    """Per comparison: each tool's median images/s and CPU-ms per image, and the ratios of the medians."""
    out = {}
    for name in dict.fromkeys(r["comparison"] for r in results):
        medians = {}
        for tool in ("builder", "img2dataset"):
            runs = [r for r in results if r["comparison"] == name and r["tool"] == tool]
            medians[tool] = {"images_per_s": statistics.median(r["images_per_s"] for r in runs),
                             "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in runs),
                             "runs_images_per_s": [round(r["images_per_s"], 1) for r in runs]}
        out[name] = {**medians, "speed_ratio": medians["builder"]["images_per_s"] / medians["img2dataset"]["images_per_s"],
                     "cpu_ratio": medians["builder"]["cpu_ms_per_image"] / medians["img2dataset"]["cpu_ms_per_image"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated comparisons (default: all)")
    parser.add_argument("--out", default="out/bench/web_speed.json")
    args = parser.parse_args()
    work = Path(args.out).parent / "web_work"
    work.mkdir(parents=True, exist_ok=True)
    rows = make_web_rows(args.rows)
    server = ImageServer()
    serve(rows, server)
    parquet = work / "input.parquet"
    write_web_input(str(parquet), rows, server)
    chosen = {name: c for name, c in comparisons(args.rows).items() if not args.only or name in args.only.split(",")}
    results = []
    try:
        for repeat in range(args.repeat):
            for name, (flags, settings) in chosen.items():
                order = ("img2dataset", "builder") if repeat % 2 == 0 else ("builder", "img2dataset")
                for tool in order:
                    run = run_once(tool, work, parquet, server, f"{tool}-{name}", flags, settings)
                    results.append({"comparison": name, "tool": tool, "repeat": repeat, **run})
                    print(json.dumps({k: results[-1][k] for k in ("comparison", "tool", "repeat", "images", "wall_s",
                                                                   "images_per_s", "cpu_ms_per_image")}), flush=True)
    finally:
        server.stop()
    kinds = {kind: sum(r.kind == kind for r in rows) for kind in dict.fromkeys(r.kind for r in rows)}
    report = {"rows": args.rows, "input_kinds": kinds, "summary": summary(results), "runs": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, s in report["summary"].items():
        print(f"{name}: builder {s['builder']['images_per_s']:.1f} images/s, img2dataset "
              f"{s['img2dataset']['images_per_s']:.1f} ({s['speed_ratio']:.2f} x); CPU-ms per image "
              f"{s['builder']['cpu_ms_per_image']:.1f} vs {s['img2dataset']['cpu_ms_per_image']:.1f}")


if __name__ == "__main__":
    main()
