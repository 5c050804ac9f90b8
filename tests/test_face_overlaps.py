"""Decontamination by face views (pipeline.face_overlaps) in this process: real Parquet files of an
output and of an exclusion cache, looked up as a build does on tables. Which face and which view
matched, on both sides, must reach the status table's reason; faces without hashes, faces far from
every excluded one and faces whose check hashes disagree stay. tests/test_build_laion_face.py runs
the same through a real build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import dedupe
from pipeline.decode import HASHES
from pipeline.dedupe import first_removal_per_key
from pipeline.exclusions import EXCLUSIONS_SCHEMA
from pipeline.face_hash import CHECK_DISTANCE, JITTERS, VIEWS
from pipeline.face_overlaps import face_overlap_removals
from pipeline.schema import METADATA_SCHEMA
from pipeline.storage import Output

K = 6


def random_hashes(rng: np.random.Generator, n: int) -> list[int]:
    """Unrelated 64-bit hashes: ~32 bits apart, none within K of another (checked below)."""
    return [int(h) for h in rng.integers(0, 2 ** 63, n, dtype=np.int64)]


def hex16(value: int) -> str:
    return f"{value:016x}"


def flip(value: int, bits: int) -> int:
    return value ^ ((1 << bits) - 1) << 20


def random_checks(rng: np.random.Generator, n: int) -> list[int]:
    """Unrelated 144-bit check hashes: ~72 bits apart."""
    return [int.from_bytes(rng.bytes(18), "big") for _ in range(n)]


def hex36(value: int) -> str:
    return f"{value:036x}"


def face(phashes: list[int] | None, checks: list[int] | None = None) -> dict:
    """A written face; its check hashes unrelated to any other unless given."""
    checks = checks or random_checks(np.random.default_rng(phashes or 0), len(phashes or []))
    return {"box": [0.0, 0.0, 10.0, 10.0], "landmarks": [[1.0, 1.0]] * 5, "score": 0.99,
            "phashes": [hex16(h) for h in phashes] if phashes is not None else None,
            "check_hashes": [hex36(c) for c in checks] if phashes is not None else None}


def write_metadata(out: Path, faces_by_key: dict[str, list[dict]]) -> None:
    rows = [{"key": key, "shard": "00000", "original_width": 100, "original_height": 100, "faces": faces}
            for key, faces in faces_by_key.items()]
    table = pa.Table.from_pylist(rows).cast(pa.schema([METADATA_SCHEMA.field(name) for name in rows[0]]))
    (out / "metadata").mkdir(parents=True)
    pq.write_table(table, out / "metadata" / "00000.parquet")


def excluded_image(tmp_path: Path) -> Path:
    excluded = tmp_path / "wflw_test"
    excluded.mkdir()
    image = excluded / "0001.png"
    Image.new("RGB", (8, 8)).save(image)
    return image


def write_exclusion_cache(out: Path, image: Path, reference: list[int], checks: list[int],
                          rng: np.random.Generator) -> None:
    """The cache a build keeps of an excluded image's hashes: nothing is hashed again."""
    (out / "exclusions").mkdir()
    pq.write_table(pa.Table.from_pylist([{
        "path": str(image), "size": image.stat().st_size, "mtime": image.stat().st_mtime,
        "phashes": [hex16(h) for h in random_hashes(rng, HASHES)],
        "phashes_mirror": [hex16(h) for h in random_hashes(rng, HASHES)],
        "face_phashes": [hex16(h) for h in reference], "face_phashes_mirror": [],
        "face_check_hashes": [hex36(c) for c in checks], "face_check_hashes_mirror": []}], schema=EXCLUSIONS_SCHEMA),
        out / "exclusions" / "wflw_test.parquet")


