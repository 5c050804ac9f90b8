"""Stage 1, source: LAION metadata parquet (CSV and TSV staged as parquet by text_inputs) -> work
units -> Samples with metadata filters applied.

Input files are numbered once per output directory (`OUT/inputs.json`) so that keys, which
are (file number, row), stay the same across reruns even when files are added later.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.build_config import FILTER_COLUMNS, LAION_COLUMNS, REQUIRED_COLUMNS, BuildConfig
from pipeline.config import ConfigError
from pipeline.schema import Sample, make_key
from pipeline.storage import Output, read_parquet
from pipeline import text_inputs
from pipeline.takedown import Takedowns


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of one input file; becomes shard `unit`."""

    unit: int
    file_index: int
    path: str
    start: int
    stop: int


def expand_inputs(patterns: list[str]) -> list[str]:
    """Paths, globs and fsspec URLs -> sorted list of input files, each with its protocol."""
    files: list[str] = []
    for pattern in patterns:
        fs, _ = fsspec.core.url_to_fs(pattern)
        matches = sorted(fs.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        matches = [m for m in matches if fs.exists(m)]
        if not matches:
            raise ConfigError(f"input not found: {pattern}")
        protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        files += [m if m.startswith(protocol) else protocol + m for m in matches]
    return list(dict.fromkeys(files))


def _parquet_footer(path: str) -> pq.FileMetaData:
    try:
        with fsspec.open(path, "rb") as f:
            return pq.read_metadata(f)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"cannot read parquet file {path}: {err}") from None


def input_columns(path: str, names: list[str], config: BuildConfig) -> dict[str, str]:
    """Our field -> the column of this file that holds it, for the fields it has: the configured name,
    else the one that differs from it in case only (releases spell URL and url alike). The URL and the
    caption must be there, and so must what a filter that is on reads."""
    by_lower: dict[str, str] = {}
    for name in names:
        by_lower.setdefault(name.lower(), name)
    wanted = {name: getattr(config, f"{name}_col") for name in LAION_COLUMNS}
    found = {ours: theirs if theirs in names else by_lower[theirs.lower()]
             for ours, theirs in wanted.items() if theirs and (theirs in names or theirs.lower() in by_lower)}
    needs = {field: "" for field in REQUIRED_COLUMNS}  # field -> the filter flag that reads it ('': always needed)
    for setting, fields in FILTER_COLUMNS.items():
        if getattr(config, setting):
            for field in fields:
                needs.setdefault(field, "--" + setting.replace("_", "-"))
    for field, filter_flag in needs.items():
        if field in found:
            continue
        flag, why = f"--{field.replace('_', '-')}-col", f"read by {filter_flag}" if filter_flag else "required"
        if not wanted[field]:
            raise ConfigError(f"{flag} is '' but the {field} column is {why}")
        raise ConfigError(f"{path}: missing column '{wanted[field]}' ({why}; has: {', '.join(names)}; "
                          f"name it with {flag} or choose a --preset)")
    return found


def check_inputs(paths: list[str], config: BuildConfig) -> dict[str, str]:
    """The columns every input is read by (input_columns), after checking each is readable parquet, or
    CSV/TSV with a header: one set for all of them, since an output holds one reading of its inputs."""
    columns, first = None, None
    for path in paths:
        names = text_inputs.header(path, config)[0] if text_inputs.delimiter(path) else \
            _parquet_footer(path).schema.to_arrow_schema().names
        found = input_columns(path, names, config)
        if columns is not None and found != columns:
            raise ConfigError(f"{path} has other columns than {first} ({found} vs {columns}); "
                              "build them into separate outputs, or name the columns with the --*-col flags")
        columns, first = found, path
    return columns or {}


def input_rows(paths: list[str]) -> dict[str, int]:
    """Row count of every parquet input (text inputs: of their staged parquet), from its footer."""
    return {path: _parquet_footer(path).num_rows for path in paths}


AUTO_UNITS_PER_CPU = 2  # a few units per CPU, so a slow unit (dead hosts, timeouts) does not leave CPUs idle at the end
AUTO_UNIT_ROWS = (1_000, 10_000)  # a shard of fewer rows costs more in files than it gains; more makes resumes coarse


