"""The canned queries: exact numbers on a hand-made output, consistency on a real build.

Tests named `test_built_output_*` take the session fixture `built_output` (tests/conftest.py):
the OUT of a real small build. The others build a tiny output here whose every number can be
checked by hand.
"""

from __future__ import annotations

import json
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
from queries import OPTIONAL_COLUMNS, QueryError, connect, list_queries, query_keys, run_query

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {
    "overview", "faces_per_image", "face_size", "face_score",
    "caption_length", "rejects_by_reason", "shard_counts",
    "duplicate_clusters", "benchmark_overlaps", "rejects_by_host", "select_training_subset",
}
# The tables as written before the optional columns existed (older builds).
OLD_METADATA_SCHEMA = pa.schema([f for f in METADATA_SCHEMA if f.name not in OPTIONAL_COLUMNS["metadata"]])
OLD_STATUS_SCHEMA = pa.schema([f for f in STATUS_SCHEMA if f.name not in OPTIONAL_COLUMNS["status"]])


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
            http_status: int | None = None, **columns: Any) -> dict[str, Any]:
    """A status row of part-0.parquet; `columns` set or override any other column."""
    key = f"{row:014d}" if status == "ok" else None
    return {
        "input_file": "part-0.parquet", "input_row": row, "unit": 0, "sample_id": row,
        "url": f"http://x/{row}.jpg", "key": key, "shard": shard, "status": status,
        "reason": reason, "duplicate_of": "00000000000000" if status == "duplicate_url" else None,
        "http_status": http_status, **columns,
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
    with pytest.raises(QueryError, match="no metadata or status parquet files"):
        run_query("overview", tmp_path / "empty")


def test_a_table_without_files_reads_as_empty(tmp_path: Path) -> None:
    """A build that has written no sample yet has status but no metadata; a subset has metadata but
    no status: every query still runs, over an empty view of the missing table."""
    rejected = tmp_path / "rejected"
    _write(rejected / "status" / "00000.parquet", [_status(0, "no_face"), _status(1, "timeout")], STATUS_SCHEMA)
    subset = tmp_path / "subset"
    _write(subset / "metadata" / "00000.parquet", [_meta("00000000000000", "00000", "a", [])], METADATA_SCHEMA)
    for out in (rejected, subset):
        for name in list_queries():
            run_query(name, out)
    assert dict((r[0], r[1]) for r in _run("overview", rejected)) == {"no_face": 1, "timeout": 1}
    assert _run("shard_counts", subset)[0][:2] == ("00000", 1)


# --- removals, hosts and the training selection: exact numbers --------------------------------


def _good_face(side: float, score: float) -> dict[str, Any]:
    return _face([10.0, 20.0, 10.0 + side, 20.0 + 2 * side], score)  # shorter side: width


@pytest.fixture
def removal_output(tmp_path: Path) -> Path:
    """Written samples for the training selection; exact, near and benchmark removals.

    Metadata and status each have one file with the optional columns and one without (an
    older build), and there are two input files, the second numbered 3.
    """
    out = tmp_path / "out"
    (out / "inputs.json").parent.mkdir(parents=True)
    (out / "inputs.json").write_text(json.dumps({"shard_size": 10, "files": [
        {"index": 0, "path": "part-0.parquet", "rows": 20, "first_unit": 0},
        {"index": 3, "path": "part-1.parquet", "rows": 5, "first_unit": 2},
    ]}))
    k = [f"{i:014d}" for i in range(7)]
    _write(out / "metadata" / "00000.parquet", [
        {**_meta(k[0], "00000", "one", [_good_face(100, 0.96875)]), "phash": "0123456789abcdef"},
        # one face passes; the small and the unsure one do not count
        {**_meta(k[1], "00000", "one+small", [
            _face([0, 0, 10, 10], 0.9921875), _good_face(96, 0.95), _good_face(200, 0.9375)]), "phash": None},
        {**_meta(k[2], "00000", "two", [_good_face(100, 0.96875), _good_face(300, 0.96875)]), "phash": None},
        {**_meta(k[3], "00000", "unsure", [_good_face(100, 0.9375)]), "phash": None},
        {**_meta(k[4], "00000", "small", [_good_face(95.5, 0.96875)]), "phash": None},
        {**_meta(k[5], "00000", "none", []), "phash": None},
    ], METADATA_SCHEMA)
    _write(out / "metadata" / "00002.parquet", [
        _meta(k[6], "00002", "old", [_good_face(300, 0.9921875)]),
    ], OLD_METADATA_SCHEMA)

    def overlap(row: int, path: str, overlap_set: str, distance: int) -> dict[str, Any]:
        return _status(row, "benchmark_overlap", "overlap", duplicate_of=path, overlap_set=overlap_set,
                       distance=distance)

    _write(out / "status" / "00000.parquet", [
        *[_status(i, "ok", shard="00000") for i in range(6)],
        _status(7, "duplicate_image", "same bytes", duplicate_of=k[0]),
        _status(8, "near_duplicate", "near", duplicate_of=k[0], distance=3),
        _status(9, "near_duplicate", "near", duplicate_of=k[6], distance=5),
        _status(16, "near_duplicate", "near", duplicate_of=k[6], distance=1),
        overlap(10, "celeba/3.jpg", "celebamask_hq", 2),
        overlap(11, "celeba/1.jpg", "celebamask_hq", 0),
        overlap(12, "celeba/1.jpg", "celebamask_hq", 4),
        overlap(13, "celeba/2.jpg", "celebamask_hq", 1),
        overlap(14, "celeba/0.jpg", "celebamask_hq", 0),
        overlap(15, "lfw/Aaron_Eckhart_0001.jpg", "lfw", 6),
    ], STATUS_SCHEMA)
    _write(out / "status" / "00002.parquet", [
        {**_status(1, "duplicate_image", "same bytes", duplicate_of=k[6]), "input_file": "part-1.parquet",
         "unit": 2},
    ], OLD_STATUS_SCHEMA)
    return out


def test_optional_columns_fill_in_per_file(removal_output: Path) -> None:
    con = connect(removal_output)
    try:
        types = {table: dict(con.sql(f"SELECT column_name, column_type FROM (DESCRIBE {table})").fetchall())
                 for table in ("metadata", "status")}
        phash = dict(con.sql("SELECT key, phash FROM metadata").fetchall())
        overlaps = con.sql("SELECT count(*) FROM status WHERE overlap_set IS NOT NULL").fetchall()
    finally:
        con.close()
    assert types["metadata"]["phash"] == "VARCHAR"
    assert types["status"]["distance"] == "INTEGER" and types["status"]["overlap_set"] == "VARCHAR"
    assert phash["00000000000000"] == "0123456789abcdef" and phash["00000000000006"] is None
    assert overlaps == [(6,)]


def test_optional_columns_missing_everywhere(tmp_path: Path) -> None:
    """An output older than every optional column: they read as NULL and every query runs."""
    out = tmp_path / "old"
    _write(out / "metadata" / "00000.parquet",
           [_meta("00000000000000", "00000", "a", [_good_face(100, 0.96875)])], OLD_METADATA_SCHEMA)
    _write(out / "status" / "00000.parquet", [
        _status(0, "ok", shard="00000"),
        _status(1, "duplicate_image", "same bytes", duplicate_of="00000000000000"),
    ], OLD_STATUS_SCHEMA)
    assert pq.read_schema(out / "status" / "00000.parquet").get_field_index("distance") == -1
    con = connect(out)
    try:
        assert con.sql("SELECT DISTINCT phash FROM metadata").fetchall() == [(None,)]
        assert con.sql("SELECT DISTINCT distance, overlap_set FROM status").fetchall() == [(None, None)]
        assert con.sql("SELECT count(*) FROM inputs").fetchall() == [(0,)]  # no OUT/inputs.json
    finally:
        con.close()
    for name in list_queries():
        run_query(name, out)
    # Without inputs.json the removed row's key is unknown; its distance is still 0.
    assert _run("duplicate_clusters", out) == [("00000000000000", [None], [0], 1)]
    assert _run("benchmark_overlaps", out) == []
    assert query_keys("select_training_subset", out) == ["00000000000000"]


def test_duplicate_clusters(removal_output: Path) -> None:
    result = run_query("duplicate_clusters", removal_output)
    assert result.columns == ["kept_key", "removed_keys", "distances", "removed"]
    assert result.rows == [
        # removed keys come from inputs.json: file 3, row 1 is 00003000000001
        ("00000000000006", ["00000000000009", "00000000000016", "00003000000001"], [5, 1, 0], 3),
        ("00000000000000", ["00000000000007", "00000000000008"], [0, 3], 2),
    ]


def test_benchmark_overlaps(removal_output: Path) -> None:
    result = run_query("benchmark_overlaps", removal_output)
    assert result.columns == ["overlap_set", "rows", "excluded_images", "examples"]
    assert result.rows == [
        ("celebamask_hq", 5, 4, ["celeba/0.jpg", "celeba/1.jpg", "celeba/2.jpg"]),
        ("lfw", 1, 1, ["lfw/Aaron_Eckhart_0001.jpg"]),
    ]


def test_rejects_by_host(tmp_path: Path) -> None:
    out = tmp_path / "hosts"
    _write(out / "metadata" / "00000.parquet", [], METADATA_SCHEMA)
    urls = [
        ("ok", "http://a.com/1"), ("no_face", "http://A.com:8080/2"), ("no_face", "https://u:pw@a.com/3"),
        ("http_error", "http://a.com/4"), ("no_face", "http://[2001:db8::1]:81/x"), ("invalid_url", None),
        ("invalid_url", "ftp://b.org/x"), ("invalid_url", "not a url"), ("timeout", "http://b.org?x=1"),
    ]
    _write(out / "status" / "00000.parquet",
           [_status(i, status, url=url) for i, (status, url) in enumerate(urls)], STATUS_SCHEMA)
    result = run_query("rejects_by_host", out)
    assert result.columns == ["host", "status", "rows", "pct_of_input"]
    assert result.rows == [
        ("a.com", "no_face", 2, 22.22), (None, "invalid_url", 2, 22.22),
        ("[2001:db8::1]", "no_face", 1, 11.11), ("a.com", "http_error", 1, 11.11),
        ("b.org", "invalid_url", 1, 11.11), ("b.org", "timeout", 1, 11.11),
    ]


def test_select_training_subset(removal_output: Path) -> None:
    result = run_query("select_training_subset", removal_output)
    assert result.columns == ["key", "shard", "face"]
    assert [(key, shard) for key, shard, _ in result.rows] == [
        ("00000000000000", "00000"), ("00000000000001", "00000"), ("00000000000006", "00002"),
    ]
    face = result.rows[1][2]  # the one face that passes, not the small or the unsure one
    assert face["box"] == [10.0, 20.0, 106.0, 212.0] and face["score"] == pytest.approx(0.95)
    assert query_keys("select_training_subset", removal_output) == [key for key, _, _ in result.rows]


def test_query_keys_needs_a_key_column(removal_output: Path) -> None:
    with pytest.raises(QueryError, match="query 'overview' selects no key column"):
        query_keys("overview", removal_output)
    with pytest.raises(QueryError, match="unknown query"):
        query_keys("nope", removal_output)


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
        f"error: no metadata or status parquet files in {tmp_path} (is it a build output?)",
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


def test_built_output_removals_and_hosts(built_output: Path) -> None:
    status = _read(built_output, "status").to_pylist()
    written = set(_read(built_output, "metadata")["key"].to_pylist())
    index = {e["path"]: e["index"] for e in json.loads((built_output / "inputs.json").read_text())["files"]}
    winner = {f"{index[r['input_file']]:05d}{r['input_row']:09d}": r["duplicate_of"]
              for r in status if r["status"] in ("duplicate_image", "near_duplicate", "benchmark_overlap")}
    removed = {f"{index[r['input_file']]:05d}{r['input_row']:09d}" for r in status
               if r["status"] in ("duplicate_image", "near_duplicate")}

    def survivor(key: str) -> str:  # duplicate_of, followed while that image was removed too
        while winner.get(key) is not None:
            key = winner[key]
        return key

    clusters = _run("duplicate_clusters", built_output)
    assert {k: kept for kept, keys, _, _ in clusters for k in keys} == {k: survivor(k) for k in removed}
    assert all(kept in written or "/" in kept for kept, _, _, _ in clusters)  # a kept key, or an excluded image
    assert any(winner[k] in winner for k in removed), "the demo has a chain (a winner removed later)"
    assert all(n == len(keys) == len(distances) for _, keys, distances, n in clusters)
    assert not set(removed) & written, "a removed key is not in the shards"
    overlaps = _run("benchmark_overlaps", built_output)
    assert sum(n for _, n, _, _ in overlaps) == sum(r["status"] == "benchmark_overlap" for r in status)
    hosts = _run("rejects_by_host", built_output)
    assert sum(n for _, _, n, _ in hosts) == sum(r["status"] != "ok" for r in status)
    assert {s for _, s, _, _ in hosts} == {r["status"] for r in status} - {"ok"}


def test_built_output_cli_runs_every_query(built_output: Path) -> None:
    for name in list_queries():
        proc = _cli(name, "--data", str(built_output))
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        assert re.fullmatch(r"\(\d+ rows?\)", proc.stdout.splitlines()[-1]), proc.stdout
