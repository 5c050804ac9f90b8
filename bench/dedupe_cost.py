"""The cost half of bench.dedupe_quality: hashes per second on one core, and the near-dedupe
stage's Arrow bytes and candidate comparisons at LAION scale, measured on synthetic hashes."""

from __future__ import annotations

import io
import time
import tracemalloc
from math import comb

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

from bench.dedupe_images import jpeg
from pipeline.build_config import BuildConfig
from pipeline.decode import CROPS, decode_image, phashes
from pipeline.near_buckets import (BANDS, BAND_BITS, CROP_HASHES, INNER_HASHES, band_rows, band_rows_per_item,
                                   bucket_pairs)
from pipeline.near_dedupe import ITEMS_SCHEMA, with_ids, with_partition

PASSES = 25  # a 10M-image build's band passes on a 2-core box (docs/PERFORMANCE.md, global dedupe at scale)


def per_second(fn, seconds: float = 3.0, minimum: int = 20) -> float:
    """Calls per CPU second of this (single-threaded) process: per core, whatever else the machine runs."""
    fn()  # warm-up
    count, start = 0, time.process_time()
    while count < minimum or time.process_time() - start < seconds:
        fn()
        count += 1
    return count / (time.process_time() - start)


def throughput(photos: dict[str, Image.Image], config: BuildConfig) -> dict:
    """Single process, one thread: hashes per second per core."""
    small = photos["astronaut"]  # 512 x 512
    wide = photos["coffee"]  # 600 x 400 -> 512 x 341 when stored
    wide_stored = wide.resize((512, 341), Image.Resampling.LANCZOS)
    big = photos["retina"]  # 1411 x 1411
    bytes_512 = jpeg(small, 95)
    bytes_big = jpeg(big, 90)
    bytes_1600 = jpeg(big.resize((1600, 1600), Image.Resampling.LANCZOS), 90)

    def decode_only(data: bytes) -> None:
        with Image.open(io.BytesIO(data)) as image:
            image.load()

    return {
        "phashes16_decoded_512x512": per_second(lambda: phashes(small)),
        "phashes16_decoded_512x341": per_second(lambda: phashes(wide_stored)),
        "imagehash_phash_decoded_512x512": per_second(lambda: imagehash.phash(small)),
        "imagehash_phash_decoded_512x341": per_second(lambda: imagehash.phash(wide_stored)),
        "dhash_decoded_512x512": per_second(lambda: imagehash.dhash(small)),
        "jpeg_decode_only_512": per_second(lambda: decode_only(bytes_512)),
        "decode_image_512_jpeg_kept": per_second(lambda: decode_image(bytes_512, config)),
        "decode_image_1411_jpeg_reencoded": per_second(lambda: decode_image(bytes_big, config)),
        "decode_image_1600_jpeg_reencoded": per_second(lambda: decode_image(bytes_1600, config)),
    }


