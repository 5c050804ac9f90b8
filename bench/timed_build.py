"""`python -m bench.timed_build ARGS`: the builder's own CLI, with its stages timed.

Exactly `python -m pipeline.build_laion_face ARGS`, except that each call of a per-unit stage
appends one JSON line to `OUTPUT.stage-timing.jsonl` (a sibling of the output directory, so
the output itself is untouched): the stage, wall start/end, the process's CPU seconds.

- detect: `TimedDetectActor`, a subclass of `pipeline.detect.DetectActor`, also records the
  images detected and the seconds inside the detector (letterbox + ONNX + post-processing).
  The rest of a call is unpickling the unit, JPEG-decoding each image (`load_rgb`) and
  pickling it back.
- source_fetch_decode and filter_and_commit (with a detector), fetch_decode_commit (without one):
  thin wrappers around the pipeline's functions.

What-if experiments without editing the pipeline: BENCH_DATA_CONTEXT='{"name": value, ...}'
sets those ray.data.DataContext fields in the driver, over those pipeline.build.configure_ray_data
sets, e.g. '{"op_resource_reservation_enabled": true}'.

No pipeline code is edited: the subclass and the wrappers are swapped in on `pipeline.build`,
the module the CLI (and the demo) calls `build` from. Run as `__main__`, the subclass travels
to the Ray actor by value (cloudpickle), so workers need not import `bench`; its base class is
imported there by reference, as the pipeline's own is.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import ray.data

import pipeline.build as builder
from pipeline.build_laion_face import main as cli_main
from pipeline.detect import DetectActor


def timing_path(output: str) -> str:
    return output.rstrip("/") + ".stage-timing.jsonl"


class TimedDetectActor(DetectActor):
    def __init__(self, config, use_gpu: bool):
        start = time.time()
        super().__init__(config, use_gpu)
        self._log = timing_path(config.output)
        self._images, self._detector_s = 0, 0.0
        detector = self.detector

        def timed(images):
            t0 = time.perf_counter()
            faces = detector(images)
            self._detector_s += time.perf_counter() - t0
            self._images += len(images)
            return faces

        self.detector = timed
        self._write({"event": "init", "start": start, "end": time.time(), "pid": os.getpid()})

    def __call__(self, batch):
        images, detector_s = self._images, self._detector_s
        start, cpu = time.time(), time.process_time()
        out = super().__call__(batch)
        self._write({"event": "call", "start": start, "end": time.time(), "pid": os.getpid(),
                     "images": self._images - images, "detector_s": self._detector_s - detector_s,
                     "cpu_s": time.process_time() - cpu})
        return out

    def _write(self, record: dict) -> None:
        _append(self._log, {"stage": "detect", **record})


def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def timed_stage(fn, stage: str):
    """`fn` (a per-unit Ray Data batch function taking output_url=) with each call logged."""

    def timed(batch, **kwargs):
        start, cpu = time.time(), time.process_time()
        out = fn(batch, **kwargs)
        _append(timing_path(kwargs["output_url"]), {"stage": stage, "event": "call", "start": start, "end": time.time(),
                                                    "pid": os.getpid(), "units": len(out["unit"]),
                                                    "cpu_s": time.process_time() - cpu})
        return out

    return timed


def with_context_overrides(configure: Callable[[bool], None], overrides: dict) -> Callable[[bool], None]:
    """pipeline.build.configure_ray_data, then the BENCH_DATA_CONTEXT fields over its own."""
    def configure_then_override(progress_bars: bool) -> None:
        configure(progress_bars)
        context = ray.data.DataContext.get_current()
        for name, value in overrides.items():
            setattr(context, name, value)
    return configure_then_override


def main(argv: list[str] | None = None) -> int:
    if overrides := json.loads(os.environ.get("BENCH_DATA_CONTEXT") or "{}"):
        unknown = [name for name in overrides if not hasattr(ray.data.DataContext.get_current(), name)]
        if unknown:
            raise SystemExit(f"BENCH_DATA_CONTEXT: DataContext has no field {unknown[0]!r}")
        builder.configure_ray_data = with_context_overrides(builder.configure_ray_data, overrides)
    # run_units looks these names up at call time
    builder.DetectActor = TimedDetectActor
    builder.source_fetch_decode = timed_stage(builder.source_fetch_decode, "source_fetch_decode")
    builder.filter_and_commit = timed_stage(builder.filter_and_commit, "filter_and_commit")
    builder.fetch_decode_commit = timed_stage(builder.fetch_decode_commit, "fetch_decode_commit")
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
