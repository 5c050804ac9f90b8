"""Benchmark decontamination by faces: a written sample is removed when one of its faces' aligned
pHashes (pipeline.face_hash, one per view) lies within the near-duplicate distance of one of the 7
jittered hashes of a view of a face in an --exclude-images image or its mirror. Each view of a face
goes through the near dedupe's own machinery (near_dedupe.find_near_duplicates) as an item of its
own, keyed by the sample's key, 3 digits of face and 1 of view, so that faces are only compared
with faces (every view with every view, whatever its kind: bench.face_hash_quality counts distinct
faces' pairs the same way).
Only what an excluded face catches is removed: the dedupe of the dataset itself stays with the
whole-image hashes. Even so, distinct faces come within k: 3 of 6,480 pairs of LFW faces at k = 6
(bench.face_hash_quality), so an excluded set of thousands of faces would remove most written faces;
a longer check hash on each pair is the measured fix, not yet here (docs/PERFORMANCE.md)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.dedupe import REMOVED_SCHEMA, Rows, map_tables, materialize, written_samples
from pipeline.exclusions import exclusion_rows
from pipeline.face_hash import JITTERS, VIEWS
from pipeline.near_buckets import CROP_HASHES, REFERENCE_AREA
from pipeline.near_dedupe import ITEMS_SCHEMA, find_near_duplicates, hex_to_int64
from pipeline.storage import Output

FACE_DIGITS = 4  # a face item's key: the sample's key, the face's index in 3 digits, its view's in 1 (keys are digits)
FACE_KEYS = 10 ** (FACE_DIGITS - 1)  # faces of a sample compared: a crowd beyond them is not


def written_face_items(t: pa.Table) -> pa.Table:
    """One item per view of a kept face with hashes, from the metadata columns key, shard, faces and original size."""
    rows: dict[str, list] = {name: [] for name in ITEMS_SCHEMA.names}
    for key, shard, faces, width, height in zip(t["key"].to_pylist(), t["shard"].to_pylist(), t["faces"].to_pylist(),
                                               t["original_width"].to_pylist(), t["original_height"].to_pylist()):
        for index, face in enumerate((faces or [])[:FACE_KEYS]):  # a face numbered 1,000 would overflow the key
            for view, value in enumerate(hex_to_int64(face["phashes"]).tolist() if face.get("phashes") else []):
                rows["key"].append(f"{key}{index:03d}{view}")
                rows["phash"].append(value)
                rows["crops"].append([value] * CROP_HASHES)  # nothing else to compare: the pHash itself
                rows["area"].append(int(width) * int(height))
                rows["shard"].append(shard)
                rows["overlap_set"].append(None)
    return pa.table(rows, schema=ITEMS_SCHEMA)


def reference_face_items(name: str, rows: list[dict]) -> pa.Table:
    """One item per view of a face of each excluded image and of its mirror: its plain hash, then its jittered ones."""
    out: dict[str, list] = {column: [] for column in ITEMS_SCHEMA.names}
    for row in rows:
        for column, which in (("face_phashes", "face"), ("face_phashes_mirror", "mirrored face")):
            hashes = hex_to_int64(row[column]).tolist() if row[column] else []
            for start in range(0, len(hashes), len(JITTERS)):
                face = hashes[start:start + len(JITTERS)]
                index, view = divmod(start // len(JITTERS), len(VIEWS))
                out["key"].append(f"{row['path']} ({which} {index}, {VIEWS[view]})")
                out["phash"].append(face[0])
                out["crops"].append(((face[1:] or face) * CROP_HASHES)[:CROP_HASHES])
                out["area"].append(REFERENCE_AREA)
                out["shard"].append("")
                out["overlap_set"].append(name)
    return pa.table(out, schema=ITEMS_SCHEMA)


def _as_removed(t: pa.Table) -> pa.Table:
    t = t.filter(pc.is_valid(t["overlap_set"]))  # caught by an excluded face, not by another written one
    winners = [winner[:-1].rsplit(" (", 1) for winner in t["winner"].to_pylist()]  # [image, which face and view]
    keys = t["key"].to_pylist()
    reasons = [f"face {int(key[-FACE_DIGITS:-1])} ({VIEWS[int(key[-1])]}) within {distance} bits of {face} of {name} "
               f"image {image} (aligned-face pHashes)" for key, distance, name, (image, face) in
               zip(keys, t["distance"].to_pylist(), t["overlap_set"].to_pylist(), winners)]
    return pa.table({
        "key": [key[:-FACE_DIGITS] for key in keys], "shard": t["shard"], "status": ["benchmark_overlap"] * t.num_rows,
        "reason": reasons, "duplicate_of": [image for image, _ in winners], "distance": t["distance"],
        "overlap_set": t["overlap_set"]}, schema=REMOVED_SCHEMA)


def face_overlap_removals(output: Output, k: int, exclude: list[str]) -> Rows | None:
    """REMOVED_SCHEMA rows of the written samples that a face of an excluded image catches (a row per
    face and view caught: dedupe.first_removal_per_key keeps the closest). None: nothing excluded or written."""
    written = written_samples(output, ["key", "shard", "faces", "original_width", "original_height"])
    references = [reference_face_items(name, rows) for name, rows in exclusion_rows(output, exclude).items()]
    references = pa.concat_tables(references) if references else ITEMS_SCHEMA.empty_table()
    if written is None or references.num_rows == 0:
        return None
    items = map_tables(written, written_face_items)
    items = pa.concat_tables([items, references]) if isinstance(items, pa.Table) else items.union(
        ray.data.from_arrow(references))
    losers = find_near_duplicates(items, k, len(output.list("metadata", ".parquet")))
    return materialize(map_tables(losers, _as_removed))
