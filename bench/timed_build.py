"""`python -m bench.timed_build ARGS`: the builder's own CLI, with the detector actor timed.

Exactly `python -m pipeline.build_laion_face ARGS`, except that the detect stage runs
`TimedDetectActor`, a subclass of `pipeline.detect.DetectActor` that appends one JSON line
per call to `OUTPUT.detect-timing.jsonl` (a sibling of the output directory, so the output
itself is untouched): wall start/end of the call, images detected, seconds inside the
detector (letterbox + ONNX + post-processing) and the actor process's CPU seconds. The rest
of a call is unpickling the unit, JPEG-decoding each image (`load_rgb`) and pickling it back.

No pipeline code is edited: the subclass is swapped in on the module the CLI runs. Run as
`__main__`, the subclass travels to the Ray actor by value (cloudpickle), so workers need not
import `bench`; its base class is imported there by reference, as the pipeline's own is.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pipeline.build_laion_face as builder
from pipeline.detect import DetectActor


def timing_path(output: str) -> str:
    return output.rstrip("/") + ".detect-timing.jsonl"


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
        with open(self._log, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    builder.DetectActor = TimedDetectActor  # run_units looks the name up at call time
    return builder.main(argv)


if __name__ == "__main__":
    sys.exit(main())
