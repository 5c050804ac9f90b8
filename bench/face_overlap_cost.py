"""What pipeline.face_overlaps costs at LAION size: the index of the excluded faces, built once per
Ray task, and the lookup and check of each written face view, on one core.

    python -m bench.face_overlap_cost [--excluded-faces 30000] [--written-faces 20000]

Synthetic hashes (uniform, so no pHash match comes by chance): a tenth of the written views lie
within 0-6 bits of an excluded hash and, half of them, within CHECK_DISTANCE of its check hash, so
the lookup, the checks and the status rows all get work. Real face pHashes are correlated, which
gives each view more candidates (docs/PERFORMANCE.md: ~4.6e-4 of distinct face pairs within 6 bits):
the per-candidate cost is reported apart so that it can be scaled.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.face_hash import CHECK_DISTANCE, JITTERS, VIEWS
from pipeline.face_overlaps import ExcludedFaces, block_removals, check_bytes, excluded_index

CHECK_BYTES = 18
LAION_FACES = 50_000_000  # written faces in a LAION-FACE build (SCALE.md: ~12 % of ~400M with a face)


def flipped(values: np.ndarray, bits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each value with `bits` of its 64 bits flipped, at random places."""
    out = values.view(np.uint64).copy()
    for i, n in enumerate(bits):
        for b in rng.choice(64, n, replace=False):
            out[i] ^= np.uint64(1) << np.uint64(b)
    return out.view(np.int64)


def excluded(faces: int, rng: np.random.Generator) -> ExcludedFaces:
    hashes = faces * 2 * len(VIEWS) * len(JITTERS)  # each face and its mirror's, 7 alignments a view
    views = [("bench_test", f"{i // (2 * len(VIEWS)):06d}.png", f"face 0, {VIEWS[i % len(VIEWS)]}")
             for i in range(hashes // len(JITTERS))]
    return ExcludedFaces(rng.integers(-2 ** 63, 2 ** 63 - 1, hashes, dtype=np.int64),
                         rng.integers(0, 256, (hashes, CHECK_BYTES), dtype=np.uint8),
                         np.repeat(np.arange(len(views), dtype=np.int32), len(JITTERS)), views)


def written(faces: int, reference: ExcludedFaces, rng: np.random.Generator) -> pa.Table:
    """A metadata block of `faces` samples with one face each, 3 views a face."""
    views = faces * len(VIEWS)
    phashes = rng.integers(-2 ** 63, 2 ** 63 - 1, views, dtype=np.int64)
    checks = rng.integers(0, 256, (views, CHECK_BYTES), dtype=np.uint8)
    near = rng.choice(views, views // 10, replace=False)
    source = rng.choice(len(reference.phashes), len(near))
    phashes[near] = flipped(reference.phashes[source], rng.integers(0, 7, len(near)), rng)
    agreeing = near[: len(near) // 2]
    checks[agreeing] = reference.checks[source[: len(agreeing)]]
    hexes = [f"{h:016x}" for h in phashes.view(np.uint64).tolist()]
    check_hexes = [row.tobytes().hex() for row in checks]
    return pa.table({"key": [f"{i:014d}" for i in range(faces)], "shard": ["00000"] * faces,
                     "faces": [[{"phashes": hexes[i * 3:i * 3 + 3], "check_hashes": check_hexes[i * 3:i * 3 + 3]}]
                               for i in range(faces)]})


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    reference = excluded(args.excluded_faces, rng)
    block = written(args.written_faces, reference, rng)
    start = time.process_time()
    excluded_index(reference, args.k)
    index_s = time.process_time() - start
    start = time.process_time()
    removed = block_removals(block, reference, args.k)
    lookup_s = time.process_time() - start
    pairs = np.arange(1_000_000) % len(reference.checks)
    queries = check_bytes([row.tobytes().hex() for row in reference.checks[:1000]])[pairs % 1000]
    start = time.process_time()
    np.bitwise_count(queries ^ reference.checks[pairs]).sum(axis=1) <= CHECK_DISTANCE
    check_ns = (time.process_time() - start) / len(pairs) * 1e9
    per_face_ms = 1000 * lookup_s / args.written_faces
    return {"command": "python -m bench.face_overlap_cost " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
            "excluded_hashes": len(reference.phashes), "written_views": args.written_faces * len(VIEWS),
            "index_build_s": round(index_s, 2), "lookup_and_check_s": round(lookup_s, 2),
            "per_written_face_ms": round(per_face_ms, 4), "removed_rows": removed.num_rows,
            "check_ns_per_candidate": round(check_ns, 1),
            "laion_faces_cpu_hours": round(per_face_ms * LAION_FACES / 3.6e6, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--excluded-faces", type=int, default=30_000)
    parser.add_argument("--written-faces", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/bench/face_overlap_cost.json")
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
