"""`python -m bench.dedupe_scale`: the global image dedupes (exact and near) at LAION size.

Generates metadata rows of downloaded images (the columns the dedupes read, METADATA_SCHEMA's types;
one Parquet file per 100k rows) with planted copies whose answer is known: exact byte copies, near
copies a few pHash bits away at a smaller size, and popular images copied 50-200 times. Then runs
the two decisions a build takes after downloading, exactly as the builder calls them, on a Ray
Dataset (so always Ray's shuffle path, even below dedupe.LOCAL_ROWS). Each (size, stage) runs in a
fresh process, which reports its wall time, its own peak RSS (the driver's), its Ray workers' peaks
sampled from /proc every 0.2 s, and the recall of the planted copies.

    python -m bench.dedupe_scale --sizes 1000000,10000000 --stages exact,near --data /tmp/dedupe-meta \
        --out out/bench/dedupe_scale.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bench.machine_load import MemorySampler
from pipeline.decode import TURNS
from pipeline.schema import METADATA_SCHEMA, make_key

ROWS_PER_FILE = 100_000  # one metadata Parquet file per ~100k rows
ROWS_PER_UNIT = 10_000  # one shard per unit of 10,000 rows, as a LAION-size build plans them
ROWS_PER_INPUT = 1_000_000  # the key's file digits: LAION ships 1M-row part files
CENTRES = 4096  # real pHashes cluster (faces, product shots, text): images are a centre plus noise
EXACT_SHARE, NEAR_SHARE = 0.01, 0.02  # rows that are an exact / a near copy of an earlier image
CLUSTER_STRIDE, CLUSTER_SIZES = 20_000, (50, 200)  # a popular image per 20k rows, copied 50-200 times
CLUSTER_EXACT_SHARE = 0.3  # of a popular image's copies, byte-identical (the rest re-encoded/resized)
K = 6  # BuildConfig.near_duplicate_distance's default
TOP = np.uint64(1 << 63)  # pHash's top bit is the DC term, above the median on nearly every photo
KINDS = ["background", "exact", "near", "cluster_exact", "cluster_near"]
COLUMNS = ["key", "shard", "original_width", "original_height", "sha256", "phash", "phash_crops", "phash_inner"]
SCHEMA = pa.schema([METADATA_SCHEMA.field(name) for name in COLUMNS], metadata=METADATA_SCHEMA.metadata)
STAGE_COLUMNS = {"exact": ["key", "sha256", "shard"],  # the columns the builder's two dedupes read
                 "near": ["key", "phash", "phash_crops", "phash_inner", "original_width", "original_height", "shard"]}


def mix(ids: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of (id, salt): every value of a row is a function of its index, so a copy can
    recompute its original's hashes in whichever file the original lies, without holding them."""
    z = ids.astype(np.uint64) + np.uint64((salt * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2 ** 64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def flips(ids: np.ndarray, low: int, high: int, salt: int) -> np.ndarray:
    """A mask of low..high distinct random bits among the 63 below the top one, per id."""
    want = low + mix(ids, salt) % np.uint64(high - low + 1)
    mask, step = np.zeros(len(ids), np.uint64), 0
    while (short := np.bitwise_count(mask) < want).any():
        bit = np.uint64(1) << (mix(ids, salt * 1000 + step) % np.uint64(63))
        mask |= np.where(short, bit, np.uint64(0))
        step += 1
    return mask


def crop_hashes(phash: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """15 crop pHashes per image, each its pHash with 2-8 bits flipped (a 2% crop moves a few bits)."""
    crop_ids = ids[:, None].astype(np.uint64) * np.uint64(16) + np.arange(1, 16, dtype=np.uint64)
    return phash[:, None] ^ flips(crop_ids.ravel(), 2, 8, salt=4).reshape(-1, 15)


def inner_hashes(inner: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """An image's inner part's pHash, then its turned ones (decode.TURNS), each 2-8 bits from it."""
    turns = len(TURNS) - 1
    turn_ids = ids[:, None].astype(np.uint64) * np.uint64(16) + np.arange(1, turns + 1, dtype=np.uint64)
    return np.c_[inner, inner[:, None] ^ flips(turn_ids.ravel(), 2, 8, salt=14).reshape(-1, turns)]


def background(ids: np.ndarray) -> dict[str, np.ndarray]:
    """An unrelated image: a centre with each bit flipped with p = 1/4 (~16 bits), so two images
    of one centre differ in ~24 bits, rarely within K, yet band values are unevenly filled."""
    centre = mix(np.arange(CENTRES), 100)[mix(ids, 1) % np.uint64(CENTRES)]
    phash = (centre ^ (mix(ids, 2) & mix(ids, 3))) | TOP
    inner = (mix(np.arange(CENTRES), 101)[mix(ids, 11) % np.uint64(CENTRES)] ^ (mix(ids, 12) & mix(ids, 13))) | TOP
    return {"phash": phash, "crops": crop_hashes(phash, ids), "inner": inner_hashes(inner, ids), "sha": np.stack([mix(ids, s) for s in range(5, 9)], 1),
            "width": (200 + mix(ids, 9) % np.uint64(1849)).astype(np.int32),
            "height": (200 + mix(ids, 10) % np.uint64(1849)).astype(np.int32)}


def copy_kind(ids: np.ndarray) -> np.ndarray:
    """Index into KINDS per row; a pure function of the index, so an original's kind is known anywhere."""
    share = (mix(ids, 20) >> np.uint64(11)) * 2.0 ** -53
    kind = np.select([share < EXACT_SHARE, share < EXACT_SHARE + NEAR_SHARE], [1, 2], 0)
    popular = ids // CLUSTER_STRIDE * CLUSTER_STRIDE
    members = CLUSTER_SIZES[0] + mix(popular, 21) % np.uint64(CLUSTER_SIZES[1] - CLUSTER_SIZES[0] + 1)
    member = mix(ids, 22) % np.uint64(CLUSTER_STRIDE) < members  # ~50-200 of the 20k rows after it
    kind = np.where(member, np.where(mix(ids, 23) % np.uint64(10) < 10 * CLUSTER_EXACT_SHARE, 3, 4), kind)
    kind[(ids % CLUSTER_STRIDE == 0) | (ids < 1000)] = 0  # popular images, and rows with little to copy yet
    return kind


def originals(ids: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Each copy's original: an earlier background row drawn at random (redrawn until it is one:
    copies of copies would blur the answer), or its popular image; -1 for background rows. A copy
    left without one becomes background in `kind`."""
    original = np.where(kind >= 3, ids // CLUSTER_STRIDE * CLUSTER_STRIDE, -1)
    for attempt in range(40):
        todo = np.flatnonzero((original < 0) & (kind > 0))
        if not todo.size:
            break
        pick = (mix(ids[todo], 30 + attempt) % ids[todo].astype(np.uint64)).astype(np.int64)
        ok = copy_kind(pick) == 0
        original[todo[ok]] = pick[ok]
    kind[original < 0] = 0  # no background row in 40 draws: p < 1e-40
    return original


def part_tables(first: int, rows: int) -> tuple[pa.Table, pa.Table]:
    """(metadata rows, their planted copies as (key, original, kind)) of rows first..first+rows."""
    ids = np.arange(first, first + rows, dtype=np.int64)
    kind = copy_kind(ids)
    original = originals(ids, kind)
    values = background(ids)
    copies = np.flatnonzero(kind > 0)
    source = background(original[copies])
    exact = np.isin(kind[copies], (1, 3))
    for name in values:  # same bytes: every column but the key is the original's
        values[name][copies[exact]] = source[name][exact]
    near, near_ids = copies[~exact], ids[copies[~exact]]
    # a near copy: the original's pHash 1-5 bits away (within K), its inner part's 0-2, its own crops, turns
    # and bytes, and a smaller picture (50-95% of each side) so that the original, the larger one, is kept
    values["phash"][near] = source["phash"][~exact] ^ flips(near_ids, 1, 5, salt=40)
    values["crops"][near] = crop_hashes(values["phash"][near], near_ids)
    values["inner"][near] = inner_hashes(source["inner"][~exact, 0] ^ flips(near_ids, 0, 2, salt=42), near_ids)
    scale = 0.5 + 0.45 * (mix(near_ids, 41) >> np.uint64(11)) * 2.0 ** -53
    for side in ("width", "height"):
        values[side][near] = np.floor(source[side][~exact] * scale).astype(np.int32)
    keys = keys_of(ids)
    crops, inner = (pa.ListArray.from_arrays(pa.array(np.arange(0, width * rows + 1, width, dtype=np.int32)),
                                             hex_strings(values[name].reshape(-1, 1)))
                    for name, width in (("crops", 15), ("inner", len(TURNS))))
    table = pa.table({"key": keys, "shard": [f"{i // ROWS_PER_UNIT:05d}" for i in ids.tolist()],
                      "original_width": values["width"], "original_height": values["height"],
                      "sha256": hex_strings(values["sha"]), "phash": hex_strings(values["phash"][:, None]),
                      "phash_crops": crops, "phash_inner": inner}, schema=SCHEMA)
    truth = pa.table({"key": keys_of(ids[copies]), "original": keys_of(original[copies]),
                      "kind": np.array(KINDS)[kind[copies]]})
    return table, truth


def keys_of(ids: np.ndarray) -> list[str]:
    return [make_key(i // ROWS_PER_INPUT, i % ROWS_PER_INPUT) for i in ids.tolist()]


def hex_strings(words: np.ndarray) -> pa.Array:
    """Rows of uint64 words -> lower-case hex strings, 16 digits a word (as decode.phashes writes them)."""
    offsets = np.arange(0, words.size * 16 + 1, 16 * words.shape[1], dtype=np.int32)
    data = words.astype(">u8").tobytes().hex().encode()  # big-endian: the first digit is the top bits
    return pa.StringArray.from_buffers(len(words), pa.py_buffer(offsets), pa.py_buffer(data))


def generate(folder: Path, rows: int) -> None:
    """folder/metadata/part-*.parquet and folder/truth/part-*.parquet, written once and reused: a
    part is complete when its metadata file exists (written last, each through a tmp file and rename)."""
    for sub in ("metadata", "truth"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index, first in enumerate(range(0, rows, ROWS_PER_FILE)):
        path = folder / "metadata" / f"part-{index:05d}.parquet"
        if path.exists() and pq.read_schema(path).equals(SCHEMA, check_metadata=True):
            continue  # a part of another schema or pHash version is made again
        table, truth = part_tables(first, min(ROWS_PER_FILE, rows - first))
        for target, data in ((folder / "truth" / path.name, truth), (path, table)):
            tmp = target.with_suffix(".tmp")
            pq.write_table(data, tmp)
            tmp.rename(target)


def start_ray() -> None:
    """Ray as the builder sets it up (pipeline.build.start_ray and configure_ray_data), all CPUs,
    and warm: a build's workers are long started when its dedupes run."""
    import ray

    from pipeline.build import configure_ray_data

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, configure_logging=True)
    configure_ray_data(progress_bars=False)

    def imports(batch: dict) -> dict:
        import pipeline.near_dedupe  # noqa: F401  (what build's _warm_up has each worker import)
        return batch

    ray.data.range(2 * os.cpu_count()).map_batches(imports).materialize()


def run_once(folder: Path, rows: int, stage: str) -> dict:
    """One stage over the generated rows, in this process (started fresh by `measure`)."""
    import ray
    from pipeline import dedupe, near_dedupe

    start_ray()
    partitions = -(-rows // ROWS_PER_UNIT)  # the builder passes the number of shards (metadata files)
    written = ray.data.read_parquet(str(folder / "metadata"), file_extensions=["parquet"]).select_columns(
        STAGE_COLUMNS[stage])  # as dedupe.written_samples reads them past LOCAL_ROWS
    workers = MemorySampler()
    workers.start()
    started = time.time()
    if stage == "exact":
        losers = dedupe.find_duplicates(dedupe.map_tables(written, dedupe.with_unit), "sha256", partitions)
    else:
        items = dedupe.map_tables(written, near_dedupe._written_items)
        losers = near_dedupe.find_near_duplicates(items, K, partitions)
    losers = dedupe.materialize(losers)
    seconds = time.time() - started
    worker_peaks = workers.finish().ray_worker_peaks()
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before scoring adds its own
    found = pa.concat_tables(ray.get(losers.to_arrow_refs())).to_pandas()
    truth = pq.read_table(folder / "truth").to_pandas()
    return {"wall_s": round(seconds, 1), "driver_peak_rss_mb": round(driver_peak),
            **worker_peaks,
            "partitions": partitions, **score(stage, found, truth)}


def score(stage: str, found: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """Recall of the planted copies a stage must find; wrong winners: found copies kept for an
    image outside their cluster (exact: duplicate_of, near: winner; a cluster is an original and
    its copies); accidental: losers nobody planted."""
    cluster = dict(zip(truth["key"], truth["original"]))  # a copy's cluster is its original's key
    winners = found.set_index("key")["duplicate_of" if stage == "exact" else "winner"]
    out = {"losers": len(found), "accidental": int((~found["key"].isin(cluster.keys())).sum()), "wrong_winner": 0}
    for name in ("exact", "near") if stage == "near" else ("exact",):  # near finds exact copies too
        planted = truth[truth["kind"].isin([name, f"cluster_{name}"])]
        hit = planted[planted["key"].isin(winners.index)]
        kept = winners.loc[hit["key"]].map(lambda key: cluster.get(key, key)).to_numpy()
        out[f"{name}_planted"], out[f"{name}_recall"] = len(planted), round(len(hit) / max(1, len(planted)), 6)
        out["wrong_winner"] += int((kept != hit["original"].to_numpy()).sum())
    return out


def measure(rows: int, data: Path, stage: str) -> dict:
    """One stage at one size in a fresh process (its own peak RSS, its own Ray); a failure (the near
    stage out of memory at 10M, say) is reported in place of the numbers, and the next runs."""
    folder, started = data / f"rows-{rows}", time.time()
    generate(folder, rows)
    out = {"rows": rows, "stage": stage, "generate_s": round(time.time() - started, 1)}
    command = [sys.executable, "-m", "bench.dedupe_scale", "--once", stage, "--data", str(folder), "--sizes", str(rows)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        return {**out, "error": result.stderr[-3000:] or f"exit status {result.returncode}"}
    return {**out, **json.loads(result.stdout.strip().splitlines()[-1])}


TABLE = [("rows", "rows", 9), ("stage", "stage", 5), ("wall s", "wall_s", 7), ("driver MB", "driver_peak_rss_mb", 9),
         ("worker MB", "worker_peak_rss_mb", 9), ("w. anon MB", "worker_peak_anon_mb", 10),
         ("all anon MB", "worker_peak_anon_total_mb", 11), ("losers", "losers", 8), ("exact rec.", "exact_recall", 10),
         ("near rec.", "near_recall", 9), ("wrong win", "wrong_winner", 9), ("accidental", "accidental", 10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="comma-separated row counts")
    parser.add_argument("--stages", default="exact,near",
                        help="exact, near or both (near shuffles near_buckets.band_rows_per_item rows an image)")
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "dedupe-meta"),
                        help="folder for the generated rows, one subfolder per size (kept for reruns)")
    parser.add_argument("--out", help="also write the results to this JSON file")
    parser.add_argument("--once", choices=["exact", "near"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once:
        print(json.dumps(run_once(Path(args.data), int(args.sizes), args.once)))
        return
    results = [measure(int(size), Path(args.data), stage)
               for size in args.sizes.split(",") for stage in args.stages.split(",")]
    print(" ".join(f"{header:>{width}}" for header, _, width in TABLE))
    for r in results:
        print(" ".join(f"{r.get(column, '-')!s:>{width}}" for _, column, width in TABLE)
              + (f" failed: {r['error'].strip().splitlines()[-1]}" if "error" in r else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
