"""Build speed: img2dataset alone vs our builder (with and without the detector) vs the raw detector.

    python -m bench.build_speed [--rows N] [--out DIR] [--shard-size S]     # also: make bench

One generated input, one loopback server, every contender on the same rows:

  input   N rows of LAION-format parquet (SAMPLE_ID, URL, TEXT, WIDTH, HEIGHT, LICENSE, NSFW,
          similarity). Row i is demo photo i % 48 (demo.data.make_demo_images: real
          face and non-face photos, 40 px to 3000 px, JPEG/PNG/grey/RGBA/EXIF-rotated) with one
          pixel flipped at a position given by i // 48 and re-encoded in its own format (JPEG
          with its own quantisation tables and EXIF), so every row has distinct bytes *and*
          distinct pixels: neither our URL dedupe nor our exact image dedupe removes anything.
          The near-duplicate stage (pHash) does remove the near-copies after they are written,
          so a build's work is counted as the rows it downloaded and decoded (and detected),
          not as what is left in the shards at the end (reported as "written").
  server  one demo.server.ImageServer on 127.0.0.1, in this process, serving row i at
          /b/<i>/<name>; a watchdog stops it after --server-seconds whatever happens.

  fetch   (ceiling) one client process, 64 urllib3 threads, bodies read and dropped.
  (a)     img2dataset.download(parquet, webdataset, resize_mode="no", processes_count=2,
          thread_count=32, number_sample_per_shard=S) in a subprocess; images/s = successes / time.
  (b)     python -m pipeline.build_laion_face --detector none ... --image-max-side 0 --shard-size S
          --no-progress, a subprocess starting its own Ray; images/s = images written to the
          shards by the main stage (before the dedupe stages remove any) / time.
          (a) and (b) run --repeat times, interleaved; the best run of each is compared.
  (c)     the same with the default detector (retinaface), run through bench.timed_build (the
          same CLI with a timing subclass of DetectActor) to measure the detect stage in place.
  (d)     pipeline.detect.RetinaFaceDetector at detect_size / detect_batch_size in this process,
          on the images the detect stage sees (decode_image's output), one warm-up batch
          excluded; timed with and without the JPEG decode (load_rgb).

Times are reported three ways where they exist: wall (process start to exit: what a user
waits), after start-up (without interpreter, imports and ray.init / process-pool spawn) and
the core download stage alone. Results: printed, and written as JSON to --out.

The machine may be shared: each measurement waits (up to --idle-wait) for idle CPUs, records
the CPU time other processes used meanwhile, and is repeated (--retries) when they took more
than 15 % of it. Companions: bench.profile_unit (one unit under cProfile, no Ray) and
bench.whatif (one timed build with other settings). Results and analysis: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench.machine_load import DISTURBED, Phase  # noqa: E402
from bench.speed_input import Row, make_rows, start_server, write_input  # noqa: E402
from pipeline.build_config import BuildConfig  # noqa: E402

DEFAULT_ROWS = 2000
DEFAULT_OUT = "out/bench"
# Statuses of rows that were downloaded and decoded (and, with a detector, detected): the work
# measured. "written" counts what is left after the exact and near-duplicate removal that
# follows, which on this input (48 photos, each varied by one pixel) removes the near-copies.
DECODED_STATUSES = ("ok", "no_face", "face_rejected", "duplicate_image", "near_duplicate", "benchmark_overlap")
TARGETS = {"b_over_a": 1.0, "detect_stage_over_d": 0.85, "c_over_two_stage_bound": 0.8}


# --- the contenders --------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # every build starts its own Ray, as a user's would
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    return env


def _run(cmd: list[str], log: Path, timeout: float, temp_dir: Path | None = None) -> tuple[float, float]:
    """Run cmd (output to log); returns (wall seconds, start epoch). Raises on failure. temp_dir:
    the process's TMPDIR, deleted after it (img2dataset imports wandb, whose temporary folders its
    worker processes leave in /tmp, two a process)."""
    started = time.time()
    env = _env()
    if temp_dir is not None:
        temp_dir.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(temp_dir)
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        wall = time.perf_counter() - t0
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; see {log}")
    return wall, started


def run_fetch_only(work: Path, urls: list[str], threads: int = 64) -> dict:
    (work / "urls.txt").write_text("\n".join(urls) + "\n")
    result = work / "fetch_only.json"
    wall, _ = _run([sys.executable, "-m", "bench.fetch_only", str(work / "urls.txt"), str(threads), str(result)],
                   work / "fetch_only.log", timeout=600)
    out = json.loads(result.read_text())
    out["wall_s"] = wall
    return out


def run_img2dataset(work: Path, parquet: Path, shard_size: int, processes: int, threads: int,
                    name: str = "img2dataset", settings: dict | None = None) -> dict:
    """settings: img2dataset.download's arguments in place of this benchmark's (no resize, shard_size, ...)."""
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    settings = settings if settings is not None else {"resize_mode": "no", "processes_count": processes, "thread_count": threads,
                            "number_sample_per_shard": shard_size}
    settings = {"url_list": str(parquet), "input_format": "parquet", "url_col": "URL", "caption_col": "TEXT",
                "output_format": "webdataset", "output_folder": str(folder), "enable_wandb": False, **settings}
    (work / f"{name}.settings.json").write_text(json.dumps(settings))
    result = work / f"{name}.result.json"
    wall, _ = _run([sys.executable, "-m", "bench.img2dataset_run", str(work / f"{name}.settings.json"),
                          str(result)], work / f"{name}.log", timeout=900, temp_dir=work / f"{name}.tmp")
    inner = json.loads(result.read_text())
    stats = [json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(folder / "*_stats.json")))]
    successes = sum(s["successes"] for s in stats)
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    statuses: dict[str, int] = {}
    for s in stats:
        for status, n in s.get("status_dict", {}).items():
            statuses[status] = statuses.get(status, 0) + n
    return {
        "settings": settings, "count": sum(s["count"] for s in stats), "successes": successes,
        "failed_to_download": sum(s["failed_to_download"] for s in stats),
        "failed_to_resize": sum(s["failed_to_resize"] for s in stats), "statuses": statuses,
        "shards": len(stats), "wall_s": wall, "import_s": inner["import_s"], "download_call_s": inner["download_s"],
        "shards_span_s": span, "startup_s": wall - span,
        "images_per_s": {"wall": successes / wall, "download_call": successes / inner["download_s"],
                         "shards_span": successes / span},
    }


def builder_args(parquet: Path, output: Path, port: int, detector: str, shard_size: int) -> list[str]:
    return ["--input", str(parquet), "--output", str(output), "--detector", detector,
            "--allow-host", f"127.0.0.1:{port}", "--image-max-side", "0", "--shard-size", str(shard_size),
            "--no-progress"]


def run_builder(work: Path, parquet: Path, port: int, detector: str, shard_size: int, timed: bool,
                name: str, args: list[str] | None = None) -> dict:
    """args: the builder's flags after --input, --output and --allow-host, in place of this benchmark's."""
    output = work / name
    shutil.rmtree(output, ignore_errors=True)
    timing = Path(str(output) + ".stage-timing.jsonl")
    timing.unlink(missing_ok=True)
    module = "bench.timed_build" if timed else "pipeline.build_laion_face"
    if args is None:
        args = builder_args(parquet, output, port, detector, shard_size)
    else:
        args = ["--input", str(parquet), "--output", str(output), "--allow-host", f"127.0.0.1:{port}", *args]
    wall, started = _run([sys.executable, "-m", module, *args], work / f"{name}.log", timeout=900)
    stats = json.loads((output / "stats.json").read_text())
    run = stats["last_run"]
    stages = run["stage_seconds"]
    after_startup = sum(stages.values())
    counts = stats["counts"]
    # every row that reached the detector (or, without one, was written): decoded images
    images = sum(counts.get(k, 0) for k in DECODED_STATUSES)
    result = {
        "command": f"python -m {module} {' '.join(args)}", "wall_s": wall, "build_s": run["seconds"],
        "stage_seconds": stages, "after_startup_s": after_startup,
        # interpreter + imports + input checks + ray.init (+ Ray shutdown at exit)
        "startup_s": wall - after_startup,
        "before_first_stage_s": run["seconds"] - after_startup,  # inside build(): mostly ray.init
        "written": stats["written"], "images": images, "counts": counts, "shards": stats["shards"],
        "images_per_s": {"wall": images / wall, "after_startup": images / after_startup,
                         "download_stage": images / stages["download_detect_write_s"]},
        "written_per_s_wall": stats["written"] / wall,
    }
    if timed:
        result["stage_timing"] = stage_timing(timing, started)
        if "detect" in result["stage_timing"]:
            result["detect_stage"] = result["stage_timing"]["detect"]
    return result


def stage_timing(path: Path, run_started: float) -> dict:
    """Per stage: calls, busy seconds (sum of call durations), CPU seconds, when it first started
    and last ended (seconds after the process started); for detect also images and detector time."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = {}
    for stage in dict.fromkeys(r.get("stage", "detect") for r in records):
        calls = [r for r in records if r.get("stage", "detect") == stage and r["event"] == "call"]
        if not calls:
            continue
        busy = sum(r["end"] - r["start"] for r in calls)
        first, last = min(r["start"] for r in calls), max(r["end"] for r in calls)
        info = {"calls": len(calls), "processes": len({r["pid"] for r in calls}), "busy_s": busy,
                "cpu_s": sum(r["cpu_s"] for r in calls), "first_start_s": first - run_started,
                "last_end_s": last - run_started, "span_s": last - first}
        if stage == "detect":
            inits = [r for r in records if r.get("stage", "detect") == stage and r["event"] == "init"]
            images = sum(r["images"] for r in calls)
            detector = sum(r["detector_s"] for r in calls)
            info.update({"images": images, "model_load_s": sum(r["end"] - r["start"] for r in inits),
                         "detector_s": detector, "rest_of_call_s": busy - detector,
                         "images_per_s": {"busy": images / busy, "detector_calls": images / detector,
                                          "span": images / info["span_s"]}})
        out[stage] = info
    return out


