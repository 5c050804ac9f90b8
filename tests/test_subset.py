"""pipeline.subset on a real build (fixture `built_output`, tests/conftest.py): a selection,
by query or by a keys file, becomes new shards whose samples are byte for byte the source's."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from outputs import metadata_table, tar_samples

ROOT = Path(__file__).resolve().parents[1]


def _subset(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.subset", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def training_keys(metadata: pa.Table) -> list[str]:
    """select_training_subset, computed with pyarrow: exactly one face with shorter box side
    >= 96 px and score >= 0.95 (float32 arithmetic, as stored)."""
    faces = metadata["faces"].combine_chunks()
    flat = pc.list_flatten(faces)
    box = pc.struct_field(flat, "box")
    side = pc.min_element_wise(pc.subtract(pc.list_element(box, 2), pc.list_element(box, 0)),
                               pc.subtract(pc.list_element(box, 3), pc.list_element(box, 1)))
    good = pc.and_(pc.greater_equal(pc.struct_field(flat, "score"), pa.scalar(0.95, pa.float32())),
                   pc.greater_equal(side, pa.scalar(96, pa.float32())))
    per_sample = Counter(pc.filter(pc.list_parent_indices(faces), good).to_pylist())
    keys = metadata["key"].to_pylist()
    return sorted(keys[i] for i, n in per_sample.items() if n == 1)


def tar_samples_of(shard: Path) -> list[str]:
    """The keys of one tar, in order."""
    return [s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False)]


def check_subset(new: Path, source: Path, selected: list[str], shard_size: int) -> None:
    """NEW holds exactly `selected`, in shards of at most shard_size, consistent with OUT."""
    keys = (new / "keys.txt").read_text().splitlines()
    assert sorted(keys) == selected and len(set(keys)) == len(keys)

    shards = sorted((new / "shards").glob("*.tar"))
    assert [p.name for p in shards] == [f"{i:05d}.tar" for i in range(len(shards))]
    # webdataset reads them, in keys.txt's order, with every member of the sample
    read = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert [s["__key__"] for s in read] == keys
    assert all({"jpg", "txt", "json"} <= set(s) for s in read)

    # byte for byte what the source shards hold, and nothing else
    copied, original = tar_samples(new), tar_samples(source)
    assert sorted(copied) == selected
    assert all(copied[key] == original[key] for key in selected)

    sizes = json.loads((new / "sizes.json").read_text())
    assert json.loads((new / "shards" / "sizes.json").read_text()) == sizes
    assert sizes == {p.name: len(tar_samples_of(p)) for p in shards}
    assert all(0 < n <= shard_size for n in sizes.values()) and sum(sizes.values()) == len(selected)

    # metadata: per shard, the source rows in the tar's order, `shard` updated, schema kept
    source_meta = metadata_table(source)
    by_key = {row["key"]: row for row in source_meta.to_pylist()}
    for shard in shards:
        table = pq.read_table(new / "metadata" / f"{shard.stem}.parquet")
        assert table.schema == source_meta.schema
        rows = table.to_pylist()
        assert [r["key"] for r in rows] == tar_samples_of(shard)
        assert all(r == {**by_key[r["key"]], "shard": shard.stem} for r in rows)
    assert sorted(p.stem for p in (new / "metadata").glob("*.parquet")) == [p.stem for p in shards]
    assert not list(new.rglob("*.tmp-*"))


def test_subset_by_query(built_output: Path, tmp_path: Path) -> None:
    selected = training_keys(metadata_table(built_output))
    assert len(selected) >= 3, "the demo should select a few samples, or this test checks little"
    new = tmp_path / "new"
    proc = _subset("--data", str(built_output), "--query", "select_training_subset",
                   "--output", str(new), "--shard-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(selected)} samples in {-(-len(selected) // 2)} shards" in proc.stdout
    check_subset(new, built_output, selected, shard_size=2)


def test_subset_by_keys_file(built_output: Path, tmp_path: Path) -> None:
    metadata = metadata_table(built_output)
    selected = sorted(metadata["key"].to_pylist())[::2]  # every other sample, from every shard
    keys_file = tmp_path / "keys.txt"
    # order, blank lines, spaces and repeats do not matter
    keys_file.write_text("\n".join(reversed(selected)) + f"\n\n  {selected[0]}  \n")
    new = tmp_path / "empty-dir"
    new.mkdir()  # an existing empty directory is fine
    proc = _subset("--data", str(built_output), "--keys", str(keys_file), "--output", str(new),
                   "--shard-size", "3")
    assert proc.returncode == 0, proc.stderr
    check_subset(new, built_output, selected, shard_size=3)
    sources = {s for k, s in zip(metadata["key"].to_pylist(), metadata["shard"].to_pylist()) if k in selected}
    assert len(sources) > 1, "the selection should span source shards"


@pytest.mark.parametrize("case, message", [
    ("missing_out", "output directory {missing} does not exist"),
    ("unknown_query", "unknown query 'nope'; known: "),
    ("no_key_column", "query 'overview' selects no key column"),
    ("unknown_key", "1 selected key(s) not in {out}, e.g. '99999999999999'"),
    ("missing_keys_file", "cannot read keys file {missing}"),
    ("new_not_empty", "output {taken} already exists and is not empty"),
    ("no_selection", "one of the arguments --query --keys --holdout is required"),
    ("bad_shard_size", "--shard-size must be at least 1"),
    ("empty_selection", "the selection is empty"),
])
def test_bad_input_is_one_line_and_exit_2(built_output: Path, tmp_path: Path, case: str, message: str) -> None:
    missing, new, taken = tmp_path / "missing", tmp_path / "new", tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{metadata_table(built_output)['key'][0]}\n99999999999999\n")
    out, query = str(built_output), ["--query", "select_training_subset"]
    argv = {
        "missing_out": ["--data", str(missing), *query, "--output", str(new)],
        "unknown_query": ["--data", out, "--query", "nope", "--output", str(new)],
        "no_key_column": ["--data", out, "--query", "overview", "--output", str(new)],
        "unknown_key": ["--data", out, "--keys", str(keys_file), "--output", str(new)],
        "missing_keys_file": ["--data", out, "--keys", str(missing), "--output", str(new)],
        "new_not_empty": ["--data", out, *query, "--output", str(taken)],
        "no_selection": ["--data", out, "--output", str(new)],
        "bad_shard_size": ["--data", out, *query, "--output", str(new), "--shard-size", "0"],
        "empty_selection": ["--data", out, "--keys", str(tmp_path / "no-keys.txt"), "--output", str(new)],
    }[case]
    (tmp_path / "no-keys.txt").write_text("\n")
    proc = _subset(*argv)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    expected = message.format(missing=missing, out=out, taken=taken)
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert not new.exists(), "nothing written on bad input"
    assert [p.name for p in taken.iterdir()] == ["x"]


def test_a_failure_part_way_leaves_the_new_output_empty(built_output: Path, tmp_path: Path) -> None:
    """A source shard that lacks a sample its metadata lists (a corrupt OUT) stops the copy after
    earlier shards were written: they are removed, so a rerun into the same NEW is accepted."""
    source = tmp_path / "out"
    for sub in ("shards", "metadata", "status"):
        (source / sub).mkdir(parents=True)
        for path in (built_output / sub).glob("*"):
            (source / sub / path.name).write_bytes(path.read_bytes())
    (source / "inputs.json").write_bytes((built_output / "inputs.json").read_bytes())
    metadata = metadata_table(source)
    last_shard = max(metadata["shard"].to_pylist())
    (source / "shards" / f"{last_shard}.tar").write_bytes(b"")  # every sample of the last shard is gone
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("\n".join(metadata["key"].to_pylist()) + "\n")
    new = tmp_path / "new"
    proc = _subset("--data", str(source), "--keys", str(keys_file), "--output", str(new), "--shard-size", "2")
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"{last_shard}.tar cannot be read as a tar" in proc.stderr
    assert new.is_dir() and list(new.iterdir()) == []  # earlier shards and temporaries are gone
