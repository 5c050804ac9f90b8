"""Stage 6, write: commit one unit as a shard, its metadata and its status rows.

Commit order makes every state a kill can leave recoverable: the tar and the metadata
parquet first, the status parquet last. A unit is done when OUT/status/UNIT.parquet exists;
a shard that no status file points to is an orphan of a killed run and is deleted on restart.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from typing import IO

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.schema import METADATA_SCHEMA, STATUS_SCHEMA, Sample, shard_unit
from pipeline.storage import Output

REJECT_EXAMPLES = 3  # thumbnails kept per status per unit, for the report
THUMBNAIL_SIDE = 160
REJECTS_SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                            ("url", pa.string()), ("thumbnail", pa.binary())])


def sample_json(sample: Sample) -> dict:
    """KEY.json in the tar: everything about the sample but its bytes and caption file."""
    meta = sample.metadata(shard="")
    meta.pop("shard")
    return meta


def write_tar(f: IO[bytes], samples: list[Sample]) -> None:
    """A webdataset shard is a plain tar of KEY.ext members. Written with tarfile, not webdataset's
    TarWriter: importing webdataset imports torch, ~2 s more start-up for every Ray worker."""
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            members = (("jpg", s.content), ("txt", (s.caption or "").encode()),
                       ("json", json.dumps(sample_json(s)).encode()))
            for extension, data in members:
                info = tarfile.TarInfo(f"{s.key}.{extension}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: reruns give identical tars
                tar.addfile(info, io.BytesIO(data))


def thumbnail(data: bytes) -> bytes | None:
    """A small JPEG of an image, or None when the bytes are no image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            small = image.convert("RGB")
            small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            out = io.BytesIO()
            small.save(out, format="JPEG", quality=85)
            return out.getvalue()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def reject_examples(samples: list[Sample]) -> pa.Table:
    """The first few rejected-but-decoded images of each status, as thumbnails."""
    rows, per_status = [], Counter()
    for s in sorted(samples, key=lambda s: s.key):
        if s.status == "ok" or s.content is None or per_status[s.status] >= REJECT_EXAMPLES:
            continue
        if small := thumbnail(s.content):
            per_status[s.status] += 1
            rows.append({"key": s.key, "status": s.status, "reason": s.reason, "url": s.url, "thumbnail": small})
    return pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)


def commit_unit(output: Output, unit: int, shard: str, samples: list[Sample],
                previous_status: pa.Table | None = None) -> dict[str, int]:
    """Write what passed (pending samples become 'ok'), then the unit's status; returns counts.

    With `previous_status` (a --retry-failed pass), the unit's other rows keep their status.
    """
    written = sorted((s for s in samples if s.pending), key=lambda s: s.key)
    for sample in written:
        sample.status, sample.reason = "ok", None
    if written:
        output.write_atomic(output.shard_path(shard), lambda f: write_tar(f, written))
        output.write_table(output.metadata_path(shard),
                           pa.Table.from_pylist([s.metadata(shard) for s in written], schema=METADATA_SCHEMA))
    examples = reject_examples(samples)
    if examples.num_rows:
        output.write_table(output.path("rejects", f"{shard}.parquet"), examples)
    status = pa.Table.from_pylist([s.status_row(shard) for s in samples], schema=STATUS_SCHEMA)
    if previous_status is not None:
        redone = pa.array([s.input_row for s in samples], pa.int64())
        kept = previous_status.filter(pc.invert(pc.is_in(previous_status["input_row"], redone)))
        status = pa.concat_tables([kept, status]).sort_by("input_row")
    output.write_table(output.status_path(unit), status)
    return dict(Counter(s.status for s in samples))


def referenced_shards(output: Output) -> set[str]:
    """Shards that some committed status file points to."""
    shards: set[str] = set()
    for name in output.list("status", ".parquet"):
        column = output.read_table(output.path("status", name), columns=["shard"])["shard"]
        shards.update(s for s in column.unique().to_pylist() if s)
    return shards


def remove_orphans(output: Output) -> int:
    """Delete shards, metadata and reject examples of units a killed run wrote but never committed."""
    live = referenced_shards(output)
    committed = {shard_unit(name) for name in output.list("status", ".parquet")}
    removed = 0
    for name in output.list("rejects", ".parquet"):
        if shard_unit(name) not in committed:
            output.fs.rm(output.path("rejects", name))
            removed += 1
    for sub, suffix in (("shards", ".tar"), ("metadata", ".parquet")):
        for name in output.list(sub, suffix):
            if name[: -len(suffix)] not in live:
                output.fs.rm(output.path(sub, name))
                removed += 1
    return removed