def raw_detector(rows: list[Row], batch_size: int, size: int) -> dict:
    """RetinaFaceDetector alone, one process, on the images the detect stage reads."""
    from pipeline.decode import decode_image
    from pipeline.detect import DETECTION_FLOOR, RetinaFaceDetector, load_rgb

    config = BuildConfig(image_max_side=0)  # as in the builds above
    stored = [decode_image(r.data, config)[0] for r in rows]
    t0 = time.perf_counter()
    detector = RetinaFaceDetector(size, use_gpu=False, floor=min(DETECTION_FLOOR, config.min_face_score))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    detector([load_rgb(b) for b in stored[:batch_size]])  # warm-up, excluded
    warmup_s = time.perf_counter() - t0
    decode_s = detect_s = 0.0
    faces = 0
    for start in range(0, len(stored), batch_size):
        t0 = time.perf_counter()
        images = [load_rgb(b) for b in stored[start:start + batch_size]]
        t1 = time.perf_counter()
        found = detector(images)
        detect_s += time.perf_counter() - t1
        decode_s += t1 - t0
        faces += sum(1 for f in found if any(x.score >= config.min_face_score for x in f))
    n = len(stored)
    return {"images": n, "batch_size": batch_size, "detect_size": size, "model_load_s": load_s,
            "warmup_batch_s": warmup_s, "decode_s": decode_s, "detector_s": detect_s,
            "images_with_a_face_over_min_score": faces,
            "images_per_s": {"detector": n / detect_s, "decode_and_detector": n / (decode_s + detect_s)}}


