"""Would a pHash of the aligned face catch the web copies that the whole-image pHashes miss? A
prototype (not pipeline code), measured on the bench photos that show faces.

    python -m bench.face_hash_quality [--per-kind 12] [--out out/bench/face_hash_quality.json]

Sources: bench.dedupe_images' photos in which the pipeline's detector (RetinaFace, score >= 0.9)
finds a face. Each web family of bench.dedupe_images (crops of 3-15 % on one to four sides,
letterbox bars, turns of 1-5 degrees, greyscale, a caption bar, three JPEG rounds, combinations)
makes --per-kind copies of each. Every original and copy is stored as the builder stores it
(pipeline.decode.decode_image) and gets:

  pipeline   its 16 pHashes, compared as near_dedupe does (one's pHash against any of the other's 16)
  face       one pHash (pipeline.decode.phashes) of each face it shows (score >= 0.9; a copy is
             caught when any of its faces is near any of its original's), aligned by a similarity
             transform of the 5 landmarks onto ArcFace's 112-px template, warped to FACE_SIDE px;
             --face-share < 1 takes in context around the face

Recall: a copy counts as caught at k when its distance to its original is <= k; "either" when
one of the two is (what a dedupe using both hashes would catch). Distinct faces:
every face the detector finds at >= 0.9 in the photos (group photos give several people), all
pairs, face hash against face hash; the closest pairs are listed. Few distinct faces ship with the
installed packages (about a dozen), so this bounds nothing at LAION size: it shows whether the idea
is worth building, not what it would merge among 50M faces.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import zlib
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from bench.dedupe_images import KINDS, load_photos, transform
from pipeline.build_config import BuildConfig
from pipeline.decode import decode_image, phashes
from pipeline.detect import RetinaFaceDetector
from pipeline.schema import Face

WEB_KINDS = KINDS[KINDS.index("crop10"):]
KS = (4, 6, 8, 10, 12)
MIN_SCORE = 0.9
FACE_SIDE = 64
# ArcFace's five landmarks in its 112 x 112 crop: eyes, nose tip, mouth corners
ARCFACE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                    [70.7299, 92.2041]], np.float32)


def template(face_share: float) -> np.ndarray:
    """ArcFace's landmarks in a FACE_SIDE square where its 112-px crop fills `face_share` of the side
    (the rest: hair, neck and background around the face, centred)."""
    side = FACE_SIDE * face_share
    return ARCFACE * (side / 112) + (FACE_SIDE - side) / 2
CONFIG = BuildConfig()


JITTERS = [(0.0, 0.0, 1.0)] + [(dx, dy, 1.0) for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1))] + [
    (0.0, 0.0, 0.94), (0.0, 0.0, 1.06)]  # (dx, dy in JITTER_PX, scale): where a detector's landmarks wander


def face_hash(rgb: np.ndarray, face: Face, face_share: float, jitter: tuple[float, float, float] = (0.0, 0.0, 1.0),
              jitter_px: float = 0.0) -> int:
    """pHash of the face, aligned on its landmarks: unmoved by crops, bars and turns around it;
    `jitter` moves and scales the alignment, as the landmarks of another copy may be."""
    dx, dy, scale = jitter
    target = (template(face_share) - FACE_SIDE / 2) * scale + FACE_SIDE / 2 + np.array([dx, dy]) * jitter_px
    matrix, _ = cv2.estimateAffinePartial2D(np.array(face.landmarks, np.float32), target.astype(np.float32),
                                            method=cv2.LMEDS)
    aligned = cv2.warpAffine(rgb, matrix, (FACE_SIDE, FACE_SIDE), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
    return int(phashes(Image.fromarray(aligned))[0], 16)


def stored(data: bytes) -> tuple[np.ndarray, list[int]]:
    """The image as the builder stores it, and its 16 pHashes."""
    jpeg, *_, hashes = decode_image(data, CONFIG)
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), [int(h, 16) for h in hashes]


def bits(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def pipeline_distance(a: list[int], b: list[int]) -> int:
    return min(min(bits(a[0], h) for h in b), min(bits(b[0], h) for h in a))


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    detector = RetinaFaceDetector(CONFIG.detect_size, use_gpu=False)
    sources, distinct = {}, []
    for name, photo in load_photos().items():
        rgb, hashes = stored(_jpeg(photo))
        faces = [f for f in detector([rgb])[0] if f.score >= MIN_SCORE]
        if faces:
            jitters = JITTERS if args.jitter_px else JITTERS[:1]  # the stored side: one hash per jitter
            face_hashes = [face_hash(rgb, f, args.face_share, j, args.jitter_px) for f in faces for j in jitters]
            sources[name] = (photo, hashes, face_hashes)
            distinct += [(f"{name}#{i}", face_hash(rgb, f, args.face_share)) for i, f in enumerate(faces)]
    print(f"{len(sources)} photos with a face, {len(distinct)} distinct faces", flush=True)
    distances: dict[str, dict[str, list]] = {kind: {"pipeline": [], "face": []} for kind in WEB_KINDS}
    missed_face = {kind: 0 for kind in WEB_KINDS}
    for name, (photo, hashes, face_hashes) in sources.items():
        for kind in WEB_KINDS:
            for i in range(args.per_kind):
                rng = np.random.default_rng([args.seed, zlib.crc32(name.encode()), KINDS.index(kind), i])
                rgb, copy_hashes = stored(transform(photo, kind, rng)[0])
                distances[kind]["pipeline"].append(pipeline_distance(copy_hashes, hashes))
                copy_faces = [f for f in detector([rgb])[0] if f.score >= MIN_SCORE]
                missed_face[kind] += not copy_faces
                distances[kind]["face"].append(min((bits(face_hash(rgb, f, args.face_share), h)  # 65: none found
                                                    for f in copy_faces for h in face_hashes), default=65))
    for by in distances.values():  # what a dedupe using both would catch: either within k
        by["either"] = np.minimum(by["pipeline"], by["face"]).tolist()
    recall = {kind: {method: {k: float(np.mean(np.array(d) <= k)) for k in KS} for method, d in by.items()}
              for kind, by in distances.items()}
    pairs = sorted((bits(a, b), x, y) for (x, a), (y, b) in combinations(distinct, 2))
    return {"command": "python -m bench.face_hash_quality " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                          for k, v in vars(args).items() if k != "out"),
            "photos": sorted(sources), "copies_per_kind": args.per_kind * len(sources), "recall": recall,
            "copies_without_a_face_found": missed_face, "distinct_faces": len(distinct),
            "distinct_pairs": len(pairs), "distinct_pairs_within": {k: sum(d <= k for d, _, _ in pairs) for k in KS},
            "closest_distinct_pairs": [{"distance": d, "a": x, "b": y} for d, x, y in pairs[:8]],
            "seconds": round(time.perf_counter() - started, 1)}


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def summary(result: dict) -> str:
    lines = [f"{result['copies_per_kind']} copies per family of {len(result['photos'])} photos: "
             f"{', '.join(result['photos'])}", f"{'family':28} {'method':9} " + " ".join(f"k={k:<4}" for k in KS)]
    for kind, by in result["recall"].items():
        for method, values in by.items():
            lines.append(f"{kind:28} {method:9} " + " ".join(f"{values[k]:.3f} " for k in KS))
    lines.append(f"copies without a face found: {result['copies_without_a_face_found']}")
    lines.append(f"{result['distinct_faces']} distinct faces, {result['distinct_pairs']} pairs; within k: "
                 f"{result['distinct_pairs_within']}; closest: {result['closest_distinct_pairs'][:3]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/bench/face_hash_quality.json")
    parser.add_argument("--per-kind", type=int, default=12, help="copies of each photo per web family")
    parser.add_argument("--face-share", type=float, default=1.0,
                        help="how much of the hashed square ArcFace's 112-px face crop fills (less: more context)")
    parser.add_argument("--jitter-px", type=float, default=0.0,
                        help="also hash each stored face with its alignment moved by this many pixels (of "
                             "FACE_SIDE) and scaled by 6 %%: 7 hashes a face, as the crop hashes are 16 an image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(summary(result))
    print(f"written {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