def random_hashes(shape: int | tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.integers(-2 ** 63, 2 ** 63 - 1, shape, dtype=np.int64)


def synthetic_items(n: int, rng: np.random.Generator) -> pa.Table:
    keys = [f"{(i // 10000) % 100000:05d}{i:09d}" for i in range(n)]  # make_key's 14 digits
    shards = [f"{(i // 10000):05d}" for i in range(n)]
    crops, inner = (pa.ListArray.from_arrays(pa.array(np.arange(0, n * width + 1, width, dtype=np.int32)),
                                             pa.array(random_hashes(n * width, rng)))
                    for width in (CROP_HASHES, INNER_HASHES))
    return pa.table({"key": keys, "phash": pa.array(random_hashes(n, rng)), "crops": crops, "inner": inner,
                     "area": pa.array(rng.integers(10_000, 4_000_000, n, dtype=np.int64)),
                     "shard": shards, "overlap_set": pa.nulls(n, pa.string())}, schema=ITEMS_SCHEMA)


def neighbours(k: int) -> int:
    """Band values within k // 4 bits of one: those an image's pHash is filed under, per band."""
    return sum(comb(BAND_BITS, r) for r in range(k // BANDS + 1))


def memory_and_comparisons(items_n: int, band_n: int, filed_n: int, seed: int, k: int, ks: list[int]) -> dict:
    """Arrow sizes and comparison counts of the near-dedupe stage at distance k (band rows also for each of ks)."""
    rng = np.random.default_rng(seed)
    items = synthetic_items(items_n, rng)
    per_item_items = items.nbytes / items_n
    sample = items.slice(0, band_n)
    start = time.process_time()
    bands = band_rows(with_ids(sample), k)
    band_seconds = time.process_time() - start
    assert bands.num_rows == band_n * band_rows_per_item(k)
    with_part = with_partition(bands, "bucket", 200)
    numbered = with_ids(sample)
    default_pool = pa.default_memory_pool()
    arrow_pool = pa.proxy_memory_pool(default_pool)  # Arrow's buffers, which tracemalloc does not see
    pa.set_memory_pool(arrow_pool)
    tracemalloc.start()
    try:
        start = time.process_time()
        for which in range(PASSES):  # each pass makes its share of the rows from every item
            band_rows(numbered, k, PASSES, which)
        pass_seconds = (time.process_time() - start) / PASSES
        pass_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(default_pool)
    out = {"k": k, "items_measured": items_n, "band_items_measured": band_n,
           "items_bytes_per_item": per_item_items, "items_GB_per_million": per_item_items * 1e6 / 1e9,
           "band_rows_per_item": {k: band_rows_per_item(k) for k in ks},
           "band_rows_bytes_per_row": bands.nbytes / bands.num_rows,
           "band_rows_bytes_per_item": bands.nbytes / band_n,
           "band_rows_GB_per_million": bands.nbytes / band_n * 1e6 / 1e9,
           "shuffled_GB_per_million": with_part.nbytes / band_n * 1e6 / 1e9,
           "band_rows_seconds_per_million_items": band_seconds / band_n * 1e6,
           f"band_rows_seconds_per_million_items_a_pass_of_{PASSES}": pass_seconds / band_n * 1e6,
           # numpy's peak and Arrow's, each a lower bound of the pass's peak and their sum an upper one
           f"band_rows_peak_GB_per_million_items_a_pass_of_{PASSES}": pass_peak / band_n * 1e6 / 1e9,
           f"band_rows_arrow_peak_GB_per_million_items_a_pass_of_{PASSES}": arrow_pool.max_memory() / band_n * 1e6 / 1e9}
    del bands, with_part

    # One bucket as it would be at 50M images, scaled down: an image is filed under `probes` values
    # per band and looks under 16 (its 16 hashes' exact values), so a bucket holds N / 65536 x probes
    # filed rows and N / 65536 x 16 looking ones: 16 looking rows for every `probes` filed ones.
    n_images = 50_000_000
    occupancy = n_images / 2 ** BAND_BITS
    probes = neighbours(k)
    looking_n = round(filed_n * len(CROPS) / probes)
    template = with_ids(synthetic_items(filed_n + looking_n, rng)).select(["id", "area", "phash"])
    filed = np.arange(template.num_rows) < filed_n
    query = np.where(filed, template["phash"].to_numpy(), random_hashes(template.num_rows, rng))
    bucket = (template.append_column("query", pa.array(query))
              .append_column("filed", pa.array(filed)).append_column("probes", pa.array(~filed))
              .append_column("bucket", pa.array(np.zeros(template.num_rows, np.int64))))
    comparisons = looking_n * filed_n
    timings = []
    for _ in range(3):
        start = time.process_time()
        bucket_pairs(bucket, k)
        timings.append(time.process_time() - start)
    ns_per_comparison = min(timings) / comparisons * 1e9
    per_item = {k: BANDS * len(CROPS) * neighbours(k) * occupancy for k in ks}  # 64 looks x filed per bucket
    total = per_item[k] * n_images
    filed_at_50m, looking_at_50m = occupancy * probes, occupancy * len(CROPS)
    shuffled_gb = out["shuffled_GB_per_million"] * n_images / 1e6
    out["at_50M"] = {
        "images": n_images, "bucket_occupancy_filed": occupancy, "probes_per_band": probes,
        "candidate_comparisons_per_item": per_item, "total_comparisons": total,
        "ns_per_comparison_measured": ns_per_comparison,
        "measured_bucket": {"filed": filed_n, "rows": bucket.num_rows, "seconds": min(timings)},
        "core_hours": total * ns_per_comparison / 1e9 / 3600,
        "rows_in_one_bucket": filed_at_50m + looking_at_50m,
        "comparisons_per_bucket": filed_at_50m * looking_at_50m,
        "band_rows_total": n_images * band_rows_per_item(k),
        "shuffled_TB": shuffled_gb / 1e3,
        "GB_per_groupby_partition_at_200_partitions": shuffled_gb / 200,
    }
    return out
