"""Write a selection of a build's samples as new shards.

    python -m pipeline.subset --data OUT --query select_training_subset --output NEW
    python -m pipeline.subset --data OUT --keys keys.txt --output NEW --shard-size 5000
    python -m pipeline.subset --data OUT --holdout 0.01 --output HELD_OUT

The selection is the `key` column of a canned query (`python -m queries --list`), a file of
keys, one a line, or a held-out share of the samples drawn by key (`--holdout F`: the samples whose
md5 of "SEED:KEY" falls in the first F of its range, so the same keys whatever the shards and for
every later build that holds them; `train.pretrain --holdout NEW` then trains on the rest and
measures retrieval on NEW). NEW gets a build's layout: NEW/shards/*.tar (each sample's
KEY.jpg, KEY.txt and KEY.json copied byte for byte from OUT's shards), NEW/metadata/*.parquet (the
samples' metadata rows, `shard` updated), NEW/sizes.json and NEW/shards/sizes.json (open_clip's
format), and NEW/keys.txt, the keys in the order of the new shards: by source shard, then as stored
there. Source shards are read one at a time as streams; every file appears atomically.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from collections.abc import Iterator
from typing import IO, NoReturn

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import webdataset as wds

from pipeline.schema import shard_name
from pipeline.storage import Output
from queries import QueryError, connect, query_keys

USAGE_ERROR = 2
HOLDOUT_BITS = 48  # of the md5 that draw a held-out sample: shares down to 1e-14 are exact enough
Segment = tuple[str, list[str]]  # (source shard, keys of it that go into one new shard)


class SubsetError(Exception):
    """Bad input from the caller, said in one line."""


def read_keys(path: str) -> list[str]:
    """The distinct keys of a file with one key a line (blank lines ignored), sorted."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            return sorted({line.strip() for line in f if line.strip()})
    except OSError as err:
        raise SubsetError(f"cannot read keys file {path}: {err.strerror or err}") from None


def holdout_keys(data: str, fraction: float, seed: int = 0) -> list[str]:
    """The keys of OUT's samples held out by `--holdout fraction`, sorted: those whose md5 of
    "SEED:KEY" falls in the first `fraction` of its range. Drawn by key, not by position, so a
    bigger build of the same inputs holds out the same samples it shares with a smaller one."""
    if not 0 < fraction < 1:
        raise SubsetError(f"--holdout must be a fraction in (0, 1), got {fraction}")
    con = connect(data)
    try:
        rows = con.execute(f"""
            SELECT key FROM metadata
            WHERE ('0x' || left(md5(? || ':' || key), {HOLDOUT_BITS // 4}))::UBIGINT < ? ORDER BY key
        """, [str(seed), int(fraction * 2 ** HOLDOUT_BITS)]).fetchall()
    finally:
        con.close()
    return [key for (key,) in rows]


def locate(data: str, keys: list[str]) -> list[tuple[str, str]]:
    """(source shard, key) of every key, sorted; SubsetError if a key is not a sample of OUT."""
    con = connect(data)
    try:
        selected = pa.table({"key": pa.array(keys, pa.string())})
        rows = con.from_arrow(selected).query("selected", """
            SELECT s.key, m.shard FROM selected s LEFT JOIN metadata m USING (key) ORDER BY m.shard, s.key
        """).fetchall()
    finally:
        con.close()
    missing = [key for key, shard in rows if shard is None]
    if missing:
        raise SubsetError(f"{len(missing)} selected key(s) not in {data}, e.g. {missing[0]!r}")
    return [(shard, key) for key, shard in rows]


def plan(located: list[tuple[str, str]], shard_size: int) -> list[list[Segment]]:
    """Cut the (source shard, key) list into new shards of at most shard_size samples."""
    shards: list[list[Segment]] = []
    for start in range(0, len(located), shard_size):
        segments: list[Segment] = []
        for source, key in located[start:start + shard_size]:
            if not segments or segments[-1][0] != source:
                segments.append((source, []))
            segments[-1][1].append(key)
        shards.append(segments)
    return shards