# --- the report ------------------------------------------------------------------------------

def machine() -> dict:
    import onnxruntime
    import ray

    import img2dataset  # noqa: F401

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    from importlib.metadata import version

    return {"cpu": model, "cpus": os.cpu_count(), "memory_mib": mem, "platform": platform.platform(),
            "python": platform.python_version(), "ray": ray.__version__, "onnxruntime": onnxruntime.__version__,
            "img2dataset": version("img2dataset")}


def targets(a: dict, b: dict, c: dict, d: dict) -> dict:
    a_ips, b_ips, c_ips = a["images_per_s"], b["images_per_s"], c["images_per_s"]
    d_det, d_dec = d["images_per_s"]["detector"], d["images_per_s"]["decode_and_detector"]
    bound = 1 / (1 / a_ips["wall"] + 1 / d_det)
    bound_after = 1 / (1 / a_ips["shards_span"] + 1 / d_det)
    out = {
        "b_over_a": {
            "target": TARGETS["b_over_a"], "ratio": b_ips["wall"] / a_ips["wall"],
            "after_startup": b_ips["after_startup"] / a_ips["download_call"],
            "download_stage": b_ips["download_stage"] / a_ips["shards_span"],
            "basis": "wall: process start to exit, both; after_startup: b after ray.init vs a's download() call; "
                     "download_stage: b's download_detect_write_s vs a's first-shard-start to last-shard-end"},
        "c_over_two_stage_bound": {
            "target": TARGETS["c_over_two_stage_bound"], "bound_images_per_s": bound,
            "ratio": c_ips["wall"] / bound, "after_startup": c_ips["after_startup"] / bound_after,
            "bound_after_startup_images_per_s": bound_after,
            "basis": "bound = 1/(1/a + 1/d), a = img2dataset images/s, d = raw detector images/s (no decode); "
                     "wall: c wall vs a wall; after_startup: c after ray.init vs a's shard span"},
    }
    stage = c.get("detect_stage")
    derived_s = c["stage_seconds"]["download_detect_write_s"] - b["stage_seconds"]["download_detect_write_s"]
    derived = {"extra_seconds_with_detector": derived_s,
               "images_per_s": c["images"] / derived_s if derived_s > 0 else None}
    out["detect_stage_over_d"] = {"target": TARGETS["detect_stage_over_d"], "derived_full_minus_none": derived}
    if derived["images_per_s"]:
        derived["ratio"] = derived["images_per_s"] / d_det
    if stage:
        ips = stage["images_per_s"]
        out["detect_stage_over_d"].update({
            "ratio": ips["busy"] / d_dec,
            "busy_vs_detector_only": ips["busy"] / d_det,
            "detector_calls_in_pipeline_vs_raw": ips["detector_calls"] / d_det,
            "span_vs_decode_and_detector": ips["span"] / d_dec,
            "basis": "ratio: DetectActor busy time per image (unpickle + JPEG decode + detector + pickle) vs the "
                     "raw detector with the same JPEG decode, single process; busy_vs_detector_only: the same "
                     "against the raw detector without decode; detector_calls_in_pipeline_vs_raw: only the "
                     "detector calls inside the actor vs the same calls alone (CPU contention)"})
    else:
        out["detect_stage_over_d"]["ratio"] = derived.get("ratio")
    for t in out.values():
        t["met"] = t["ratio"] is not None and t["ratio"] >= t["target"]
    return out


