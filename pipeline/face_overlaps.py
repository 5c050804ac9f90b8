"""Benchmark decontamination by faces: a written sample is removed when a view of one of its faces
(pipeline.face_hash: a pHash per view) lies within the near-duplicate distance of one of the 7
jittered hashes of a view of a face in an --exclude-images image or its mirror, every view with
every view, and the two alignments' check hashes lie within face_hash.CHECK_DISTANCE bits.

The check is what makes it safe at scale: on their pHashes alone, 1-3 of ~6,300 pairs of distinct LFW
faces come within 6 bits, which against a benchmark's ~30,000 faces would remove nearly every
written face (bench.face_hash_quality, docs/PERFORMANCE.md). The excluded faces are few and the
written ones many, so each block of metadata looks its faces up in an index of the excluded hashes
(faiss's multi-index hashing, exact within k bits) with no shuffle, and each candidate is checked.
Only what an excluded face catches is removed: the dedupe of the dataset itself stays with the
whole-image hashes."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from pipeline.dedupe import REMOVED_SCHEMA, Rows, map_tables, materialize, written_samples
from pipeline.exclusions import exclusion_rows
from pipeline.face_hash import CHECK_DISTANCE, JITTERS, VIEWS
from pipeline.near_buckets import BANDS
from pipeline.near_dedupe import hex_to_int64
from pipeline.storage import Output


@dataclass(eq=False)  # hashed by identity: excluded_index keeps the index of the one in use
class ExcludedFaces:
    """Every jittered view hash of every excluded face, one row each, and whose it is."""
    phashes: np.ndarray  # int64
    checks: np.ndarray  # uint8, a row of 18 bytes per hash
    owners: np.ndarray  # int32: which of `views` each hash is of, 7 hashes (JITTERS) to a view
    views: list[tuple[str, str, str]]  # (set, image, which face and view, e.g. "mirrored face 0, aligned")


def check_bytes(hashes: list[str]) -> np.ndarray:
    """36-hex-digit check hashes -> a row of 18 bytes each."""
    return np.frombuffer(bytes.fromhex("".join(hashes)), np.uint8).reshape(len(hashes), -1)


def excluded_faces(sets: dict[str, list[dict]]) -> ExcludedFaces:
    phashes, checks, owners, views = [], [], [], []
    for name, rows in sets.items():
        for row in rows:
            for which, suffix in (("face", ""), ("mirrored face", "_mirror")):
                hashes, hash_checks = row[f"face_phashes{suffix}"] or [], row[f"face_check_hashes{suffix}"] or []
                for start in range(0, len(hashes), len(JITTERS)):
                    index, view = divmod(start // len(JITTERS), len(VIEWS))
                    phashes += hashes[start:start + len(JITTERS)]
                    checks += hash_checks[start:start + len(JITTERS)]
                    owners += [len(views)] * len(JITTERS)
                    views.append((name, row["path"], f"{which} {index}, {VIEWS[view]}"))
    return ExcludedFaces(hex_to_int64(phashes) if phashes else np.empty(0, np.int64),
                         check_bytes(checks) if checks else np.empty((0, 18), np.uint8),
                         np.array(owners, np.int32), views)


@functools.lru_cache(maxsize=1)
def excluded_index(excluded: ExcludedFaces, k: int) -> faiss.IndexBinaryMultiHash:
    """4 tables of 16 bits, flipping k // 4 bits a table: two hashes within k bits agree within
    k // 4 on one of them (pigeonhole), so a range search finds every hash within k."""
    index = faiss.IndexBinaryMultiHash(64, BANDS, 64 // BANDS)
    index.nflip = k // BANDS
    index.add(np.ascontiguousarray(excluded.phashes).view(np.uint8).reshape(-1, 8))
    return index


def block_removals(t: pa.Table, excluded: ExcludedFaces, k: int) -> pa.Table:
    """REMOVED_SCHEMA rows of the samples in `t` (key, shard, faces) an excluded face catches: one per
    written face and view caught, naming its closest checked match."""
    written = [(key, shard, index, view, phash, check)
             for key, shard, faces in zip(t["key"].to_pylist(), t["shard"].to_pylist(), t["faces"].to_pylist())
             for index, face in enumerate(faces or []) if face.get("phashes") and face.get("check_hashes")
             for view, (phash, check) in enumerate(zip(face["phashes"], face["check_hashes"]))]
    rows: dict[str, list] = {name: [] for name in REMOVED_SCHEMA.names}
    if written:
        queries = hex_to_int64([v[4] for v in written])
        index = excluded_index(excluded, k)
        limits, distances, found = index.range_search(queries.view(np.uint8).reshape(-1, 8), k + 1)
        distances = distances.astype(np.int64)  # whole bits, returned as floats
        which = np.repeat(np.arange(len(written)), np.diff(limits.astype(np.int64)))
        checked = np.bitwise_count(check_bytes([v[5] for v in written])[which] ^ excluded.checks[found]).sum(axis=1)
        close = np.flatnonzero(checked <= CHECK_DISTANCE)
        best: dict[int, int] = {}  # a written view -> its closest checked candidate, the first of equals
        for i in close[np.lexsort((found[close], distances[close], which[close]))].tolist():
            best.setdefault(int(which[i]), i)
        for v, i in sorted(best.items()):
            key, shard, index, view, _, _ = written[v]
            name, image, face = excluded.views[excluded.owners[found[i]]]
            rows["key"].append(key), rows["shard"].append(shard), rows["status"].append("benchmark_overlap")
            rows["reason"].append(f"face {index} ({VIEWS[view]}) within {distances[i]} bits of {face} of {name} image "
                                  f"{image} (aligned-face pHashes; check hashes {checked[i]} bits apart)")
            rows["duplicate_of"].append(image), rows["distance"].append(int(distances[i]))
            rows["overlap_set"].append(name)
    return pa.table(rows, schema=REMOVED_SCHEMA)


def face_overlap_removals(output: Output, k: int, exclude: list[str]) -> Rows | None:
    """REMOVED_SCHEMA rows of the written samples that a face of an excluded image catches (a row per
    face and view caught: dedupe.first_removal_per_key keeps the closest). None: nothing excluded or written."""
    excluded = excluded_faces(exclusion_rows(output, exclude))
    written = written_samples(output, ["key", "shard", "faces"])
    if written is None or not len(excluded.phashes):
        return None
    return materialize(map_tables(written, functools.partial(block_removals, excluded=excluded, k=k)))