def iter_samples(src: Output, shard: str, wanted: set[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of the wanted samples of a source shard, streamed in tar order."""
    try:
        with src.fs.open(src.shard_path(shard), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            current, members = "", {}
            for member in tar:
                # webdataset's rule: the key is the file name up to its first dot
                key, _, extension = member.name.rsplit("/", 1)[-1].partition(".")
                if key != current:
                    if members:
                        yield current, members
                    current, members = key, {}
                if member.isfile() and key in wanted:
                    members[extension] = tar.extractfile(member).read()
            if members:
                yield current, members
    except tarfile.TarError as err:  # OUT itself is corrupt, not the caller's input
        raise RuntimeError(f"{src.shard_path(shard)} cannot be read as a tar: {err}") from None


def copy_shard(src: Output, segments: list[Segment], f: IO[bytes]) -> list[str]:
    """Write the segments' samples to the tar f; returns their keys in the order written."""
    written: list[str] = []
    with wds.TarWriter(f) as sink:
        for shard, keys in segments:
            wanted = set(keys)
            for key, members in iter_samples(src, shard, wanted):
                sink.write({"__key__": key, **members})
                written.append(key)
                wanted.discard(key)
            if wanted:  # OUT itself is inconsistent, not the caller's input
                raise RuntimeError(f"{src.shard_path(shard)} lacks {len(wanted)} sample(s) its metadata lists, "
                                  f"e.g. {min(wanted)!r}")
    return written


def metadata_rows(src: Output, segments: list[Segment], keys: list[str], shard: str) -> pa.Table:
    """The source metadata rows of `keys` (in that order), their `shard` set to the new shard."""
    parts = []
    for source, wanted in segments:
        table = src.read_table(src.metadata_path(source))
        parts.append(table.filter(pc.is_in(table["key"], pa.array(wanted, pa.string()))))
    table = pa.concat_tables(parts, promote_options="default")
    position = {key: i for i, key in enumerate(table["key"].to_pylist())}
    table = table.take(pa.array([position[key] for key in keys], pa.int64()))
    column = table.schema.get_field_index("shard")
    return table.set_column(column, table.schema.field(column), pa.array([shard] * len(keys), pa.string()))


def check_new(url: str) -> Output:
    """NEW as an Output; SubsetError if it exists and is not an empty directory."""
    new = Output(url)
    if new.fs.exists(new.root) and (not new.fs.isdir(new.root) or new.fs.ls(new.root, detail=False)):
        raise SubsetError(f"output {url} already exists and is not empty; give a new directory")
    return new


def write_subset(data: str, output: str, keys: list[str] | None = None, query: str | None = None,
                 shard_size: int = 10000) -> dict[str, int]:
    """Copy the samples of `keys` (or of query `query`'s keys) from OUT `data` to NEW `output`.

    Returns the new shards' sizes, {'00000.tar': samples, ...}.
    """
    if (keys is None) == (query is None):
        raise SubsetError("give either keys or a query")
    new = check_new(output)
    if keys is None:
        keys = query_keys(query, data)  # also checks the query name and that OUT exists
    if not keys:
        raise SubsetError("the selection is empty: no sample to write")
    shards = plan(locate(data, keys), shard_size)  # every key is checked before NEW is touched
    try:
        return _write(Output(data), new, shards)
    except BaseException:  # NEW was new or empty: leave it so, rather than half-written
        for name in new.fs.ls(new.root, detail=False) if new.fs.exists(new.root) else []:
            new.fs.rm(name, recursive=True)
        raise


def _write(src: Output, new: Output, shards: list[list[Segment]]) -> dict[str, int]:
    for sub in ("shards", "metadata"):
        new.makedirs(new.path(sub))
    sizes: dict[str, int] = {}
    order: list[str] = []
    for number, segments in enumerate(shards):
        name, written = shard_name(number), []
        new.write_atomic(new.shard_path(name), lambda f: written.extend(copy_shard(src, segments, f)))
        new.write_table(new.metadata_path(name), metadata_rows(src, segments, written, name))
        sizes[f"{name}.tar"] = len(written)
        order += written
    new.write_json("sizes.json", sizes)
    new.write_json("shards/sizes.json", sizes)  # open_clip looks beside the shards
    text = "".join(f"{key}\n" for key in order).encode()
    new.write_atomic(new.path("keys.txt"), lambda f: f.write(text))
    return sizes


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"error: {message} (see --help)\n")  # one line, like every input error


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m pipeline.subset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, metavar="OUT", help="build output to select from")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--query", metavar="NAME", help="canned query whose `key` column is the selection")
    which.add_argument("--keys", metavar="FILE", help="file of keys, one a line")
    which.add_argument("--holdout", type=float, metavar="F", help="hold out this share of the samples, drawn by key")
    parser.add_argument("--holdout-seed", type=int, default=0, metavar="S", help="which samples --holdout draws")
    parser.add_argument("--output", required=True, metavar="NEW", help="new (or empty) output directory")
    parser.add_argument("--shard-size", type=int, default=10000, metavar="N", help="samples per new shard")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be at least 1")
    try:
        keys = read_keys(args.keys) if args.keys else None
        if args.holdout is not None:
            keys = holdout_keys(args.data, args.holdout, args.holdout_seed)
        sizes = write_subset(args.data, args.output, keys, args.query, args.shard_size)
    except (SubsetError, QueryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except (duckdb.Error, OSError, RuntimeError) as err:  # a corrupt or incomplete OUT
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(f"{sum(sizes.values())} samples in {len(sizes)} shards written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
