"""The write stage (pipeline.write) and the output directory (pipeline.storage): committed shards read back
with webdataset, metadata and status tables, --retry-failed commits, orphans and temporary files."""

from __future__ import annotations

import io
import json
import os
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
import webdataset as wds
from PIL import Image

from pipeline.schema import METADATA_SCHEMA, STATUS_SCHEMA, Face, Sample, make_key
from pipeline.storage import TMP_MARK, Output
from pipeline.write import commit_unit, referenced_shards, remove_orphans, write_tar


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Three distinct real JPEGs."""
    out = []
    for image in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


@pytest.fixture
def output(tmp_path: Path) -> Output:
    out = Output(str(tmp_path / "out"))
    out.make_dirs()
    return out


def row(input_row: int, unit: int = 0, content: bytes | None = None, status: str | None = None) -> Sample:
    """Input row `input_row` of file 0: pending with `content`, or decided with `status`."""
    sample = Sample(key=make_key(0, input_row), unit=unit, input_file="in.parquet", input_row=input_row,
                    url=f"https://img.example.com/{input_row}.jpg", caption=f"caption {input_row}",
                    sample_id=1000 + input_row, license="?", nsfw="UNLIKELY", similarity=0.31)
    if status is not None:
        sample.fail(status, f"{status} for the test")
        return sample
    sample.content = content
    with Image.open(io.BytesIO(content)) as image:
        sample.width, sample.height = image.size
    sample.original_width, sample.original_height = sample.width * 2, sample.height * 2
    sample.sha256 = f"{input_row:064x}"
    sample.faces = [Face(box=[1.0, 2.0, 50.5, 60.25], landmarks=[[float(i), float(i + 1)] for i in range(5)],
                         score=0.97)]
    return sample


def read_shard(path: str) -> list[dict]:
    return list(wds.WebDataset(path, shardshuffle=False))


def read_status(output: Output, unit: int) -> pa.Table:
    return pq.read_table(output.status_path(unit))


@pytest.fixture
def committed(output: Output, photos: list[bytes]) -> tuple[list[Sample], dict[str, int]]:
    """Unit 0, shard '00000': rows 0-5, three written (given out of key order), three failed."""
    samples = [row(4, content=photos[2]), row(0, content=photos[0]), row(1, status="timeout"),
               row(2, content=photos[1]), row(3, status="no_face"), row(5, status="timeout")]
    counts = commit_unit(output, 0, "00000", samples)
    return samples, counts


# --- a first commit -----------------------------------------------------------------------------

def test_commit_returns_status_counts(committed) -> None:
    _, counts = committed
    assert counts == {"ok": 3, "timeout": 2, "no_face": 1}


def test_shard_is_a_webdataset_with_jpg_txt_json(output: Output, committed, photos: list[bytes]) -> None:
    items = read_shard(output.shard_path("00000"))
    assert [item["__key__"] for item in items] == [make_key(0, 0), make_key(0, 2), make_key(0, 4)]
    assert [item["jpg"] for item in items] == [photos[0], photos[1], photos[2]]
    assert [item["txt"].decode() for item in items] == ["caption 0", "caption 2", "caption 4"]
    meta = json.loads(items[1]["json"])
    assert meta["key"] == make_key(0, 2) and meta["sample_id"] == 1002 and "shard" not in meta
    assert meta["num_faces"] == 1 and meta["faces"][0]["box"] == [1.0, 2.0, 50.5, 60.25]
    assert (meta["width"], meta["height"]) == (600, 400) and meta["original_width"] == 1200


def test_metadata_matches_schema_and_shard(output: Output, committed) -> None:
    table = pq.read_table(output.metadata_path("00000"))
    assert table.schema.equals(METADATA_SCHEMA)
    keys = [item["__key__"] for item in read_shard(output.shard_path("00000"))]
    assert table["key"].to_pylist() == keys
    assert set(table["shard"].to_pylist()) == {"00000"}
    first = table.to_pylist()[0]
    assert first["url"] == "https://img.example.com/0.jpg" and first["caption"] == "caption 0"
    assert (first["width"], first["height"], first["original_width"]) == (512, 512, 1024)
    assert first["sha256"] == f"{0:064x}" and first["num_faces"] == 1
    assert first["faces"][0]["landmarks"][4] == [4.0, 5.0]
    assert first["faces"][0]["score"] == pytest.approx(0.97)
    assert first["similarity"] == pytest.approx(0.31)


def test_status_has_one_row_per_sample_and_key_only_when_written(output: Output, committed) -> None:
    table = read_status(output, 0)
    assert table.schema.equals(STATUS_SCHEMA)
    rows = {r["input_row"]: r for r in table.to_pylist()}
    assert sorted(rows) == [0, 1, 2, 3, 4, 5] and table.num_rows == 6
    for input_row, r in rows.items():
        if input_row in (0, 2, 4):
            assert (r["status"], r["key"], r["shard"], r["reason"]) == ("ok", make_key(0, input_row), "00000", None)
        else:
            assert r["key"] is None and r["shard"] is None and r["status"] != "ok"
        assert r["url"] == f"https://img.example.com/{input_row}.jpg" and r["unit"] == 0
    assert rows[1]["status"] == "timeout" and rows[3]["status"] == "no_face"


def test_unit_without_written_samples_writes_only_its_status(output: Output) -> None:
    counts = commit_unit(output, 7, "00007", [row(0, unit=7, status="no_face"), row(1, unit=7, status="invalid_url")])
    assert counts == {"no_face": 1, "invalid_url": 1}
    assert output.list("shards", ".tar") == [] and output.list("metadata", ".parquet") == []
    assert read_status(output, 7).num_rows == 2


# --- a --retry-failed commit --------------------------------------------------------------------

def test_retry_commit_replaces_only_the_redone_rows(output: Output, committed, photos: list[bytes]) -> None:
    previous = output.read_table(output.status_path(0))
    redone = [row(1, content=photos[1]), row(5, status="server_error")]
    counts = commit_unit(output, 0, "00000_1", redone, previous)
    assert counts == {"ok": 1, "server_error": 1}
    table = read_status(output, 0)
    assert table["input_row"].to_pylist() == [0, 1, 2, 3, 4, 5]  # every input row exactly once
    by_row = {r["input_row"]: r for r in table.to_pylist()}
    assert (by_row[1]["status"], by_row[1]["shard"], by_row[1]["key"]) == ("ok", "00000_1", make_key(0, 1))
    assert by_row[5]["status"] == "server_error" and by_row[5]["shard"] is None
    assert [(by_row[r]["status"], by_row[r]["shard"]) for r in (0, 2, 3, 4)] == [
        ("ok", "00000"), ("ok", "00000"), ("no_face", None), ("ok", "00000")]
    assert [item["__key__"] for item in read_shard(output.shard_path("00000_1"))] == [make_key(0, 1)]
    assert len(read_shard(output.shard_path("00000"))) == 3  # the first shard is untouched
    assert referenced_shards(output) == {"00000", "00000_1"}


# --- orphans ------------------------------------------------------------------------------------

def test_remove_orphans_deletes_only_unreferenced_shards(output: Output, committed, photos: list[bytes]) -> None:
    orphan = [row(10, unit=1, content=photos[0])]  # a killed run wrote unit 1's shard but not its status
    output.write_atomic(output.shard_path("00001"), lambda f: write_tar(f, orphan))
    output.write_table(output.metadata_path("00001"),
                       pa.Table.from_pylist([s.metadata("00001") for s in orphan], schema=METADATA_SCHEMA))
    assert remove_orphans(output) == 2
    assert output.list("shards", ".tar") == ["00000.tar"]
    assert output.list("metadata", ".parquet") == ["00000.parquet"]
    assert remove_orphans(output) == 0


def test_remove_orphans_keeps_retry_shards_once_committed(output: Output, committed, photos: list[bytes]) -> None:
    commit_unit(output, 0, "00000_1", [row(1, content=photos[1])], output.read_table(output.status_path(0)))
    assert remove_orphans(output) == 0
    assert output.list("shards", ".tar") == ["00000.tar", "00000_1.tar"]


# --- storage ------------------------------------------------------------------------------------

def test_write_atomic_leaves_only_the_file(output: Output) -> None:
    target = output.path("shards", "a.bin")
    output.write_atomic(target, lambda f: f.write(b"first"))
    output.write_atomic(target, lambda f: f.write(b"second"))  # overwrites
    assert Path(target).read_bytes() == b"second"
    assert os.listdir(output.path("shards")) == ["a.bin"]


def test_failed_write_keeps_the_old_file_and_temporaries_are_removed(output: Output) -> None:
    target = output.path("shards", "a.bin")
    output.write_atomic(target, lambda f: f.write(b"good"))

    def crash(f) -> None:
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        output.write_atomic(target, crash)
    assert Path(target).read_bytes() == b"good"
    assert sorted(p.name for p in Path(output.path("shards")).iterdir()) == ["a.bin"]  # its temporary went too
    # what a kill -9 leaves: temporaries no listing shows, removed at the next start
    (Path(output.path("shards")) / f"b.bin{TMP_MARK}feedface").write_bytes(b"half")
    (Path(output.path("status")) / f"00003.parquet{TMP_MARK}deadbeef").write_bytes(b"x")
    (Path(output.root) / f"stats.json{TMP_MARK}0badf00d").write_bytes(b"x")
    assert output.list("shards", ".bin") == ["a.bin"]
    assert output.remove_temporaries() == 3
    leftovers = [name for _, _, names in os.walk(output.root) for name in names]
    assert leftovers == ["a.bin"]


def test_json_round_trip_and_missing_json(output: Output) -> None:
    assert output.read_json("inputs.json") is None
    output.write_json("inputs.json", [{"path": "a", "index": 0, "rows": 3}])
    assert output.read_json("inputs.json") == [{"path": "a", "index": 0, "rows": 3}]


def test_table_round_trip(output: Output) -> None:
    table = pa.table({"x": np.arange(5)})
    output.write_table(output.path("metadata", "t.parquet"), table)
    assert output.read_table(output.path("metadata", "t.parquet")).equals(table)
    assert output.read_table(output.path("metadata", "t.parquet"), columns=["x"]).column_names == ["x"]


def test_read_table_lets_go_of_the_file_when_it_returns(output: Output, monkeypatch: pytest.MonkeyPatch) -> None:
    """pq.read_table on a Python file left it referenced by an Arrow thread after returning (in ~1 of 6
    calls here), and so did ParquetFile.read with its default pre-buffering and threads (3 in 50 in CI); a
    process whose last such reference went after shutdown aborted ("terminate called without an active
    exception", seen in CI). Every file read_table opens must be released by then."""
    path = output.path("metadata", "t.parquet")
    output.write_table(path, pa.table({"x": np.arange(1000), "s": [str(i) for i in range(1000)]}))
    opened: list[weakref.ref] = []
    fs_open = output.fs.open

    def tracked_open(*args, **kwargs):
        f = fs_open(*args, **kwargs)
        opened.append(weakref.ref(f))
        return f

    monkeypatch.setattr(output.fs, "open", tracked_open)
    still_referenced = 0
    for _ in range(200):
        assert output.read_table(path).num_rows == 1000
        still_referenced += opened[-1]() is not None
    assert len(opened) == 200 and still_referenced == 0


def test_paths_and_listing(tmp_path: Path) -> None:
    output = Output(str(tmp_path / "out"))
    assert output.list("shards", ".tar") == []  # no folder yet
    output.make_dirs()
    assert output.shard_path("00002_1").endswith("/shards/00002_1.tar")
    assert output.metadata_path("00002").endswith("/metadata/00002.parquet")
    assert output.status_path(2).endswith("/status/00002.parquet")
    for name in ("00002.tar", "00000.tar", "00001.parquet", f"00003.tar{TMP_MARK}1234"):
        Path(output.path("shards", name)).write_bytes(b"")
    assert output.list("shards", ".tar") == ["00000.tar", "00002.tar"]
