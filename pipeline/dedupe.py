"""Exact deduplication, global across the run, input files and reruns into the same output.

One rule, one mechanism: among rows sharing a value (the URL, or the sha256 of the stored
image) the smallest key is kept, decided by a Ray Data groupby over the whole dataset, so
the choice depends neither on block order nor on the number of workers.

- URLs are deduplicated *before* downloading: a planning pass over every input row that
  survives the metadata filters, plus every sample already written to OUT, writes the
  losers to OUT/plan/url_duplicates/unit=U/, which the source stage of unit U reads.
- Image bytes can only be compared after downloading: once every unit is committed, the
  losers are removed from their shards (rewritten atomically) and marked `duplicate_image`.

Up to LOCAL_ROWS rows, the same functions run on one pyarrow table in the driver instead: a
Ray Data shuffle costs seconds to start, more than the whole job on a small build. `Rows`
(a Dataset or a Table) and the helpers below keep that a single code path.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.schema import STATUS_SCHEMA
from pipeline.storage import Output

LOCAL_ROWS = 100_000
Rows = ray.data.Dataset | pa.Table
TableFn = Callable[[pa.Table], pa.Table]


def map_tables(rows: Rows, fn: TableFn) -> Rows:
    return fn(rows) if isinstance(rows, pa.Table) else rows.map_batches(fn, batch_format="pyarrow")


def unit_partitions(shards: int) -> int:
    """A shuffle's partitions for a build of `shards` shards: about one per work unit, as Ray's
    default of 200 costs seconds of set-up on a laptop-sized build, and at most 200."""
    return max(1, min(shards, 200))


def by_group(rows: Rows, column: str, fn: TableFn, partitions: int) -> Rows:
    """fn over each group of rows sharing `column`: a Ray Data groupby in `partitions` shuffle
    partitions, or the same in this process."""
    if not isinstance(rows, pa.Table):
        return rows.groupby(column, num_partitions=max(1, partitions)).map_groups(fn, batch_format="pyarrow")
    if not rows.num_rows:
        return fn(rows)
    order = pc.sort_indices(rows[column])  # stable: a group keeps its rows' order
    values = rows[column].take(order)
    bounds = [0, *(np.flatnonzero(pc.not_equal(values[1:], values[:-1])) + 1), rows.num_rows]
    # a group's rows are taken when it comes, not a sorted copy of them all first: a near dedupe's
    # band rows are ~40 bytes a row, 16 x an image's hashes
    return pa.concat_tables([fn(rows.take(order[a:b])) for a, b in zip(bounds, bounds[1:])])


def materialize(rows: Rows) -> Rows:
    return rows if isinstance(rows, pa.Table) else rows.materialize()


def count(rows: Rows) -> int:
    return rows.num_rows if isinstance(rows, pa.Table) else rows.count()


LOSERS_SCHEMA = pa.schema([("key", pa.string()), ("duplicate_of", pa.string()), ("unit", pa.int64()),
                           ("shard", pa.string())])


def _losers(table: pa.Table, column: str) -> pa.Table:
    """Of each value of `column`, every row but the one with the smallest key; the same key seen
    twice counts once. Vectorised over many values at once: a call per value costs more than the
    work at millions of values."""
    if table.num_rows == 0:
        return LOSERS_SCHEMA.empty_table()
    table = table.sort_by([(column, "ascending"), ("key", "ascending")])
    values = table[column].to_numpy(zero_copy_only=False)
    keys = table["key"].to_numpy(zero_copy_only=False)
    same_value = np.r_[False, values[1:] == values[:-1]]
    same_key = same_value & np.r_[False, keys[1:] == keys[:-1]]
    index = np.arange(len(values))
    run_start = np.maximum.accumulate(np.where(same_value, 0, index))  # each row's first row of its value
    lose = np.flatnonzero(same_value & ~same_key)
    rows = table.take(lose)
    return pa.table({"key": rows["key"], "duplicate_of": pa.array(keys[run_start[lose]], pa.string()),
                     "unit": rows["unit"].cast(pa.int64()), "shard": rows["shard"]}, schema=LOSERS_SCHEMA)


def find_duplicates(rows: Rows, column: str, partitions: int) -> Rows:
    """Rows (key, duplicate_of, unit, shard) whose `column` value a smaller key also has. Grouped by
    a hash of the value into a few parts per shuffle partition, each part's values at once."""
    parts = 4 * unit_partitions(partitions)

    def with_part(table: pa.Table) -> pa.Table:  # pandas' siphash: the same in every process
        hashes = pd.util.hash_array(table[column].to_numpy(zero_copy_only=False))
        return table.append_column("part", pa.array((hashes % parts).astype(np.int64)))

    return by_group(map_tables(rows, with_part), "part", lambda t: _losers(t.drop_columns(["part"]), column),
                    unit_partitions(partitions))


