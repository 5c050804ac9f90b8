"""pipeline.dedupe's removals on a real output (commit_unit's shards, metadata and status files): the
removal plan a killed run leaves is finished before anything is decided again, and the shards of
one unit (its --retry-failed shards) are rewritten by one task, which alone rewrites its status."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import skimage.data
from PIL import Image

from outputs import metadata_table, status_table, tar_samples
from pipeline import dedupe
from pipeline.build import remove_duplicates
from pipeline.build_config import BuildConfig
from pipeline.decode import TURNS
from pipeline.near_dedupe import near_duplicate_removals
from pipeline.schema import Face, Sample, make_key
from pipeline.storage import Output
from pipeline.write import commit_unit


class Killed(Exception):
    """Stands in for a kill -9 part-way through applying removals."""


def photo(seed: int) -> bytes:
    """A distinct real JPEG per seed (a crop of the astronaut)."""
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()[seed:seed + 300, seed:seed + 300]).save(buffer, format="JPEG")
    return buffer.getvalue()


def written(input_row: int, unit: int, phash: int, side: int, sha256: str | None = None) -> Sample:
    sample = Sample(key=make_key(0, input_row), unit=unit, input_file="in.parquet", input_row=input_row,
                    url=f"https://img.example.com/{input_row}.jpg", caption=f"caption {input_row}")
    sample.content = photo(input_row)
    sample.width = sample.height = 300
    sample.original_width = sample.original_height = side  # the larger image is the one kept
    sample.sha256 = sha256 or f"{input_row:064x}"
    sample.phash = f"{phash:016x}"
    sample.phash_crops, sample.phash_inner = [sample.phash] * 15, [sample.phash] * len(TURNS)
    sample.faces = [Face(box=[1.0, 2.0, 50.0, 60.0], landmarks=[[1.0, 1.0]] * 5, score=0.99)]
    return sample


def statuses(out: Path) -> dict[str, str]:
    table = status_table(out)
    return dict(zip(table["input_row"].to_pylist(), table["status"].to_pylist()))


def a_tar(members: dict[str, bytes], format: int = tarfile.USTAR_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_tar_members_are_where_tarfile_finds_them_and_anything_else_is_refused() -> None:
    long_name = "d" * 120 + "/0000000001.jpg"  # USTAR keeps the part before the last "/" in its prefix field
    data = a_tar({"0000000001.jpg": photo(1), "0000000001.txt": b"", long_name: b"x" * 513, "0000000002.json": b"{}"})
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, m.offset, m.offset_data + dedupe._padded(m.size)) for m in tar]
    assert dedupe.tar_members(data, "s.tar") == expected
    assert expected[2][0] == long_name
    corrupt = bytearray(data)
    corrupt[expected[1][1] + 5] ^= 1  # one bit of the second member's name: its checksum no longer matches
    with pytest.raises(ValueError, match="s.tar: member 1 is not"):
        dedupe.tar_members(bytes(corrupt), "s.tar")
    corrupt = bytearray(data)
    corrupt[expected[2][1] + 124] = ord("9")  # not an octal digit: the third member's size is garbage
    with pytest.raises(ValueError, match="s.tar: member 2 is not"):
        dedupe.tar_members(bytes(corrupt), "s.tar")
    with pytest.raises(ValueError, match="member 0"):  # cut inside the first member's data
        dedupe.tar_members(data[:expected[0][1] + 1024], "s.tar")
    with pytest.raises(ValueError, match="member 0"):  # a pax header first: not what write_tar makes
        dedupe.tar_members(a_tar({"\u00e9.jpg": b"x"}, tarfile.PAX_FORMAT), "s.tar")


def test_a_removal_plan_a_kill_left_is_finished_before_deciding_again(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A ~ B ~ C, but A and C 12 bits apart: B and C both lose (B to A, C to B). Killed after
    B's unit was rewritten, a rerun that decided afresh would see A and C only, and keep C."""
    output = Output(str(tmp_path / "out"))
    output.make_dirs()
    for unit, (phash, side) in enumerate([(0, 3000), (0b111111, 2000), (0b111111111111, 1000)]):
        commit_unit(output, unit, f"{unit:05d}", [written(unit, unit, phash, side)])
    rewrite_unit, units_done = dedupe._rewrite_unit, []

    def killed_after_the_first_unit(out: Output, removed: pa.Table) -> pa.Table:
        if units_done:
            raise Killed
        units_done.append(removed["unit"][0].as_py())
        return rewrite_unit(out, removed)

    monkeypatch.setattr(dedupe, "_rewrite_unit", killed_after_the_first_unit)
    with pytest.raises(Killed):
        dedupe.remove_from_shards(output, near_duplicate_removals(output, 6, [], dedupe_within=True), 3)
    assert statuses(tmp_path / "out") == {0: "ok", 1: "near_duplicate", 2: "ok"}  # B went, C not yet
    monkeypatch.setattr(dedupe, "_rewrite_unit", rewrite_unit)

    assert dedupe.apply_removal_plan(output, 3) == 2  # what the rerun does first (pipeline.build.build)
    assert dedupe.count(near_duplicate_removals(output, 6, [], dedupe_within=True)) == 0
    assert statuses(tmp_path / "out") == {0: "ok", 1: "near_duplicate", 2: "near_duplicate"}
    assert metadata_table(tmp_path / "out")["key"].to_pylist() == [make_key(0, 0)] == sorted(tar_samples(tmp_path / "out"))
    assert not output.fs.exists(output.path(dedupe.REMOVALS))


