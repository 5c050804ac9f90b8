"""Shard names: unit and attempt parse back from every name shard_name makes, past 99,999 units too."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.dedupe import with_unit
from pipeline.schema import shard_attempt, shard_name, shard_unit


@pytest.mark.parametrize("unit, attempt", [(0, 0), (3, 1), (99_999, 2), (100_000, 0), (123_456, 7)])
def test_shard_names_parse_back(unit: int, attempt: int) -> None:
    name = shard_name(unit, attempt)
    for file_name in (name, f"{name}.tar", f"{name}.parquet"):
        assert (shard_unit(file_name), shard_attempt(file_name)) == (unit, attempt)
    assert with_unit(pa.table({"shard": [name]}))["unit"].to_pylist() == [unit]