def url_duplicates_dir(output: Output) -> str:
    return output.path("plan", "url_duplicates")


def write_url_plan(output: Output, candidates: Rows, partitions: int) -> int:
    """Plan URL dedupe from rows {key, url, unit, shard}; returns how many rows lose."""
    folder = url_duplicates_dir(output)
    if output.fs.exists(folder):
        output.fs.rm(folder, recursive=True)
    losers = materialize(find_duplicates(candidates, "url", partitions))
    if isinstance(losers, pa.Table) and losers.num_rows:
        # per unit through write_table, not pq.write_to_dataset: on s3:// or gs:// that gives Arrow threads Python files
        losers = losers.sort_by("unit")
        units, starts = np.unique(losers["unit"].to_numpy(), return_index=True)
        for unit, start, stop in zip(units, starts, [*starts[1:], losers.num_rows]):
            part = losers.slice(start, stop - start).drop_columns(["shard", "unit"])
            output.makedirs(f"{folder}/unit={unit}")
            output.write_table(f"{folder}/unit={unit}/part-0.parquet", part)
    elif count(losers):
        losers.drop_columns(["shard"]).write_parquet(output.url.rstrip("/") + "/plan/url_duplicates",
                                                     partition_cols=["unit"])
    return count(losers)


def read_url_plan(output: Output, unit: int) -> dict[str, str]:
    """key -> kept key for the URL duplicates among unit's rows."""
    folder = f"{url_duplicates_dir(output)}/unit={unit}"
    if not output.fs.exists(folder):
        return {}
    tables = [output.read_table(path) for path in output.fs.ls(folder, detail=False) if path.endswith(".parquet")]
    table = pa.concat_tables(t.select(["key", "duplicate_of"]) for t in tables)
    return dict(zip(table["key"].to_pylist(), table["duplicate_of"].to_pylist()))


REMOVED_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("status", pa.string()),
                            ("reason", pa.string()), ("duplicate_of", pa.string()), ("distance", pa.int32()),
                            ("overlap_set", pa.string())])


REMOVALS = "plan/removals"  # the removals decided by a dedupe, written whole before any is applied
REMOVALS_COMPLETE = f"{REMOVALS}/_COMPLETE"


