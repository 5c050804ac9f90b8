"""Canned DuckDB queries over a build's output tables.

Each `queries/NAME.sql` holds one query whose first line is a `-- description` comment. The
queries read three views that `connect` creates: `metadata` and `status` over
OUT/metadata/*.parquet and OUT/status/*.parquet (OUT local or an fsspec URL), and `inputs`
over OUT/inputs.json (`index`, `path`, `rows`, `first_unit` of every input file; a row's key is
its file's `index` in 5 digits and its row in 9). Columns newer than some outputs
(OPTIONAL_COLUMNS) read as NULL where a build predates them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import duckdb
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pipeline.schema import METADATA_SCHEMA, STATUS_SCHEMA
from pipeline.storage import Output

QUERY_DIR = Path(__file__).parent
TABLES = ("metadata", "status")
SCHEMAS = {"metadata": METADATA_SCHEMA, "status": STATUS_SCHEMA}
# Columns that outputs of older builds lack, with their DuckDB types: the views fill them with NULL.
OPTIONAL_COLUMNS: dict[str, dict[str, str]] = {
    "metadata": {"phash": "VARCHAR", "phash_crops": "VARCHAR[]", "phash_inner": "VARCHAR[]"},
    "status": {"distance": "INTEGER", "overlap_set": "VARCHAR"},
}
INPUTS_SCHEMA = pa.schema([("index", pa.int32()), ("path", pa.string()), ("rows", pa.int64()),
                           ("first_unit", pa.int32())])
T = TypeVar("T")


class QueryError(Exception):
    """Bad input from the caller: an unknown query name or an unusable output directory."""


class QueryResult(NamedTuple):
    columns: list[str]
    rows: list[tuple[Any, ...]]


def list_queries() -> dict[str, str]:
    """Query name -> description (the first line of its .sql file, without '-- ')."""
    found = {}
    for path in sorted(QUERY_DIR.glob("*.sql")):
        with path.open(encoding="utf-8") as f:
            found[path.stem] = f.readline().removeprefix("--").strip()
    return found


def query_sql(name: str) -> str:
    known = list_queries()
    # Checking against the listing (not just the file) keeps names like '../x' out.
    if name not in known:
        raise QueryError(f"unknown query {name!r}; known: {', '.join(known)}")
    return (QUERY_DIR / f"{name}.sql").read_text(encoding="utf-8")


def _parquet_files(out: Output, table: str) -> list[str]:
    """URLs of OUT/table/*.parquet that duckdb can open; committed files only."""
    paths = [out.path(table, name) for name in out.list(table, ".parquet")]
    if isinstance(out.fs, LocalFileSystem):
        return paths
    # fsspec paths drop the protocol ('bucket/out/...'); duckdb needs it to pick the filesystem.
    return [out.fs.unstrip_protocol(p) for p in paths]


def connect(data_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with views `metadata` and `status` over a build's output."""
    out = Output(str(data_dir), snapshot=True)  # one listing per folder: duckdb's reads then need no lookups
    if not out.fs.isdir(out.root):
        raise QueryError(f"output directory {data_dir} does not exist")
    files = {table: _parquet_files(out, table) for table in TABLES}
    if not any(files.values()):
        raise QueryError(f"no metadata or status parquet files in {data_dir} (is it a build output?)")
    con = duckdb.connect()
    if not isinstance(out.fs, LocalFileSystem):
        con.register_filesystem(out.fs)
    for table, paths in files.items():
        if not paths:  # a build that wrote no sample yet has no metadata; a subset has no status
            con.from_arrow(SCHEMAS[table].empty_table()).create_view(table)
            continue
        # union_by_name: files written by different versions may order or add columns differently.
        rel = con.read_parquet(paths, union_by_name=True)
        missing = [f"CAST(NULL AS {type_}) AS {column}"
                   for column, type_ in OPTIONAL_COLUMNS[table].items() if column not in rel.columns]
        (rel.project(", ".join(["*", *missing])) if missing else rel).create_view(table)
    registry = out.read_json("inputs.json") or {"files": []}
    inputs = registry["files"] if isinstance(registry, dict) else registry  # early builds: a bare list
    con.from_arrow(pa.Table.from_pylist(
        [{name: entry.get(name) for name in INPUTS_SCHEMA.names} for entry in inputs], schema=INPUTS_SCHEMA,
    )).create_view("inputs")
    return con


def _run(name: str, data_dir: str | Path, fetch: Callable[[duckdb.DuckDBPyRelation], T]) -> T:
    """fetch(the result of query `name` over data_dir); the connection is closed afterwards."""
    sql = query_sql(name)
    con = connect(data_dir)
    try:
        return fetch(con.sql(sql))
    finally:
        con.close()


def run_query(name: str, data_dir: str | Path) -> QueryResult:
    """Run query `name` over the output in data_dir: its columns and every row."""
    return _run(name, data_dir, lambda rel: QueryResult(list(rel.columns), rel.fetchall()))


def query_keys(name: str, data_dir: str | Path) -> list[str]:
    """The distinct keys (column `key`) that query `name` selects over data_dir, sorted."""
    def keys(rel: duckdb.DuckDBPyRelation) -> list[str]:
        if "key" not in rel.columns:
            raise QueryError(f"query {name!r} selects no key column (has: {', '.join(rel.columns)})")
        return [key for (key,) in rel.query("q", "SELECT DISTINCT key FROM q WHERE key IS NOT NULL ORDER BY key")
                .fetchall()]
    return _run(name, data_dir, keys)