def auto_shard_size(rows: int, cpus: float) -> int:
    """Rows per unit when --shard-size is not given: a unit is one fetch task, so an input of a few
    thousand rows as one unit would download on one core however many the cluster has."""
    smallest, largest = AUTO_UNIT_ROWS
    return min(largest, max(smallest, -(-rows // max(1, AUTO_UNITS_PER_CPU * int(cpus)))))


def register_inputs(output: Output, rows: dict[str, int], config: BuildConfig,
                    allowlist: np.ndarray | None = None, cpus: float = 1.0) -> tuple[list[dict], int]:
    """Number the input files and their units for this output, once and for good; returns the
    files' entries and the output's rows per unit.

    OUT/inputs.json records every file ever built into OUT with its row count and first unit,
    so a file keeps its units whichever files a later run is given; the rows per unit, chosen on
    the first run (--shard-size, else auto_shard_size from the rows and the cluster's `cpus`) and
    kept by every later one; and the settings that decide what a unit writes
    (BuildConfig.unit_settings, and which allow-list): a run with others would leave one dataset
    made two ways, so it is refused.
    """
    settings = {**config.unit_settings(), "sample_ids": None if allowlist is None else
                hashlib.sha256(allowlist.tobytes()).hexdigest()[:16]}  # the IDs, wherever the file lies
    registry = output.read_json("inputs.json") or {
        "shard_size": config.shard_size or auto_shard_size(sum(rows.values()), cpus), "files": [], "settings": settings}
    shard_size = registry["shard_size"]
    if config.shard_size is not None and config.shard_size != shard_size:
        raise ConfigError(f"{output.url} was built with shard_size {shard_size}, not {config.shard_size}; "
                          f"keep it (or leave --shard-size out) or use a new output directory")
    built_with = registry.setdefault("settings", settings)  # outputs from before settings were recorded
    changed = [f"{name} {built_with[name]!r} -> {value!r}" for name, value in settings.items()
               if name in built_with and built_with[name] != value]
    if changed:
        raise ConfigError(f"{output.url} was built with other settings than this run's ({'; '.join(changed)}): "
                          "they decide what each unit writes, so one output holds one value of each; "
                          "keep them, or build into a new output directory")
    known = registry["files"]
    by_path = {entry["path"]: entry for entry in known}
    for path, count in rows.items():
        if path in by_path and by_path[path]["rows"] != count:
            raise ConfigError(f"{path} has {count} rows but had {by_path[path]['rows']} when first built into "
                              f"{output.url}; use a new output directory")
        if path not in by_path:
            first_unit = max((e["first_unit"] + -(-e["rows"] // shard_size) for e in known), default=0)
            by_path[path] = {"path": path, "index": len(known), "rows": count, "first_unit": first_unit}
            known.append(by_path[path])
    output.write_json("inputs.json", registry)
    return [by_path[p] for p in rows], shard_size


def plan_units(inputs: list[dict], shard_size: int) -> list[Unit]:
    """Fixed-size slices of every input file, numbered from the file's registered first unit."""
    return [Unit(entry["first_unit"] + start // shard_size, entry["index"], entry["path"], start,
                 min(start + shard_size, entry["rows"]))
            for entry in sorted(inputs, key=lambda e: e["index"]) for start in range(0, entry["rows"], shard_size)]


class InputError(Exception):
    """An input file failed mid-build, after its footer was checked: the build stops with one line."""


def read_rows(path: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a parquet file, reading only the row groups that hold them. A file
    that cannot be read (corrupt pages behind a valid footer, a store past its retries) is one
    InputError naming it: finished units are kept, and a rerun goes on once it is readable."""
    try:
        with fsspec.open(path, "rb") as f:
            footer = pq.read_metadata(f)
            groups, offset, first_offset = [], 0, None
            for i in range(footer.num_row_groups):
                n = footer.row_group(i).num_rows
                if offset < stop and offset + n > start:
                    groups.append(i)
                    first_offset = offset if first_offset is None else first_offset
                offset += n
            table = read_parquet(f, columns, groups, footer)
    except (OSError, pa.ArrowException) as err:
        problem = " ".join(str(err).split())  # Arrow's messages run over several lines
        raise InputError(f"input {path}: rows {start}-{stop} cannot be read: {problem}") from None
    return table.slice(start - (first_offset or 0), stop - start)


def load_allowlist(path: str) -> np.ndarray:
    """Sorted int64 SAMPLE_IDs from a text file (one per line) or a parquet file."""
    try:
        if path.endswith(".parquet"):
            with fsspec.open(path, "rb") as f:
                table = read_parquet(f)
            column = "SAMPLE_ID" if "SAMPLE_ID" in table.column_names else table.column_names[0]
            ids = table[column].to_numpy()
        else:
            with fsspec.open(path, "rt") as f:
                ids = np.array([int(line) for line in f if line.strip()], dtype=np.int64)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise ConfigError(f"cannot read SAMPLE_ID allow-list {path}: {err}") from None
    return np.unique(ids.astype(np.int64))


def _metadata_reject(row: dict, config: BuildConfig) -> str | None:
    """Why the metadata filters drop this row, or None."""
    if row.get("nsfw") in config.drop_nsfw:
        return f"NSFW tag {row['nsfw']}"
    if config.max_nsfw_score is not None:
        score = row.get("nsfw_score")
        if score is None or score > config.max_nsfw_score:  # unknown counts as unsafe: this filter is for safety
            return f"NSFW score {score} > {config.max_nsfw_score}" if score is not None else "no NSFW score"
    if config.min_similarity is not None and (row.get("similarity") or 0.0) < config.min_similarity:
        return f"similarity {row.get('similarity')} < {config.min_similarity}"
    if config.min_image_side is not None:
        side = min(row.get("width") or 0, row.get("height") or 0)
        if side < config.min_image_side:
            return f"advertised size {row.get('width')}x{row.get('height')} < {config.min_image_side}"
    if config.min_caption_length is not None and len(row.get("caption") or "") < config.min_caption_length:
        return f"caption shorter than {config.min_caption_length} characters"
    return None


def is_http_url(url: object) -> bool:
    """An http(s) URL that urllib can parse (it raises ValueError on e.g. 'http://[::1/x.jpg')."""
    try:
        return isinstance(url, str) and urlsplit(url).scheme in ("http", "https")
    except ValueError:
        return False


def read_unit(unit: Unit, config: BuildConfig, allowlist: np.ndarray | None, url_duplicates: dict[str, str],
              only_rows: set[int] | None = None, takedowns: Takedowns | None = None) -> list[Sample]:
    """The unit's rows as Samples; rows decided here (filters, takedowns, bad URLs) get their final status."""
    table = read_rows(unit.path, unit.start, unit.stop, list(config.source_columns().values()))
    return unit_samples(unit, table, config, allowlist, url_duplicates, only_rows, takedowns)


def unit_samples(unit: Unit, table: pa.Table, config: BuildConfig, allowlist: np.ndarray | None,
                 url_duplicates: dict[str, str], only_rows: set[int] | None = None,
                 takedowns: Takedowns | None = None) -> list[Sample]:
    """read_unit's Samples from the unit's rows already read (the source columns, rows [start, stop))."""
    columns = config.source_columns()
    table = table.rename_columns(list(columns))
    in_allowlist = None
    if allowlist is not None and "sample_id" in columns:
        ids = pc.fill_null(table["sample_id"], -1).to_numpy(zero_copy_only=False).astype(np.int64)
        in_allowlist = np.isin(ids, allowlist)
    taken_down = takedowns.url_listed(table["url"].to_pylist()) if takedowns else np.zeros(table.num_rows, bool)
    samples = []
    for i, row in enumerate(table.to_pylist()):
        input_row = unit.start + i
        if only_rows is not None and input_row not in only_rows:
            continue
        key = make_key(unit.file_index, input_row)
        sample_id = row.get("sample_id") if "sample_id" in columns else int(key)  # stable: the file's number and row
        sample = Sample(key=key, unit=unit.unit, input_file=unit.path, input_row=input_row,
                        url=row.get("url"), caption=row.get("caption"), sample_id=sample_id,
                        license=row.get("license"), nsfw=row.get("nsfw"), similarity=row.get("similarity"))
        if in_allowlist is not None and not in_allowlist[i]:
            sample.fail("not_in_allowlist", "SAMPLE_ID not in the allow-list")
        elif taken_down[i]:
            sample.fail("taken_down", "URL on an --exclude-urls list")
        elif reason := _metadata_reject(row, config):
            sample.fail("filtered_metadata", reason)
        elif not is_http_url(sample.url):
            sample.fail("invalid_url", f"not an http(s) URL: {str(sample.url)[:200]!r}")
        elif key in url_duplicates:
            sample.fail("duplicate_url", f"same URL as {url_duplicates[key]}")
            sample.duplicate_of = url_duplicates[key]
        samples.append(sample)
    return samples