def _rewrite_unit(output: Output, removed: pa.Table) -> pa.Table:
    """Drop rows (REMOVED_SCHEMA plus unit) from one unit: its status file once, then each of its
    shards' tar and metadata (the dedupe's input). One task per unit, as a unit's retry shards
    share its status file. Applying the same rows again changes nothing."""
    unit = removed["unit"][0].as_py()
    changes = {row.pop("key"): row for row in removed.drop_columns(["unit", "shard"]).to_pylist()}
    status = output.read_table(output.status_path(unit)).to_pylist()
    for row in status:
        if row["key"] in changes:
            row.update(changes[row["key"]], key=None, shard=None)
    output.write_table(output.status_path(unit), pa.Table.from_pylist(status, schema=STATUS_SCHEMA))
    for shard in sorted(set(removed["shard"].to_pylist())):
        if output.fs.exists(output.metadata_path(shard)):  # else emptied by an earlier application
            keys = removed.filter(pc.equal(removed["shard"], shard))["key"]
            _rewrite_shard(output, shard, set(keys.to_pylist()))
    return pa.table({"unit": [unit], "removed": [len(changes)]})


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def tar_members(data: bytes, name: str) -> list[tuple[str, int, int]]:
    """(member name, first byte, end) of each member of a USTAR tar, as write.write_tar makes
    every shard. By hand: tarfile parses every field of every header, 31 us a member, which was
    most of a dedupe's rewrite (42,000 members: 0.70 s, this 0.18 s). Raises ValueError on
    anything else, a corrupt header included."""
    members, offset, block = [], 0, tarfile.BLOCKSIZE
    while offset + block <= len(data) and (header := data[offset:offset + block]) != tarfile.NUL * block:
        try:  # octal fields and UTF-8 names: garbage in them raises ValueError too
            checksum = sum(header) - sum(header[148:156]) + 8 * ord(" ")
            end = offset + block + _padded(int(header[124:136].strip(b"\0 ") or b"0", 8))
            whole = header[257:262] == b"ustar" and header[156:157] in (b"0", b"\0") and end <= len(data) and \
                checksum == int(header[148:156].strip(b"\0 ") or b"-1", 8)
            member, prefix = (header[a:b].split(b"\0", 1)[0].decode() for a, b in ((0, 100), (345, 500)))
        except ValueError:
            whole = False
        if not whole:
            raise ValueError(f"{name}: member {len(members)} is not a whole plain USTAR file, or its header is corrupt")
        members.append((f"{prefix}/{member}" if prefix else member, offset, end))
        offset = end
    return members


def _rewrite_shard(output: Output, shard: str, keys: set[str]) -> None:
    with output.fs.open(output.shard_path(shard), "rb") as f:
        data = f.read()

    def rewrite(out) -> None:
        # the kept members' bytes (headers and data) copied as they are
        view, written = memoryview(data), 0
        for member, start, end in tar_members(data, output.shard_path(shard)):
            if member.split(".", 1)[0] not in keys:
                written += out.write(view[start:end])
        end = written + 2 * tarfile.BLOCKSIZE  # two zero blocks, then up to a whole record, as tarfile ends one
        out.write(bytes(end - written + (-end % tarfile.RECORDSIZE)))

    metadata = output.read_table(output.metadata_path(shard))
    metadata = metadata.filter(pc.invert(pc.is_in(metadata["key"], pa.array(sorted(keys), pa.string()))))
    if metadata.num_rows == 0:  # nothing left: the shard goes, as no status row points to it any more
        # the metadata first: a retry skips a shard without it, and the tar left is an orphan
        output.fs.rm(output.metadata_path(shard))
        output.fs.rm(output.shard_path(shard))
    else:
        output.write_atomic(output.shard_path(shard), rewrite)
        output.write_table(output.metadata_path(shard), metadata)


def remove_from_shards(output: Output, removed: Rows, partitions: int) -> int:
    """Apply REMOVED_SCHEMA rows to their units' status files and shards; returns how many.

    The rows are written whole to OUT/plan/removals first. A removal changes what the next
    decision sees (a near-duplicate chain A~B~C loses B and C together, but C alone survives
    once B is gone), so a run killed part-way must not decide again: the next one first finishes
    the plan it finds (apply_removal_plan), then decides anew."""
    if not count(removed):
        return 0
    if output.fs.exists(output.path(REMOVALS)):
        output.fs.rm(output.path(REMOVALS), recursive=True)
    if isinstance(removed, pa.Table):
        output.makedirs(output.path(REMOVALS))
        output.write_table(output.path(REMOVALS, "part-0.parquet"), removed)
    else:
        removed.write_parquet(output.url.rstrip("/") + "/" + REMOVALS)
    output.write_json(REMOVALS_COMPLETE, {})
    return apply_removal_plan(output, partitions)


def apply_removal_plan(output: Output, partitions: int) -> int:
    """Apply the complete removal plan in OUT (this run's, or one a killed run left), then delete
    it; a plan without its _COMPLETE marker was never applied and is deleted. Returns how many."""
    folder = output.path(REMOVALS)
    if not output.fs.exists(folder):
        return 0
    applied = 0
    if output.read_json(REMOVALS_COMPLETE) is not None:
        plan = _read_rows(output, REMOVALS)
        done = by_group(map_tables(plan, with_unit), "unit", lambda group: _rewrite_unit(output, group),
                        unit_partitions(partitions))
        applied = int(pc.sum(done["removed"]).as_py()) if isinstance(done, pa.Table) else int(done.sum("removed") or 0)
    output.fs.rm(folder, recursive=True)
    return applied


