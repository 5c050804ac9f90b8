"""`python -m bench.whatif [--rows N] [--detector D] [--context JSON] [-- BUILDER ARGS...]`: one timed build.

Builds bench.build_speed's generated input (same rows, same loopback server, same flags as its
(b) and (c) runs) through bench.timed_build, with extra builder flags after `--` (e.g.
`-- --detect-actors 2`) and/or Ray Data context fields (`--context '{"op_resource_reservation_enabled":
false}'`), and prints the wall time, the stage seconds and each unit's timeline: what a change
of settings would buy, measured without editing the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench import build_speed  # noqa: E402
from bench.machine_load import Phase  # noqa: E402
from bench.speed_input import make_rows, start_server, write_input  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=build_speed.DEFAULT_ROWS)
    p.add_argument("--shard-size", type=int, default=0, help="default: rows / 8, as build_speed")
    p.add_argument("--detector", default="none")
    p.add_argument("--context", default="", help="JSON of ray.data.DataContext fields to set (BENCH_DATA_CONTEXT)")
    p.add_argument("--idle-wait", type=float, default=120)
    p.add_argument("--out", default="out/bench/whatif")
    args = p.parse_args(argv)
    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shard_size = args.shard_size or max(1, -(-args.rows // 8))
    rows = make_rows(args.rows)
    server, watchdog = start_server(rows, 1800)
    if args.context:
        os.environ["BENCH_DATA_CONTEXT"] = args.context  # read by bench.timed_build in the subprocess
    original_args = build_speed.builder_args
    build_speed.builder_args = lambda *a: original_args(*a) + extra
    try:
        write_input(work / "input.parquet", rows, server)
        with Phase(args.idle_wait) as phase:
            result = build_speed.run_builder(work, work / "input.parquet", server.port, args.detector, shard_size,
                                             True, "build")
    finally:
        build_speed.builder_args = original_args
        watchdog.cancel()
        server.stop()
    result["machine_during_run"] = phase.info
    result["extra_args"], result["context"] = extra, args.context
    (work / "whatif.json").write_text(json.dumps(result, indent=2))
    print(f"{result['command']}  context={args.context or '{}'}")
    print(f"wall {result['wall_s']:.1f} s, {result['images_per_s']['wall']:.1f} images/s; stages {result['stage_seconds']}; "
          f"others used {100 * phase.info['foreign_fraction_of_machine']:.0f} % of the machine")
    records = [json.loads(line) for line in Path(str(work / "build") + ".stage-timing.jsonl").read_text().splitlines()]
    calls = sorted((r for r in records if r["event"] == "call"), key=lambda r: r["start"])
    t0 = calls[0]["start"] if calls else 0
    for r in calls:
        print(f"  {r['stage']:20s} pid {r['pid']:>7d}  {r['start'] - t0:7.2f} -> {r['end'] - t0:7.2f} s  "
              f"({r['end'] - r['start']:.2f} s, CPU {r['cpu_s']:.2f} s)")
    for stage, info in result["stage_timing"].items():
        print(f"  {stage}: busy {info['busy_s']:.1f} s over {info['span_s']:.1f} s "
              f"(average concurrency {info['busy_s'] / info['span_s']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