@pytest.mark.parametrize("distributed", [False, True], ids=["table", "ray-dataset"])
def test_exact_and_near_removals_rewrite_each_shard_once(tmp_path: Path, distributed: bool,
                                                         request: pytest.FixtureRequest,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit 1 holds an exact copy of unit 0's image and a near-copy of it: both go in one rewrite of
    shard 00001 (counted in the driver's run), and the exact copy is a duplicate_image (the exact
    dedupe says why first), on Ray as in the driver."""
    if distributed:
        request.getfixturevalue("ray_address")
        monkeypatch.setattr(dedupe, "LOCAL_ROWS", 0)
    output = Output(str(tmp_path / "out"))
    output.make_dirs()
    commit_unit(output, 0, "00000", [written(0, 0, 0, 1000, sha256="a" * 64)])
    commit_unit(output, 1, "00001", [written(1, 1, 0, 1000, sha256="a" * 64), written(2, 1, 0b11, 500),
                                     written(3, 1, 0b1111111111111, 500)])
    rewrites: list[str] = []
    rewrite_shard = dedupe._rewrite_shard
    monkeypatch.setattr(dedupe, "_rewrite_shard", lambda out, shard, keys: (rewrites.append(shard),
                                                                            rewrite_shard(out, shard, keys)))
    assert remove_duplicates(output, BuildConfig(), {}) == (1, 1)
    assert rewrites == ([] if distributed else ["00001"])  # on Ray the rewrites run in workers, unpatched
    status = status_table(tmp_path / "out")
    assert dict(zip(status["input_row"].to_pylist(), zip(status["status"].to_pylist(), status["duplicate_of"].to_pylist()))) == {
        0: ("ok", None), 1: ("duplicate_image", make_key(0, 0)), 2: ("near_duplicate", make_key(0, 0)), 3: ("ok", None)}
    assert sorted(tar_samples(tmp_path / "out")) == [make_key(0, 0), make_key(0, 3)]


def test_an_incomplete_plan_is_dropped_unapplied(tmp_path: Path) -> None:
    output = Output(str(tmp_path / "out"))
    output.make_dirs()
    commit_unit(output, 0, "00000", [written(0, 0, 0, 1000)])
    output.fs.makedirs(output.path(dedupe.REMOVALS))
    pq.write_table(pa.table({"key": [make_key(0, 0)], "shard": ["00000"]}), output.path(dedupe.REMOVALS, "part-0.parquet"))
    assert dedupe.apply_removal_plan(output, 1) == 0  # no _COMPLETE: killed while the plan was written
    assert statuses(tmp_path / "out") == {0: "ok"} and not output.fs.exists(output.path(dedupe.REMOVALS))


def test_a_unit_and_its_retry_shard_are_rewritten_together(tmp_path: Path) -> None:
    """Unit 1 has shard 00001 and, from a --retry-failed pass, 00001_1; both hold a copy of unit 0's image."""
    output = Output(str(tmp_path / "out"))
    output.make_dirs()
    commit_unit(output, 0, "00000", [written(0, 0, 0, 1000, sha256="a" * 64)])
    first = [written(1, 1, 1, 1000, sha256="a" * 64), written(2, 1, 2, 1000)]
    retried = written(3, 1, 3, 1000, sha256="a" * 64)
    pending = Sample(key=make_key(0, 3), unit=1, input_file="in.parquet", input_row=3, url="u3", caption=None)
    pending.fail("timeout", "for the test")
    commit_unit(output, 1, "00001", [*first, pending])
    commit_unit(output, 1, "00001_1", [retried], previous_status=output.read_table(output.status_path(1)))
    assert statuses(tmp_path / "out") == {0: "ok", 1: "ok", 2: "ok", 3: "ok"}
    assert dedupe.remove_from_shards(output, dedupe.duplicate_image_removals(output), 2) == 2
    assert statuses(tmp_path / "out") == {0: "ok", 1: "duplicate_image", 2: "ok", 3: "duplicate_image"}
    assert sorted(tar_samples(tmp_path / "out")) == [make_key(0, 0), make_key(0, 2)]
    assert not (tmp_path / "out" / "shards" / "00001_1.tar").exists()  # nothing left in it


@pytest.mark.parametrize("distributed", [False, True], ids=["table", "ray-dataset"])
def test_the_url_plan_tells_each_unit_which_key_its_copies_keep(tmp_path: Path, distributed: bool,
                                                                request: pytest.FixtureRequest) -> None:
    keys = [make_key(0, i) for i in range(6)]
    rows = pa.table({"key": keys, "url": ["a", "b", "a", "c", "b", "a"], "unit": [0, 0, 1, 1, 2, 2], "shard": [""] * 6})
    if distributed:  # the path of inputs over dedupe.LOCAL_ROWS rows: Ray Data writes the plan
        request.getfixturevalue("ray_address")
    candidates = ray.data.from_arrow if distributed else (lambda table: table)
    output = Output(str(tmp_path / "out"))
    output.make_dirs()
    assert dedupe.write_url_plan(output, candidates(rows), partitions=3) == 3
    assert dedupe.read_url_plan(output, 0) == {}
    assert dedupe.read_url_plan(output, 1) == {keys[2]: keys[0]}
    assert dedupe.read_url_plan(output, 2) == {keys[4]: keys[1], keys[5]: keys[0]}
    assert dedupe.write_url_plan(output, candidates(rows.filter(pc.not_equal(rows["unit"], 1))), partitions=3) == 2
    assert dedupe.read_url_plan(output, 1) == {}  # a new plan replaces the old one whole