def _read_rows(output: Output, folder: str, columns: list[str] | None = None) -> Rows | None:
    """The Parquet files of OUT/folder: a table when their rows are few, else a Dataset; None if none."""
    paths = [output.path(folder, name) for name in output.list(folder, ".parquet")]
    if not paths:
        return None
    rows = 0
    for path in paths:
        with output.fs.open(path, "rb") as f:
            rows += pq.read_metadata(f).num_rows
    if rows <= LOCAL_ROWS:
        return pa.concat_tables(output.read_table(path, columns) for path in paths)
    dataset = ray.data.read_parquet(output.url.rstrip("/") + "/" + folder, file_extensions=["parquet"])
    return dataset.select_columns(columns) if columns else dataset


def written_samples(output: Output, columns: list[str]) -> Rows | None:
    """Columns of every written sample: a table when they are few, else a Dataset."""
    return _read_rows(output, "metadata", columns)


def with_unit(t: pa.Table) -> pa.Table:
    """Adds the unit a shard belongs to (schema.shard_unit, in Arrow: '00003_1' -> 3)."""
    unit = pc.list_element(pc.split_pattern(t["shard"], "_"), 0)  # units past 99,999 have more digits
    return t.append_column("unit", pc.cast(unit, pa.int64()))


def duplicate_image_removals(output: Output) -> Rows | None:
    """REMOVED_SCHEMA rows of the global sha256 dedupe over every written sample (None: nothing written)."""
    written = written_samples(output, ["key", "sha256", "shard"])
    if written is None:
        return None
    losers = find_duplicates(map_tables(written, with_unit), "sha256", len(output.list("metadata", ".parquet")))

    def as_removed(t: pa.Table) -> pa.Table:
        n = t.num_rows
        return pa.table({"key": t["key"], "shard": t["shard"], "status": ["duplicate_image"] * n,
                         "reason": pc.binary_join_element_wise("same image bytes as ", t["duplicate_of"], ""),
                         "duplicate_of": t["duplicate_of"], "distance": pa.nulls(n, pa.int32()),
                         "overlap_set": pa.nulls(n, pa.string())}, schema=REMOVED_SCHEMA)

    return materialize(map_tables(losers, as_removed))


def first_removal_per_key(removals: list[Rows], partitions: int) -> Rows:
    """One REMOVED_SCHEMA row per key: where several dedupes remove a sample, the first in `removals`
    says why (the exact dedupe before the near one), so its shard is rewritten once for both; within
    one (a sample's faces and views caught by the face overlaps), the closest, then the first reason,
    whatever order the rows came in."""
    parts = unit_partitions(partitions)

    def ranked(rank: int) -> TableFn:
        def add(t: pa.Table) -> pa.Table:
            keys = np.array([int(key) for key in t["key"].to_pylist()], dtype=np.int64)  # dataset keys are digits
            return t.append_column("rank", pa.array(np.full(t.num_rows, rank, np.int64))).append_column(
                "part", pa.array(keys % parts))
        return add

    def first_per_key(t: pa.Table) -> pa.Table:
        if t.num_rows == 0:
            return REMOVED_SCHEMA.empty_table()
        t = t.sort_by([(column, "ascending") for column in ("key", "rank", "distance", "reason")])
        keys = t["key"].to_numpy(zero_copy_only=False)
        return t.take(np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])).select(REMOVED_SCHEMA.names)

    tables = [map_tables(rows, ranked(rank)) for rank, rows in enumerate(removals)]
    if all(isinstance(t, pa.Table) for t in tables):
        return first_per_key(pa.concat_tables(tables))
    datasets = [t if isinstance(t, ray.data.Dataset) else ray.data.from_arrow(t) for t in tables]
    return materialize(by_group(datasets[0].union(*datasets[1:]), "part", first_per_key, parts))