def test_a_face_caught_by_one_view_names_both_faces_and_views(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = excluded_image(tmp_path)
    reference = random_hashes(rng, len(VIEWS) * len(JITTERS))  # one face: each view's 7 alignments in a row
    checks = random_checks(rng, len(reference))
    upper = VIEWS.index("upper part as found")
    caught = reference[upper * len(JITTERS) + 3]  # near one jittered alignment of the upper view
    kept_faces, caught_face = random_hashes(rng, 2 * len(VIEWS)), random_hashes(rng, len(VIEWS))
    caught_face[upper] = flip(caught, 3)
    caught_checks = random_checks(rng, len(VIEWS))
    caught_checks[upper] = flip(checks[upper * len(JITTERS) + 3], 10)
    everything = reference + kept_faces + caught_face
    assert min((a ^ b).bit_count() for i, a in enumerate(everything) for b in everything[i + 1:]
               if {a, b} != {caught, caught_face[upper]}) > 2 * K
    out = tmp_path / "out"
    write_metadata(out, {
        "00000000000000": [face(kept_faces[:3]), face(caught_face, caught_checks)],  # its face 1 is a copy's
        "00000000000001": [face(kept_faces[3:]), face(None)],  # a face without hashes: nothing to compare
    })
    write_exclusion_cache(out, image, reference, checks, rng)

    removed = face_overlap_removals(Output(str(out)), K, [str(image.parent)]).to_pylist()

    assert [(r["key"], r["status"], r["duplicate_of"], r["distance"], r["overlap_set"]) for r in removed] == [
        ("00000000000000", "benchmark_overlap", str(image), 3, "wflw_test")]
    assert removed[0]["reason"] == (f"face 1 (upper part as found) within 3 bits of face 0, upper part as found "
                                    f"of wflw_test image {image} (aligned-face pHashes; check hashes 10 bits apart)")


@pytest.mark.parametrize("distributed", [False, True], ids=["table", "ray-dataset"])
def test_a_face_close_by_its_phash_stays_unless_its_check_hash_agrees(
        tmp_path: Path, distributed: bool, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Distinct people's faces come within k of each other's pHashes (1-3 of ~6,300 LFW pairs at 6
    bits): such a pair is a match only when the check hashes of the same two alignments are within
    CHECK_DISTANCE, whatever another alignment's check hash says. The same on Ray Data, as a build
    of many rows runs it (each task with its own index of the excluded faces)."""
    if distributed:
        request.getfixturevalue("ray_address")
        monkeypatch.setattr(dedupe, "LOCAL_ROWS", 0)
    rng = np.random.default_rng(2)
    image = excluded_image(tmp_path)
    reference, checks = random_hashes(rng, len(VIEWS) * len(JITTERS)), random_checks(rng, len(VIEWS) * len(JITTERS))
    faces, expected = {}, {}
    for n, (check_bits, other_alignment) in enumerate([(CHECK_DISTANCE, False), (CHECK_DISTANCE + 2, False),
                                                        (0, True)]):
        phashes, view_checks = random_hashes(rng, len(VIEWS)), random_checks(rng, len(VIEWS))
        phashes[0] = flip(reference[2], 2)  # the aligned view near alignment 2 of the excluded aligned view
        view_checks[0] = flip(checks[3 if other_alignment else 2], check_bits)
        key = f"{n:014d}"
        faces[key] = [face(phashes, view_checks)]
        if check_bits <= CHECK_DISTANCE and not other_alignment:
            expected[key] = check_bits
    out = tmp_path / "out"
    write_metadata(out, faces)
    write_exclusion_cache(out, image, reference, checks, rng)

    removed = face_overlap_removals(Output(str(out)), K, [str(image.parent)])
    removed = removed.take_all() if distributed else removed.to_pylist()

    assert {r["key"]: r["reason"] for r in removed} == {
        key: f"face 0 (aligned) within 2 bits of face 0, aligned of wflw_test image {image} (aligned-face pHashes; "
             f"check hashes {bits} bits apart)" for key, bits in expected.items()}


def test_of_several_views_and_faces_caught_the_closest_says_why_in_any_order(tmp_path: Path) -> None:
    """A sample caught through several faces and views gets one status row, the closest match's,
    whichever order the face overlaps' rows come in (on Ray, the order of their blocks)."""
    rng = np.random.default_rng(1)
    image = excluded_image(tmp_path)
    reference = random_hashes(rng, len(VIEWS) * len(JITTERS))
    checks = random_checks(rng, len(reference))
    aligned, upper = VIEWS.index("aligned"), VIEWS.index("upper part as found")
    first, second = random_hashes(rng, len(VIEWS)), random_hashes(rng, len(VIEWS))
    first_checks, second_checks = random_checks(rng, len(VIEWS)), random_checks(rng, len(VIEWS))
    first[aligned], first_checks[aligned] = flip(reference[aligned * len(JITTERS)], 5), checks[aligned * len(JITTERS)]
    second[aligned], second_checks[aligned] = flip(reference[aligned * len(JITTERS)], 4), checks[aligned * len(JITTERS)]
    second[upper] = flip(reference[upper * len(JITTERS) + 2], 1)
    second_checks[upper] = checks[upper * len(JITTERS) + 2]
    out = tmp_path / "out"
    write_metadata(out, {"00000000000007": [face(first, first_checks), face(second, second_checks)]})
    write_exclusion_cache(out, image, reference, checks, rng)

    removed = face_overlap_removals(Output(str(out)), K, [str(image.parent)])
    assert sorted(removed["distance"].to_pylist()) == [1, 4, 5]  # a row per face and view caught
    for order in (np.argsort(removed["distance"].to_numpy()), np.argsort(-removed["distance"].to_numpy())):
        (row,) = first_removal_per_key([removed.take(order)], 1).to_pylist()
        assert (row["key"], row["distance"]) == ("00000000000007", 1)
        assert row["reason"].startswith("face 1 (upper part as found) within 1 bits of face 0, upper part as found ")
