"""CSV and TSV metadata (CC12M's TSV, other tools' exports) -> parquet in OUT/inputs/, converted once
per output, so that the source stage reads every input by row groups as it reads LAION's parquet.

A text file's rows are numbered as its data lines (the header aside), and those numbers are the keys
of its samples: so a file that changes after its conversion is refused, not converted again.
"""

from __future__ import annotations

import csv
import hashlib
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError
from pipeline.storage import Output

DELIMITERS = {".csv": ",", ".tsv": "\t"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # what fsspec's compression="infer" opens
# fields read as numbers (by the filters and the sample id); every other column stays text
NUMBER_TYPES = {"sample_id": pa.int64(), "width": pa.float64(), "height": pa.float64(), "similarity": pa.float64(),
                "nsfw_score": pa.float64()}
SOURCE_BYTES = b"laion_face.source_bytes"  # the parquet's key-value metadata: the size it was converted from
ROW_GROUP_ROWS = 10_000  # a unit reads only the row groups holding its rows


def delimiter(path: str) -> str | None:
    """',' or a tab for a CSV or TSV input (compressed or not), None for anything else (parquet)."""
    name = path.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    return DELIMITERS.get(posixpath.splitext(name)[1])


def _parse_options(sep: str) -> pacsv.ParseOptions:
    # CSV quotes fields (and may hold newlines in them); TSV, as CC12M's, has no quoting at all
    return pacsv.ParseOptions(delimiter=sep, quote_char='"' if sep == "," else False, newlines_in_values=sep == ",")


def header(path: str, config: BuildConfig) -> tuple[list[str], bool]:
    """The file's column names, and whether its first line holds them. A first line with a URL in it is
    data: CC12M's TSV has no header, url then caption, and gets the URL and caption columns' names."""
    sep = delimiter(path)
    try:
        with fsspec.open(path, "rt", compression="infer", encoding="utf-8", newline="") as f:
            first = next(csv.reader(f, delimiter=sep, quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE), None)
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if not first:
        raise ConfigError(f"{path} is empty: a CSV or TSV input needs a header line and rows")
    if not any(value.startswith(("http://", "https://")) for value in first):
        return first, True
    if len(first) != 2:
        raise ConfigError(f"{path} has no header line (its first line holds a URL) and {len(first)} columns: "
                          "add a header line naming them")
    return [config.url_col, config.caption_col], False


def staged_parquet(path: str, output: Output, config: BuildConfig) -> str:
    """The parquet the build reads for this input: the input itself, or for a CSV or TSV its conversion
    in OUT/inputs/ (made now, or by an earlier run from the same file). `config`: with the file's
    columns (BuildConfig.with_columns), which say what is a number."""
    if delimiter(path) is None:
        return path
    stem = posixpath.basename(path).split(".")[0]
    target = output.path("inputs", f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:8]}.parquet")
    protocol = output.url.split("://", 1)[0] + "://" if "://" in output.url else ""
    try:
        size = fsspec.core.url_to_fs(path)[0].size(path)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if output.fs.exists(target):
        with output.fs.open(target, "rb") as f:
            converted_from = int(pq.read_schema(f).metadata[SOURCE_BYTES])
        if converted_from != size:
            raise ConfigError(f"{path} changed since this output converted it ({converted_from} bytes then, {size} "
                              f"now): its rows are the keys of samples written, so build it into a new output")
        return protocol + target
    output.makedirs(output.path("inputs"))
    names, has_header = header(path, config)
    try:
        output.write_atomic(target, lambda f: _convert(path, names, has_header, size, config, f))
    except (pa.ArrowException, UnicodeDecodeError) as err:
        problem = " ".join(str(err).split())[:500]  # Arrow's messages quote the bad line, over several lines
        raise ConfigError(f"cannot convert {path}: {problem}") from None
    return protocol + target


def _convert(path: str, names: list[str], has_header: bool, size: int, config: BuildConfig, out) -> None:
    numbers = {getattr(config, f"{field}_col"): kind for field, kind in NUMBER_TYPES.items()}
    schema = pa.schema([(name, numbers.get(name, pa.string())) for name in names],
                       metadata={SOURCE_BYTES: str(size).encode(), b"laion_face.source": path.encode()})
    read = pacsv.ReadOptions(column_names=names, skip_rows=int(has_header), block_size=16 << 20)
    # every value read as text, then the numbers cast: type inference per block would guess an id
    # column as numbers in one block and fail on the next; an empty field is null, "null" is text
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in names}, strings_can_be_null=True,
                                   null_values=[""])
    with fsspec.open(path, "rb", compression="infer") as f, pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for batch in pacsv.open_csv(f, read_options=read, parse_options=_parse_options(delimiter(path)),
                                    convert_options=convert):
            columns = []
            for name, column in zip(names, batch.columns):
                if name in numbers:
                    try:
                        column = pc.cast(pc.utf8_trim_whitespace(column), numbers[name])
                    except pa.ArrowInvalid as err:
                        raise pa.ArrowInvalid(f"column '{name}' holds a value that is not a number ({err})") from None
                columns.append(column)
            writer.write_batch(pa.record_batch(columns, schema=schema), row_group_size=ROW_GROUP_ROWS)
