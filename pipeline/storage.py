"""The output directory, local or fsspec (s3://, gs://): paths, atomic writes, listings.

Every file appears atomically: it is written under a temporary name in the same folder and
renamed into place, so a reader never sees half a shard and a killed run leaves only
`*.tmp-*` files, which the next run deletes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.parquet as pq

TMP_MARK = ".tmp-"


def read_parquet(f: IO[bytes], columns: list[str] | None = None, row_groups: list[int] | None = None,
                 footer: pq.FileMetaData | None = None) -> pa.Table:
    """Parquet from a Python file, read on the calling thread only. With pre-buffering or threads (and
    in pq.read_table) an Arrow thread could still hold the file after the call returned (3 in 50 calls
    in CI), and a process whose last such reference went after shutdown aborted ("terminate called
    without an active exception"). `footer`: the file's metadata when the caller has read it already."""
    parquet = pq.ParquetFile(f, metadata=footer, pre_buffer=False)
    if row_groups is None:
        return parquet.read(columns=columns, use_threads=False)
    return parquet.read_row_groups(row_groups, columns=columns, use_threads=False)


class StorageError(Exception):
    """The output store failed a write after its own retries (a bucket that throttles or drops
    connections past them): the build stops with one line, and a rerun goes on from there."""


class Output:
    """OUT/{shards,metadata,status}/ plus the small JSON files at its top."""

    def __init__(self, root: str, snapshot: bool = False):
        # Every ls, exists and open asks the store: other processes (Ray workers, a killed run) write
        # here, and s3fs and gcsfs otherwise answer from a listing made earlier in this process, for
        # ever (a build's driver then missed units its workers had committed: they were left out of
        # stats.json, sizes.json and the report, and a resumed build skipped its dedupe). `snapshot`:
        # for a reader that wants one view of the output as it is now (a query): listings made from
        # now on are kept, so that reading the files listed needs no request per file.
        if snapshot:
            self.fs, self.root = fsspec.core.url_to_fs(root)
            self.fs.invalidate_cache()
        else:
            self.fs, self.root = fsspec.core.url_to_fs(root, use_listings_cache=False)
        self.url = root
        self._bucket_checked = False

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def shard_path(self, shard: str) -> str:
        return self.path("shards", f"{shard}.tar")

    def metadata_path(self, shard: str) -> str:
        return self.path("metadata", f"{shard}.parquet")

    def status_path(self, unit: int) -> str:
        return self.path("status", f"{unit:05d}.parquet")

    def make_dirs(self) -> None:
        """The builder's folders."""
        for sub in ("shards", "metadata", "status", "rejects"):
            self.makedirs(self.path(sub))

    def makedirs(self, path: str) -> None:
        """A folder and its parents; on S3 only in a bucket that exists (s3fs's makedirs would create
        a bucket a typo names). Every program of the project makes its folders here."""
        if "s3" in self.fs.protocol and not self._bucket_checked:
            bucket = path.split("/", 1)[0]
            try:
                self.fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                raise FileNotFoundError(f"bucket {bucket} does not exist (create it first: this project "
                                        "never creates buckets)") from None
            except OSError:  # not allowed to ask (403): the write that follows decides
                pass
            self._bucket_checked = True
        self.fs.makedirs(path, exist_ok=True)

    def write_atomic(self, path: str, write: Callable[[IO[bytes]], Any]) -> None:
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open(tmp, "wb") as f:
                write(f)
            if isinstance(self.fs, LocalFileSystem):
                os.replace(tmp, path)  # atomic on POSIX, and overwrites (fsspec's mv may not)
            else:
                self.fs.mv(tmp, path)  # on S3 a copy: it can fail past the store's retries, as the write can
        except BaseException:
            self._remove_quietly(tmp)
            raise

    def _remove_quietly(self, tmp: str) -> None:
        """A failed write's temporary file; if the store refuses that too, the next run's sweep deletes
        it, and the write's own error is the one to report."""
        try:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
        except OSError:
            pass

    def write_json(self, name: str, value: Any) -> None:
        data = json.dumps(value, indent=2, sort_keys=True).encode()
        self.write_atomic(self.path(name), lambda f: f.write(data))

    def read_json(self, name: str) -> Any | None:
        path = self.path(name)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.load(f)

    def write_table(self, path: str, table: pa.Table) -> None:
        self.write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"))

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return read_parquet(f, columns)

    def list(self, sub: str, suffix: str) -> list[str]:
        """Committed files of OUT/sub ending in suffix (temporary files excluded), sorted."""
        folder = self.path(sub)
        if not self.fs.exists(folder):
            return []
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
        return sorted(n for n in names if n.endswith(suffix) and TMP_MARK not in n)

    def remove_temporaries(self, folders: tuple[str, ...] = ("shards", "metadata", "status", "rejects", "inputs",
                                                            ".")) -> int:
        """Delete what a killed run left half-written in these subfolders; returns how many."""
        removed = 0
        for sub in folders:
            folder = self.path(sub) if sub != "." else self.root
            if not self.fs.exists(folder):
                continue
            for path in self.fs.ls(folder, detail=False):
                if TMP_MARK in path.rsplit("/", 1)[-1]:
                    self.fs.rm(path)
                    removed += 1
        return removed


def save_json(folder: str, name: str, value: Any) -> None:
    """FOLDER/NAME as indented JSON, written atomically; FOLDER (a local path or an fsspec URL) is made
    when missing. What the evaluation programs write their results with."""
    out = Output(folder)
    out.makedirs(out.root)
    out.write_json(name, value)
