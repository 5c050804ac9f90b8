"""Exact deduplication, global across the run, input files and reruns into the same output.

One rule, one mechanism: among rows sharing a value (the URL, or the sha256 of the stored
image) the smallest key is kept, decided by a Ray Data groupby over the whole dataset, so
the choice depends neither on block order nor on the number of workers.

- URLs are deduplicated *before* downloading: a planning pass over every input row that
  survives the metadata filters, plus every sample already written to OUT, writes the
  losers to OUT/plan/url_duplicates/unit=U/, which the source stage of unit U reads.
- Image bytes can only be compared after downloading: once every unit is committed, the
  losers are removed from their shards (rewritten atomically) and marked `duplicate_image`.
"""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.schema import STATUS_SCHEMA
from pipeline.storage import Output

LOSERS_SCHEMA = pa.schema([("key", pa.string()), ("duplicate_of", pa.string()), ("unit", pa.int64()),
                           ("shard", pa.string())])


def _losers(group: pa.Table) -> pa.Table:
    """All rows of one value but the smallest key; the same key seen twice counts once."""
    table = group.sort_by("key")
    keys = table["key"].to_pylist()
    keep = [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]]
    if not keep:
        return LOSERS_SCHEMA.empty_table()
    rows = table.take(keep)
    return pa.table({"key": rows["key"], "duplicate_of": pa.array([keys[0]] * len(keep), pa.string()),
                     "unit": rows["unit"].cast(pa.int64()), "shard": rows["shard"]}, schema=LOSERS_SCHEMA)


def find_duplicates(ds: ray.data.Dataset, column: str, partitions: int) -> ray.data.Dataset:
    """Rows (key, duplicate_of, unit, shard) of `ds` whose `column` value a smaller key also has.

    `partitions` sizes the hash shuffle: about one per work unit, as Ray's default of 200
    costs seconds of set-up on a laptop-sized build.
    """
    partitions = max(1, min(partitions, 200))
    return ds.groupby(column, num_partitions=partitions).map_groups(_losers, batch_format="pyarrow")


def url_duplicates_dir(output: Output) -> str:
    return output.path("plan", "url_duplicates")


def write_url_plan(output: Output, candidates: ray.data.Dataset, partitions: int) -> int:
    """Plan URL dedupe from rows {key, url, unit, shard}; returns how many rows lose."""
    folder = url_duplicates_dir(output)
    if output.fs.exists(folder):
        output.fs.rm(folder, recursive=True)
    losers = find_duplicates(candidates, "url", partitions).materialize()
    if losers.count():
        losers.drop_columns(["shard"]).write_parquet(output.url.rstrip("/") + "/plan/url_duplicates",
                                                     partition_cols=["unit"])
    return losers.count()


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


def _rewrite_shard(output: Output, removed: pa.Table) -> pa.Table:
    """Drop rows (REMOVED_SCHEMA) from one shard: status first, then tar, then metadata (the
    dedupe's input), so that a kill in between is repaired by the next run recomputing them."""
    shard = removed["shard"][0].as_py()
    unit = int(shard.split("_")[0])
    changes = {row.pop("key"): row for row in removed.to_pylist()}
    status = output.read_table(output.status_path(unit)).to_pylist()
    for row in status:
        if row["key"] in changes:
            row.update(changes[row["key"]], key=None, shard=None)
    output.write_table(output.status_path(unit), pa.Table.from_pylist(status, schema=STATUS_SCHEMA))

    with output.fs.open(output.shard_path(shard), "rb") as f:
        data = f.read()

    def rewrite(out) -> None:
        with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as dst:
            for member in src:
                if member.name.split(".", 1)[0] not in changes:
                    dst.addfile(member, src.extractfile(member))

    metadata = output.read_table(output.metadata_path(shard))
    metadata = metadata.filter(pc.invert(pc.is_in(metadata["key"], removed["key"])))
    if metadata.num_rows == 0:  # nothing left: the shard goes, as no status row points to it any more
        output.fs.rm(output.shard_path(shard))
        output.fs.rm(output.metadata_path(shard))
    else:
        output.write_atomic(output.shard_path(shard), rewrite)
        output.write_table(output.metadata_path(shard), metadata)
    return pa.table({"shard": [shard], "removed": [len(changes)]})


def remove_from_shards(output: Output, removed: ray.data.Dataset, partitions: int) -> int:
    """Apply REMOVED_SCHEMA rows to their shards, one task per shard; returns how many."""
    if not removed.count():
        return 0
    done = removed.groupby("shard", num_partitions=max(1, min(partitions, 200))).map_groups(
        lambda group: _rewrite_shard(output, group), batch_format="pyarrow")
    return int(sum(done.to_pandas()["removed"]))


def written_samples(output: Output, columns: list[str]) -> ray.data.Dataset | None:
    if not output.list("metadata", ".parquet"):
        return None
    return ray.data.read_parquet(output.url.rstrip("/") + "/metadata", file_extensions=["parquet"]).select_columns(
        columns)


def remove_duplicate_images(output: Output) -> int:
    """Global sha256 dedupe over every written sample; returns how many were removed."""
    written = written_samples(output, ["key", "sha256", "shard"])
    if written is None:
        return 0
    written = written.map_batches(
        lambda t: t.append_column("unit", pc.cast(pc.utf8_slice_codeunits(t["shard"], 0, 5), pa.int64())),
        batch_format="pyarrow")
    shards = len(output.list("metadata", ".parquet"))
    losers = find_duplicates(written, "sha256", shards)

    def as_removed(t: pa.Table) -> pa.Table:
        n = t.num_rows
        return pa.table({"key": t["key"], "shard": t["shard"], "status": ["duplicate_image"] * n,
                         "reason": pc.binary_join_element_wise("same image bytes as ", t["duplicate_of"], ""),
                         "duplicate_of": t["duplicate_of"], "distance": pa.nulls(n, pa.int32()),
                         "overlap_set": pa.nulls(n, pa.string())}, schema=REMOVED_SCHEMA)

    return remove_from_shards(output, losers.map_batches(as_removed, batch_format="pyarrow").materialize(), shards)
