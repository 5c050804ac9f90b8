"""Shard names: unit and attempt parse back from every name shard_name makes, past 99,999 units too;
the pHash version a written file records."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dedupe import with_unit
from pipeline.schema import METADATA_SCHEMA, PHASH_VERSION, phash_version, shard_attempt, shard_name, shard_unit


@pytest.mark.parametrize("unit, attempt", [(0, 0), (3, 1), (99_999, 2), (100_000, 0), (123_456, 7)])
def test_shard_names_parse_back(unit: int, attempt: int) -> None:
    name = shard_name(unit, attempt)
    for file_name in (name, f"{name}.tar", f"{name}.parquet"):
        assert (shard_unit(file_name), shard_attempt(file_name)) == (unit, attempt)
    assert with_unit(pa.table({"shard": [name]}))["unit"].to_pylist() == [unit]


def test_phash_version_is_read_back_from_written_files(tmp_path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(METADATA_SCHEMA.empty_table(), path)
    assert phash_version(pq.read_schema(path)) == PHASH_VERSION
    pq.write_table(pa.table({"key": ["a"]}), path)  # a file from before pHash versions
    assert phash_version(pq.read_schema(path)) is None
