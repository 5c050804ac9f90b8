"""The canned queries: exact numbers on a hand-made output, consistency on a real build.

Tests named `test_built_output_*` take the session fixture `built_output` (tests/conftest.py):
the OUT of a real small build. The others build a tiny output here whose every number can be
checked by hand.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.schema import METADATA_SCHEMA, STATUS_SCHEMA
from queries import QueryError, list_queries, run_query

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {
    "overview", "faces_per_image", "face_size", "face_score",
    "caption_length", "rejects_by_reason", "shard_counts",
}


def _face(box: list[float], score: float) -> dict[str, Any]:
    return {"box": box, "landmarks": [[0.0, 0.0]] * 5, "score": score}


def _meta(key: str, shard: str, caption: str | None, faces: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "key": key, "shard": shard, "url": f"http://x/{key}.jpg", "caption": caption,
        "sample_id": int(key), "width": 256, "height": 256, "original_width": 512,
        "original_height": 512, "sha256": key * 4, "num_faces": len(faces), "faces": faces,
        "license": "?", "nsfw": "UNLIKELY", "similarity": 0.3,
    }


def _status(row: int, status: str, reason: str | None = None, shard: str | None = None,
            http_status: int | None = None) -> dict[str, Any]:
    key = f"{row:014d}" if status == "ok" else None
    return {
        "input_file": "part-0.parquet", "input_row": row, "unit": 0, "sample_id": row,
        "url": f"http://x/{row}.jpg", "key": key, "shard": shard, "status": status,
        "reason": reason, "duplicate_of": "00000000000000" if status == "duplicate_url" else None,
        "http_status": http_status,
    }


def _write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


@pytest.fixture
def synthetic_output(tmp_path: Path) -> Path:
    """3 written rows (4 faces) in 2 shards, 2 no_face, 1 http_error, 1 duplicate_url.

    Face shorter sides: 40, 10, 300, 80 px; scores 0.99, 0.6, 0.85, 0.92;
    captions 5, 120 and no characters.
    """
    out = tmp_path / "out"
    _write(out / "metadata" / "00000.parquet", [
        _meta("00000000000000", "00000", "a cat", [_face([0, 0, 40, 50], 0.99)]),
        _meta("00000000000001", "00000", "x" * 120,
              [_face([10, 10, 20, 30], 0.6), _face([0, 0, 300, 400], 0.85)]),
    ], METADATA_SCHEMA)
    # Columns reordered and one missing (as from another writer version): the views must
    # match files by column name, not by position, and read the missing caption as NULL.
    other_schema = pa.schema([f for f in reversed(METADATA_SCHEMA) if f.name != "caption"])
    _write(out / "metadata" / "00001_1.parquet", [
        _meta("00000000000002", "00001_1", None, [_face([0, 0, 100, 80], 0.92)]),
    ], other_schema)
    _write(out / "status" / "00000.parquet", [
        _status(0, "ok", shard="00000"),
        _status(1, "ok", shard="00000"),
        _status(3, "no_face", "the detector found no face"),
        _status(4, "http_error", "HTTP 404", http_status=404),
        _status(5, "no_face", "the detector found no face"),
        _status(6, "duplicate_url", "same URL as row 0"),
    ], STATUS_SCHEMA)
    _write(out / "status" / "00001.parquet", [_status(2, "ok", shard="00001_1")], STATUS_SCHEMA)
    # A half-written file of a killed run is not part of the output.
    (out / "status" / "00002.parquet.tmp-deadbeef").write_bytes(b"garbage")
    return out


def _run(name: str, data: Path | str) -> list[tuple[Any, ...]]:
    return run_query(name, data).rows


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "queries", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# --- the query set -------------------------------------------------------------------------


def test_every_query_is_listed_with_a_description() -> None:
    known = list_queries()
    assert REQUIRED <= set(known)
    assert all(description for description in known.values())


# --- exact numbers on the synthetic output ---------------------------------------------------


def test_overview_counts_ok_first(synthetic_output: Path) -> None:
    result = run_query("overview", synthetic_output)
    assert result.columns == ["status", "rows", "pct_of_input"]
    assert result.rows == [
        ("ok", 3, 42.86), ("no_face", 2, 28.57),
        ("duplicate_url", 1, 14.29), ("http_error", 1, 14.29),
    ]


def test_faces_per_image(synthetic_output: Path) -> None:
    assert _run("faces_per_image", synthetic_output) == [(1, 2, 66.67), (2, 1, 33.33)]


def test_face_size_buckets_include_empty_ones(synthetic_output: Path) -> None:
    assert _run("face_size", synthetic_output) == [
        ("<32", 1, 25.0), ("32-63", 1, 25.0), ("64-127", 1, 25.0),
        ("128-255", 0, 0.0), ("256+", 1, 25.0),
    ]


def test_face_score_buckets(synthetic_output: Path) -> None:
    counts = [(bucket, n) for bucket, n, _ in _run("face_score", synthetic_output)]
    assert counts == [
        ("<0.5", 0), ("0.5-0.7", 1), ("0.7-0.8", 0), ("0.8-0.9", 1), ("0.9-0.95", 1), ("0.95+", 1),
    ]


def test_caption_length_counts_missing_as_zero(synthetic_output: Path) -> None:
    counts = [(bucket, n) for bucket, n, _ in _run("caption_length", synthetic_output)]
    assert counts == [
        ("0", 1), ("1-19", 1), ("20-49", 0), ("50-99", 0), ("100-199", 1), ("200+", 0),
    ]


def test_rejects_by_reason_most_frequent_first(synthetic_output: Path) -> None:
    assert _run("rejects_by_reason", synthetic_output) == [
        ("no_face", "the detector found no face", 2, 28.57),
        ("duplicate_url", "same URL as row 0", 1, 14.29),
        ("http_error", "HTTP 404", 1, 14.29),
    ]


def test_shard_counts(synthetic_output: Path) -> None:
    assert _run("shard_counts", synthetic_output) == [("00000", 2, 3, 1.5), ("00001_1", 1, 1, 1.0)]


def test_bucketed_queries_on_an_output_without_faces(synthetic_output: Path) -> None:
    # A build that wrote nothing still has (empty) metadata files; no division by zero.
    for path in (synthetic_output / "metadata").glob("*.parquet"):
        path.unlink()
    _write(synthetic_output / "metadata" / "00000.parquet", [], METADATA_SCHEMA)
    assert [n for _, n, _ in _run("face_size", synthetic_output)] == [0] * 5
    assert _run("shard_counts", synthetic_output) == []


def test_fsspec_url(synthetic_output: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.put(str(synthetic_output), "/queries-test/out", recursive=True)
    try:
        assert _run("overview", "memory://queries-test/out")[0] == ("ok", 3, 42.86)
    finally:
        fs.rm("/queries-test", recursive=True)


def test_bad_input_raises_query_error(tmp_path: Path, synthetic_output: Path) -> None:
    with pytest.raises(QueryError, match="unknown query 'nope'; known: .*overview"):
        run_query("nope", synthetic_output)
    with pytest.raises(QueryError, match="unknown query"):
        run_query("../tests/x", synthetic_output)
    with pytest.raises(QueryError, match="does not exist"):
        run_query("overview", tmp_path / "missing")
    (tmp_path / "empty" / "status").mkdir(parents=True)
    with pytest.raises(QueryError, match="no metadata parquet files"):
        run_query("overview", tmp_path / "empty")


# --- command line ----------------------------------------------------------------------------


def test_cli_list() -> None:
    proc = _cli("--list")
    assert proc.returncode == 0, proc.stderr
    names = {line.split()[0] for line in proc.stdout.splitlines()}
    assert REQUIRED <= names
    assert "Histogram of faces per written image" in proc.stdout


def test_cli_prints_an_aligned_table(synthetic_output: Path) -> None:
    proc = _cli("overview", "--data", str(synthetic_output))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["status", "rows", "pct_of_input"]
    assert lines[2].split() == ["ok", "3", "42.86"]
    assert lines[-1] == "(4 rows)"
    # Aligned: every table line ends its numeric columns at the same place.
    assert len({len(line) for line in lines[:-1]}) == 1


@pytest.mark.parametrize("argv, message", [
    (["nope", "--data", "{out}"], "unknown query 'nope'; known: "),
    (["overview", "--data", "{missing}"], "does not exist"),
    (["overview"], "give a query NAME and --data OUT"),
    (["--bogus"], "unrecognized arguments"),
])
def test_cli_bad_input_is_one_line_and_exit_2(
    synthetic_output: Path, tmp_path: Path, argv: list[str], message: str,
) -> None:
    argv = [a.format(out=synthetic_output, missing=tmp_path / "missing") for a in argv]
    proc = _cli(*argv)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr


def test_cli_output_without_parquet_files(tmp_path: Path) -> None:
    (tmp_path / "metadata").mkdir()
    proc = _cli("overview", "--data", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: no metadata parquet files in {tmp_path}/metadata/ (is it a build output?)",
    ]


# --- consistency on a real build (fixture `built_output` from tests/conftest.py) ------------


def _read(out: Path, table: str) -> pa.Table:
    return pq.read_table(sorted((out / table).glob("*.parquet")))


def test_built_output_overview_covers_every_input_row(built_output: Path) -> None:
    status = _read(built_output, "status")
    rows = _run("overview", built_output)
    assert sum(n for _, n, _ in rows) == status.num_rows
    assert sum(pct for _, _, pct in rows) == pytest.approx(100, abs=0.01 * len(rows))
    assert rows[0][0] == "ok"
    by_status = {s: n for s, n, _ in rows}
    assert by_status["ok"] == _read(built_output, "metadata").num_rows


def test_built_output_rejects_are_the_non_ok_rows(built_output: Path) -> None:
    overview = {s: n for s, n, _ in _run("overview", built_output)}
    rejects = _run("rejects_by_reason", built_output)
    assert sum(n for _, _, n, _ in rejects) == sum(n for s, n in overview.items() if s != "ok")
    assert [n for _, _, n, _ in rejects] == sorted((n for _, _, n, _ in rejects), reverse=True)


def test_built_output_shard_counts_match_metadata(built_output: Path) -> None:
    metadata = _read(built_output, "metadata")
    shards = _run("shard_counts", built_output)
    assert sum(n for _, n, _, _ in shards) == metadata.num_rows
    assert sum(f for _, _, f, _ in shards) == sum(metadata.column("num_faces").to_pylist())
    assert {s for s, _, _, _ in shards} == set(metadata.column("shard").to_pylist())


def test_built_output_face_histograms_agree(built_output: Path) -> None:
    metadata = _read(built_output, "metadata")
    per_image = _run("faces_per_image", built_output)
    assert sum(n for _, n, _ in per_image) == metadata.num_rows
    faces = sum(k * n for k, n, _ in per_image)
    assert faces == sum(len(f) for f in metadata.column("faces").to_pylist())
    # Every face lands in exactly one size and one score bucket.
    assert sum(n for _, n, _ in _run("face_size", built_output)) == faces
    assert sum(n for _, n, _ in _run("face_score", built_output)) == faces
    assert sum(n for _, n, _ in _run("caption_length", built_output)) == metadata.num_rows


def test_built_output_cli_runs_every_query(built_output: Path) -> None:
    for name in list_queries():
        proc = _cli(name, "--data", str(built_output))
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        assert re.fullmatch(r"\(\d+ rows?\)", proc.stdout.splitlines()[-1]), proc.stdout