def print_report(r: dict) -> None:
    a, b, c, d = r["img2dataset"], r["builder_no_detect"], r["builder_full"], r["raw_detector"]
    print(f"\ninput: {r['input']['rows']} rows ({r['input']['mib']:.0f} MiB, all distinct), shard size "
          f"{r['settings']['shard_size']}, {r['machine']['cpus']} CPUs ({r['machine']['cpu']})")
    if r.get("fetch_only"):
        f = r["fetch_only"]
        print(f"fetch only (server ceiling): {f['images_per_s']:.0f} images/s ({f['ok']}/{f['urls']} in "
              f"{f['seconds']:.1f} s, {f['threads']} threads)")
    print(f"{'':34s}{'images':>7s}{'wall s':>9s}{'img/s':>8s}{'startup s':>11s}{'img/s excl.':>13s}"
          f"{'stage s':>9s}{'img/s stage':>13s}")
    print(f"{'(a) img2dataset':34s}{a['successes']:7d}{a['wall_s']:9.1f}{a['images_per_s']['wall']:8.1f}"
          f"{a['wall_s'] - a['download_call_s']:11.1f}{a['images_per_s']['download_call']:13.1f}"
          f"{a['shards_span_s']:9.1f}{a['images_per_s']['shards_span']:13.1f}")
    for label, x in (("(b) builder --detector none", b), ("(c) builder, retinaface", c)):
        print(f"{label:34s}{x['images']:7d}{x['wall_s']:9.1f}{x['images_per_s']['wall']:8.1f}"
              f"{x['startup_s']:11.1f}{x['images_per_s']['after_startup']:13.1f}"
              f"{x['stage_seconds']['download_detect_write_s']:9.1f}{x['images_per_s']['download_stage']:13.1f}")
    print(f"    stage seconds (b): {b['stage_seconds']}, (c): {c['stage_seconds']}")
    print(f"    written after the dedupe stages: (b) {b['written']}, (c) {c['written']}; statuses (c): {c['counts']}")
    for label, x in (("(a)", a), ("(b)", b)):
        print(f"    {label} runs, images/s wall: {x.get('runs_images_per_s_wall')}")
    fetch = c.get("stage_timing", {}).get("source_fetch_decode")
    if fetch:
        print(f"    (c) source_fetch_decode: {fetch['calls']} units, busy {fetch['busy_s']:.1f} s over a span of "
              f"{fetch['span_s']:.1f} s (average concurrency {fetch['busy_s'] / fetch['span_s']:.2f})")
    print(f"(d) raw detector: {d['images_per_s']['detector']:.1f} images/s (detector only), "
          f"{d['images_per_s']['decode_and_detector']:.1f} with JPEG decode ({d['images']} images, "
          f"batch {d['batch_size']}, {d['detect_size']} px)")
    if c.get("detect_stage"):
        s = c["detect_stage"]
        print(f"detect stage in (c): {s['images']} images, busy {s['busy_s']:.1f} s "
              f"({s['images_per_s']['busy']:.1f} images/s), of which detector {s['detector_s']:.1f} s "
              f"({s['images_per_s']['detector_calls']:.1f} images/s); span {s['span_s']:.1f} s "
              f"({s['images_per_s']['span']:.1f} images/s)")
    for name in ("fetch_only", "img2dataset", "builder_no_detect", "builder_full", "raw_detector"):
        m = r.get(name, {}).get("machine_during_run", {})
        if m.get("foreign_fraction_of_machine", 0) > 0.05:
            print(f"WARNING: others used {100 * m['foreign_fraction_of_machine']:.0f} % of the machine during {name} "
                  f"({m['foreign_cpu_s']} CPU-s: {', '.join(m['foreign_top'][:3])}); its numbers are pessimistic")
    t = r["targets"]
    print("targets:")
    ba = t["b_over_a"]
    print(f"  (b) >= {ba['target']} x (a): {ba['ratio']:.2f} {'MET' if ba['met'] else 'MISSED'}"
          f" (after start-up {ba['after_startup']:.2f}, download stage {ba['download_stage']:.2f})")
    ds = t["detect_stage_over_d"]
    extra = ""
    if "busy_vs_detector_only" in ds:
        extra = (f" (vs detector-only d {ds['busy_vs_detector_only']:.2f}; detector calls in the pipeline vs raw "
                 f"{ds['detector_calls_in_pipeline_vs_raw']:.2f}")
        dv = ds["derived_full_minus_none"].get("ratio")
        extra += f"; derived full-minus-none {dv:.2f})" if dv is not None else ")"
    print(f"  detect stage >= {ds['target']} x (d): {ds['ratio']:.2f} {'MET' if ds['met'] else 'MISSED'}{extra}")
    cb = t["c_over_two_stage_bound"]
    print(f"  (c) >= {cb['target']} x 1/(1/a + 1/d) = {cb['bound_images_per_s']:.1f}: {cb['ratio']:.2f} "
          f"{'MET' if cb['met'] else 'MISSED'} (after start-up {cb['after_startup']:.2f})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, help=f"input rows (default {DEFAULT_ROWS})")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"results directory (JSON: DIR/build_speed.json), or a .json file (default {DEFAULT_OUT})")
    p.add_argument("--shard-size", type=int, default=0,
                   help="rows per work unit / img2dataset shard (default: rows / 8, so 2 processes get 4 each)")
    p.add_argument("--processes", type=int, default=2, help="img2dataset processes_count (default 2)")
    p.add_argument("--threads", type=int, default=32, help="img2dataset thread_count (default 32, as ours)")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs of (a) and (b), interleaved; the best of each is compared (default 2)")
    p.add_argument("--detect-rows", type=int, default=0, help="rows for (d) (default: all)")
    p.add_argument("--server-seconds", type=float, default=1800, help="the server stops itself after this many seconds (default 1800)")
    p.add_argument("--idle-wait", type=float, default=120,
                   help="before each measurement, wait up to this many seconds for the CPUs to be idle "
                        "(others' jobs distort the numbers; 0: don't wait)")
    p.add_argument("--retries", type=int, default=1,
                   help="extra attempts of a measurement during which others used over 15 %% of the CPUs")
    p.add_argument("--timed-b", action="store_true",
                   help="run (b) through bench.timed_build too, to get its per-unit stage timeline")
    p.add_argument("--skip-fetch-only", action="store_true", help="skip the server-ceiling measurement")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    result_path = out if out.suffix == ".json" else out / "build_speed.json"
    work = result_path.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    shard_size = args.shard_size or max(1, -(-args.rows // 8))
    config = BuildConfig()
    report: dict = {"command": "python -m bench.build_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": machine(),
                    "settings": {"rows": args.rows, "shard_size": shard_size, "img2dataset_processes": args.processes,
                                 "img2dataset_threads": args.threads, "builder_threads_per_task": config.threads_per_task,
                                 "detect_size": config.detect_size, "detect_batch_size": config.detect_batch_size,
                                 "detect_actors": config.detect_actors}}
    started = time.perf_counter()
    t0 = time.perf_counter()
    rows = make_rows(args.rows)
    report["input"] = {"rows": len(rows), "mib": sum(len(r.data) for r in rows) / 2**20,
                       "distinct_photos": len({r.image.name for r in rows}),
                       "face_rows": sum(1 for r in rows if r.image.has_face),
                       "generate_s": time.perf_counter() - t0}
    print(f"generated {len(rows)} distinct images in {report['input']['generate_s']:.1f} s", flush=True)
    parquet = work / "input.parquet"
    server, watchdog = start_server(rows, args.server_seconds)
    try:
        write_input(parquet, rows, server)
        report["server"] = server.base_url

        def measure(name: str, fn, label: str, value) -> dict:
            """fn() on an idle machine; once more (up to --retries) if others used much of it meanwhile,
            keeping the least disturbed attempt."""
            attempts = []
            for _ in range(1 + args.retries):
                with Phase(args.idle_wait) as phase:
                    result = fn()
                result["machine_during_run"] = phase.info
                print(f"{label}: {value(result):.1f} images/s  (machine: {phase.info})", flush=True)
                attempts.append(result)
                if phase.info["foreign_fraction_of_machine"] <= DISTURBED:
                    break
            best = min(attempts, key=lambda r: r["machine_during_run"]["foreign_fraction_of_machine"])
            best["attempts_images_per_s"] = [round(value(r), 1) for r in attempts]
            return best

        if not args.skip_fetch_only:
            report["fetch_only"] = measure("fetch_only", lambda: run_fetch_only(work, [server.url(r.path) for r in rows]),
                                           "fetch only", lambda r: r["images_per_s"])
        runs: dict[str, list[dict]] = {"img2dataset": [], "builder_no_detect": []}
        for attempt in range(args.repeat):  # interleaved, so that a slow spell hits both alike
            runs["img2dataset"].append(measure(
                "img2dataset", lambda: run_img2dataset(work, parquet, shard_size, args.processes, args.threads),
                f"(a) img2dataset, run {attempt + 1}", lambda r: r["images_per_s"]["wall"]))
            runs["builder_no_detect"].append(measure(
                "builder_no_detect",
                lambda: run_builder(work, parquet, server.port, "none", shard_size, args.timed_b, "no_detect"),
                f"(b) builder --detector none, run {attempt + 1}", lambda r: r["images_per_s"]["wall"]))
        for name, results in runs.items():  # the fastest run of each: the least disturbed
            report[name] = max(results, key=lambda r: r["images_per_s"]["wall"])
            report[name]["runs_images_per_s_wall"] = [round(r["images_per_s"]["wall"], 1) for r in results]
        report["builder_full"] = measure(
            "builder_full", lambda: run_builder(work, parquet, server.port, "retinaface", shard_size, True, "full"),
            "(c) builder, retinaface", lambda r: r["images_per_s"]["wall"])
        report["server_requests"] = sum(server.requests.values())
    finally:
        watchdog.cancel()
        server.stop()
    detect_rows = rows[:args.detect_rows] if args.detect_rows else rows
    report["raw_detector"] = measure("raw_detector",
                                     lambda: raw_detector(detect_rows, config.detect_batch_size, config.detect_size),
                                     "(d) raw detector", lambda r: r["images_per_s"]["detector"])
    report["targets"] = targets(report["img2dataset"], report["builder_no_detect"], report["builder_full"],
                                report["raw_detector"])
    report["total_s"] = time.perf_counter() - started
    result_path.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nresults: {result_path} (bench total {report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
