"""Run a canned query over a build output and print it as a table.

`python -m queries --list` names the queries; `python -m queries NAME --data OUT` runs one.
"""

from __future__ import annotations

import argparse
import numbers
import sys
from typing import Any, NoReturn

import duckdb

from queries import QueryError, QueryResult, list_queries, run_query

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block, like every other input error here.
        self.exit(USAGE_ERROR, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m queries", description=__doc__)
    p.add_argument("name", nargs="?", help="query to run (see --list)")
    p.add_argument("--data", metavar="OUT", help="build output directory OUT (local path or fsspec URL)")
    p.add_argument("--list", action="store_true", help="list the queries with descriptions")
    return p


def _cell(value: Any) -> str:
    return "NULL" if value is None else str(value)


def format_table(result: QueryResult) -> str:
    """Aligned text table: numbers right-aligned, everything else left-aligned."""
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(result.columns)]
    numeric = [
        all(isinstance(row[i], numbers.Number) for row in result.rows if row[i] is not None)
        for i in range(len(result.columns))
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    lines = [line(list(result.columns)), line(["-" * w for w in widths])]
    lines += [line(row) for row in cells]
    lines.append(f"({len(cells)} row{'s' if len(cells) != 1 else ''})")
    return "\n".join(lines)


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        known = list_queries()
        width = max(map(len, known), default=0)
        for name, description in known.items():
            print(f"{name.ljust(width)}  {description}")
        return 0
    if not args.name or not args.data:
        return _fail(USAGE_ERROR, "give a query NAME and --data OUT, or --list")
    try:
        result = run_query(args.name, args.data)
    except QueryError as e:
        return _fail(USAGE_ERROR, str(e))
    except duckdb.Error as e:
        # E.g. a corrupt parquet file: report it on one line rather than a traceback.
        return _fail(1, " ".join(str(e).split()))
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
