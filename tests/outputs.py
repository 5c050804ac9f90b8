"""Shared by the end-to-end tests: a server of real photos, LAION-format input files, and a build's
output read back raw."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from demo.data import make_demo_images
from demo.server import ImageServer

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def photo_server() -> Iterator[ImageServer]:
    """The demo's distinct real photos (faces and non-faces) at /p/0, /p/1, ...; `photos` lists
    (path, image), and the server's fault paths come with it."""
    with ImageServer(stall_seconds=30) as srv:
        srv.photos = []
        for i, image in enumerate(make_demo_images(seed=1)):
            srv.add(f"/p/{i}", image.data, image.content_type)
            srv.photos.append((f"/p/{i}", image))
        yield srv


def laion_parquet(path: Path, urls: list[str], **extra_columns) -> Path:
    n = len(urls)
    pq.write_table(pa.table({
        "SAMPLE_ID": pa.array(range(1000, 1000 + n), pa.int64()), "URL": urls,
        "TEXT": [f"caption {i}" for i in range(n)], "WIDTH": [512] * n, "HEIGHT": [512] * n,
        "LICENSE": ["?"] * n, "NSFW": ["UNLIKELY"] * n, "similarity": [0.3] * n, **extra_columns,
    }), path, row_group_size=7)
    return path


def status_table(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "status").glob("*.parquet")))


def metadata_table(out: Path) -> pa.Table:
    files = sorted((out / "metadata").glob("*.parquet"))
    return pa.concat_tables(pq.read_table(p) for p in files) if files else None


def tar_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over every shard, asserting no key is in two shards."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted((out / "shards").glob("*.tar")):
        seen_here: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                seen_here.setdefault(key, {})[ext] = tar.extractfile(member).read()
        assert not set(seen_here) & set(samples), f"a key is in two shards ({path.name})"
        samples.update(seen_here)
    return samples


def check_consistent(out: Path, input_rows: int) -> tuple[pa.Table, pa.Table, dict]:
    """The cross-checks every build must pass; returns (status, metadata, tar samples)."""
    status = status_table(out)
    rows = list(zip(status["input_file"].to_pylist(), status["input_row"].to_pylist()))
    assert len(rows) == input_rows and len(set(rows)) == input_rows, "every input row exactly once"
    metadata = metadata_table(out)
    samples = tar_samples(out)
    ok_keys = sorted(k for k, s in zip(status["key"].to_pylist(), status["status"].to_pylist()) if s == "ok")
    assert ok_keys == sorted(metadata["key"].to_pylist()) == sorted(samples)
    assert all(set(s) == {"jpg", "txt", "json"} for s in samples.values())
    for row in metadata.to_pylist():
        sample = samples[row["key"]]
        meta = json.loads(sample["json"])
        assert meta["url"] == row["url"] and meta["sha256"] == row["sha256"] and len(meta["faces"]) == row["num_faces"]
        assert sample["txt"].decode() == (row["caption"] or "")
    assert len(set(metadata["sha256"].to_pylist())) == metadata.num_rows, "no image twice"
    assert len(set(metadata["url"].to_pylist())) == metadata.num_rows, "no URL twice"
    by_shard: dict[str, int] = {}
    for shard in metadata["shard"].to_pylist():
        by_shard[f"{shard}.tar"] = by_shard.get(f"{shard}.tar", 0) + 1
    assert json.loads((out / "sizes.json").read_text()) == by_shard
    assert json.loads((out / "shards" / "sizes.json").read_text()) == by_shard
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == sorted(by_shard)
    assert not list(out.rglob("*.tmp-*")), "no temporary file left"
    return status, metadata, samples


VOLATILE_STATS = ("finished_at", "seconds", "stage_seconds", "rows_per_second")  # clock readings


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of each member, in the shard's order."""
    with tarfile.open(path) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar]


def assert_same_output(out: Path, reference: Path) -> None:
    """`out` holds what `reference`, a build of the same input with the same settings, holds: the
    same files, each shard's members in the same order with the same bytes, the same rows in every
    table, the same totals. Only clock readings may differ: stats.json's, and the report's page and
    plots, whose names are compared but not their bytes."""
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file())
    for name in files:
        ours, theirs = out / name, reference / name
        if name.endswith(".tar"):
            assert tar_members(ours) == tar_members(theirs), name
        elif name.endswith(".parquet"):
            assert pq.read_table(ours).equals(pq.read_table(theirs), check_metadata=True), name
        elif name == "stats.json":
            ours_stats, theirs_stats = json.loads(ours.read_text()), json.loads(theirs.read_text())
            for stats in (ours_stats, theirs_stats):
                for key in VOLATILE_STATS:
                    stats["last_run"].pop(key)
            assert ours_stats == theirs_stats
        elif name.endswith(".json"):
            assert json.loads(ours.read_text()) == json.loads(theirs.read_text()), name
        else:
            assert name.startswith("report/"), f"{name}: a file no build writes"


CLAIM_AT = textwrap.dedent("""
    import sys, time
    from pipeline.config import ConfigError
    from pipeline.lock import OutputLock
    from pipeline.storage import Output
    url, start = sys.argv[1], float(sys.argv[2])
    output = Output(url)
    time.sleep(max(0.0, start - time.time()))
    try:
        lock = OutputLock.claim(output, 60)
        lock.confirm()
    except ConfigError as err:
        print("refused", err, flush=True)
    else:
        print("holds", flush=True)
        sys.stdin.read()  # held until every claimant has said how it fared
        lock.release()
""")


def race_for(url: str, claimants: int = 2) -> list[str]:
    """Start `claimants` processes that claim url's lock at the same instant; what each said."""
    start = time.time() + 2  # after every interpreter has started (a late one meets a held lock all the same)
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_AT, url, str(start)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(claimants)]
    said = [proc.stdout.readline() for proc in procs]
    results = [proc.communicate(timeout=60) for proc in procs]  # closes stdin: the holder releases
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in results]
    return sorted(line.split()[0] if line else "nothing" for line in said)
