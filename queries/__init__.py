"""Canned DuckDB queries over a build's output tables.

Each `queries/NAME.sql` holds one query whose first line is a `-- description` comment. The
queries read two views, `metadata` and `status`, which `connect` creates over
OUT/metadata/*.parquet and OUT/status/*.parquet (OUT local or an fsspec URL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import duckdb
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import Output

QUERY_DIR = Path(__file__).parent
TABLES = ("metadata", "status")


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
    out = Output(str(data_dir))
    if not out.fs.isdir(out.root):
        raise QueryError(f"output directory {data_dir} does not exist")
    files = {table: _parquet_files(out, table) for table in TABLES}
    for table, paths in files.items():
        if not paths:
            raise QueryError(
                f"no {table} parquet files in {data_dir}/{table}/ (is it a build output?)"
            )
    con = duckdb.connect()
    if not isinstance(out.fs, LocalFileSystem):
        con.register_filesystem(out.fs)
    for table, paths in files.items():
        # union_by_name: files written by different versions may order or add columns differently.
        con.read_parquet(paths, union_by_name=True).create_view(table)
    return con


def run_query(name: str, data_dir: str | Path) -> QueryResult:
    """Run query `name` over the output in data_dir; the connection is closed afterwards."""
    sql = query_sql(name)
    con = connect(data_dir)
    try:
        rel = con.sql(sql)
        return QueryResult(list(rel.columns), rel.fetchall())
    finally:
        con.close()
