"""Multi-index hashing of 64-bit pHashes: the band rows of images, and the close pairs in a bucket.

A hash is cut into 4 bands of 16 bits; two hashes within k bits agree within k // 4 bits on at
least one band (pigeonhole). An image is filed under the band values within k // 4 bits of its
pHash's and looks under the exact band values of each of its 16 hashes (band_rows); its inner
part's hashes (decode.INNER) do the same in bands of their own, within INNER_DISTANCE bits. A shuffle
on (band, value) brings the rows of a bucket together, where bucket_pairs checks the full distance.
pipeline.near_dedupe runs these over the whole dataset in passes and names what they find.
"""

from __future__ import annotations

import math
from itertools import combinations

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.decode import CROPS, TURNS

BANDS, BAND_BITS = 4, 16
SPACES = 2  # the whole image's pHash and its crops' (bands 0-3), the inner part's and its turns' (bands 4-7)
REFERENCE_AREA = np.iinfo(np.int64).max  # excluded images outrank every dataset image
CROP_HASHES = len(CROPS) - 1
INNER_HASHES = len(TURNS)
# Inner parts match within this many bits, not k: at 4 bits, four pairs of near-featureless distinct
# images (25-px LFW backgrounds enlarged, dark retina tiles) matched in bench.dedupe_quality instead of one;
# a caption bar leaves a copy's inner part within 0-2 bits of its original's, a turn of 1-5 degrees 98-99 % of copies'.
INNER_DISTANCE = 2
BAND_ROWS_PER_PARTITION = 2_000_000  # a reducer's band rows (~75 MB), whatever the number of images
BAND_ROW_BYTES = 37  # id, area, query, bucket (8 bytes each), part (4), filed and probes
# A bucket with at most this many (filed, looking) pairs is compared with the other small ones in
# numpy, in batches of SMALL_BATCH_PAIRS pairs (~100 MB of temporaries); a larger one by faiss.
# At 4,096 pairs a bucket both cost ~23 ns a pair (faiss's set-up; numpy's gathers).
SMALL_BUCKET_PAIRS, SMALL_BATCH_PAIRS = 4096, 2_000_000
faiss.omp_set_num_threads(1)  # Ray runs a task per CPU: a bucket's search in one thread

# Through the buckets an image is a number (`with_ids`), not its key, shard and set: the band rows,
# 164 per image at k = 6, are what the shuffle moves, and the strings made them 72 bytes a row instead of 36.
ID_PAIRS_SCHEMA = pa.schema([("loser", pa.int64()), ("winner", pa.int64()), ("winner_area", pa.int64()),
                             ("distance", pa.int32()), ("by_inner", pa.bool_())])  # by the inner parts' hashes


def _probe_masks(radius: int) -> np.ndarray:
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in combinations(range(BAND_BITS), r)]
    return np.array(masks, dtype=np.int64)


def inner_distance(k: int) -> int:
    return min(k, INNER_DISTANCE)


def band_rows_per_item(k: int) -> int:
    """An image's band rows at distance k (fewer for one whose inner part is flat)."""
    return BANDS * (len(_probe_masks(k // BANDS)) + CROP_HASHES + len(_probe_masks(inner_distance(k) // BANDS))
                    + INNER_HASHES - 1)


def band_passes(items: int, k: int, budget_bytes: float) -> int:
    """How many passes the band rows of `items` images take: the fewest whose share fits in
    `budget_bytes`. A pass takes whole buckets, so it is a whole decision over them; what it finds is
    a few pairs, not rows to keep."""
    need = items * band_rows_per_item(k) * BAND_ROW_BYTES
    return max(1, math.ceil(need / max(budget_bytes, 1.0)))


def bucket_pass(buckets: np.ndarray, passes: int) -> np.ndarray:
    """The pass of each bucket: a multiplicative hash of it, not `bucket % passes`, which would leave
    a pass's rows in a few of with_partition's `bucket % partitions` partitions."""
    return (buckets.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15) >> np.uint64(40)) % np.uint64(passes)


def band_rows(items: pa.Table, k: int, passes: int = 1, which: int = 0) -> pa.Table:
    """One row per (item, band, value) of the buckets of pass `which` of `passes`. An item is filed
    (`filed`) under the band values within k // 4 bits of its pHash's, and looks (`probes`, with
    `query`) under the exact band values of each of its 16 hashes: a query within k bits of a pHash
    then meets it in some band. Filing the neighbours rather than probing them costs 4 x (17 + 15)
    rows per item at k = 6 instead of 4 x 17 x 16, for the same comparisons. The inner parts' hashes
    are a space of their own, bands 4-7, within inner_distance(k) bits: an item is filed under its
    inner part's band values and looks under those of its turned ones, 4 x 9 rows more at k = 6
    (none for an inner part without detail). A row carries the image's id and area, nothing else
    of it: a filed row's `query` is the hash filed.

    Every pass looks at every item's band values again, so a bucket's pass is looked up in a table
    of all 8 x 2^16 (band, value) buckets, made once a call, and only the pass's rows are built, a
    band at a time: about half the CPU and a sixth of the memory of hashing and keeping all of an
    item's values in every pass (docs/PERFORMANCE.md, global dedupe at scale)."""
    n = items.num_rows
    pass_of = bucket_pass(np.arange(SPACES * BANDS << BAND_BITS, dtype=np.int64),
                          passes).astype(np.int32) if passes > 1 else None
    inner = pc.list_flatten(items["inner"]).to_numpy().reshape(n, INNER_HASHES)
    detailed = np.flatnonzero(inner[:, 0] != 0)  # a flat inner part is hashed as 0 (decode.FLAT_INNER): left out
    whole = _space_rows(items["phash"].to_numpy(), pc.list_flatten(items["crops"]).to_numpy().reshape(n, CROP_HASHES),
                        _probe_masks(k // BANDS), 0, pass_of, which)
    owner, *rest = _space_rows(inner[detailed, 0], inner[detailed, 1:], _probe_masks(inner_distance(k) // BANDS), BANDS,
                               pass_of, which)
    owner, query, filed, probes, bucket = (np.concatenate(column) for column in zip(whole, (detailed[owner], *rest)))
    return items.select(["id", "area"]).take(pa.array(owner)).append_column(
        "query", pa.array(query, pa.int64())).append_column("filed", pa.array(filed)).append_column(
        "probes", pa.array(probes)).append_column("bucket", pa.array(bucket, pa.int64()))


def _space_rows(plain: np.ndarray, looks: np.ndarray, masks: np.ndarray, first_band: int, pass_of: np.ndarray | None,
                which: int) -> tuple[np.ndarray, ...]:
    """(owner, query, filed, probes, bucket) of one space's rows in pass `which`: each item filed
    under the band values of `plain` xor `masks`, and looking under those of `plain` and `looks`."""
    n = len(plain)
    width = len(masks) + looks.shape[1]  # an item's rows a band: filed under each neighbour, then looking by each
    filed = np.arange(width) < len(masks)
    probes = ~filed | np.r_[masks == 0, np.zeros(looks.shape[1], bool)]  # the filed hash's exact value probes too
    flat, bucket = [], []
    values = np.empty((n, width), np.int64)
    for band in range(BANDS):
        shift = np.uint64(band * BAND_BITS)
        values[:, :len(masks)] = ((plain.view(np.uint64) >> shift) & np.uint64(0xFFFF)).astype(np.int64)[:, None] ^ masks
        values[:, len(masks):] = (looks.view(np.uint64) >> shift) & np.uint64(0xFFFF)
        first = (first_band + band) << BAND_BITS
        taken = np.flatnonzero(pass_of[first:][values] == which) if pass_of is not None else np.arange(n * width)
        flat.append(taken), bucket.append(first | values.ravel()[taken])
    flat = np.concatenate(flat)
    owner, column = np.divmod(flat, width)
    query = np.where(filed[column], plain[owner], looks[owner, np.maximum(column - len(masks), 0)])
    return owner, query, filed[column], probes[column], np.concatenate(bucket)


def _small_bucket_pairs(bucket_of: np.ndarray, filed_rows: np.ndarray, look_rows: np.ndarray, codes: np.ndarray,
                        limit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(looking row, filed row, distance) of every pair within its row's `limit` bits in small
    buckets, all buckets at once: `filed_rows` and `look_rows` ascending (so grouped by bucket),
    `bucket_of` each row's bucket. A faiss index per bucket costs ~100 us of set-up, which on web
    input (thousands of buckets holding a few similar photos each) was most of the near dedupe's time."""
    filed_buckets, look_buckets = bucket_of[filed_rows], bucket_of[look_rows]
    first_filed = np.searchsorted(filed_buckets, look_buckets)  # where each look's bucket's filed rows start
    partners = np.searchsorted(filed_buckets, look_buckets, side="right") - first_filed
    found = []
    for lo, hi in _chunks(np.cumsum(partners), SMALL_BATCH_PAIRS):
        rep = partners[lo:hi]
        looking = np.repeat(look_rows[lo:hi], rep)
        offset = np.arange(len(looking)) - np.repeat(np.cumsum(rep) - rep, rep)
        filed = filed_rows[np.repeat(first_filed[lo:hi], rep) + offset]
        distance = np.bitwise_count(codes[looking] ^ codes[filed])
        close = distance <= limit[looking]
        found.append((looking[close], filed[close], distance[close].astype(np.int32)))
    return tuple(np.concatenate(column) for column in zip(*found)) if found else _no_pairs()


def _chunks(ends: np.ndarray, size: int) -> list[tuple[int, int]]:
    """[lo, hi) slices of the items whose cumulative counts are `ends`, about `size` counts each."""
    if not len(ends):
        return []
    cuts = np.searchsorted(ends, np.arange(size, ends[-1], size), side="left") + 1
    bounds = np.unique(np.r_[0, cuts, len(ends)])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _no_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.array([], np.int64), np.array([], np.int64), np.array([], np.int32)


def _no_item_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (*_no_pairs(), np.array([], bool))


def _close_pairs(rows: pa.Table, item: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(looking item, filed item, smallest distance, whether by inner parts) of every pair where a
    query of one is within k bits (inner_distance(k) in the inner parts' bands) of the other's hash
    filed in the same bucket; `rows` sorted by bucket, `item` their images numbered from 0. A filed
    row's query is the hash filed. Small buckets are compared together in numpy
    (_small_bucket_pairs); a large one by faiss's binary range search: its popcount kernel
    costs ~0.5 ns a pair, numpy's batches ~18 ns with their gathers, and a bucket's pairs grow with
    the square of the images."""
    buckets, filed, looks = rows["bucket"].to_numpy(), rows["filed"].to_numpy(False), rows["probes"].to_numpy(False)
    inner_row = buckets >> BAND_BITS >= BANDS  # a row's space: its bucket's band
    limit = np.where(inner_row, inner_distance(k), k)
    query = rows["query"].to_numpy()
    codes = query.view(np.uint8).reshape(-1, 8)  # a hash as faiss's 8-byte binary code
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    stops = np.r_[starts[1:], len(buckets)]
    # only buckets where something is filed, something looks and two images meet, found at once:
    # most buckets hold one image's rows, and a Python turn each cost more than their comparisons
    filed_count, look_count = np.add.reduceat(filed, starts).astype(np.int64), np.add.reduceat(looks, starts)
    meet = (filed_count > 0) & (look_count > 0) & (np.minimum.reduceat(item, starts) != np.maximum.reduceat(item, starts))
    small = meet & (filed_count * look_count <= SMALL_BUCKET_PAIRS)
    bucket_of = np.repeat(np.arange(len(starts)), stops - starts)
    in_small = small[bucket_of]
    rows_found = [_small_bucket_pairs(bucket_of, np.flatnonzero(filed & in_small), np.flatnonzero(looks & in_small),
                                      query.view(np.uint64), limit)]
    for start, stop in zip(starts[meet & ~small], stops[meet & ~small]):
        f, q = start + np.flatnonzero(filed[start:stop]), start + np.flatnonzero(looks[start:stop])
        index = faiss.IndexBinaryFlat(64)
        index.add(codes[f])
        limits, distance, nearest = index.range_search(codes[q], int(limit[start]) + 1)  # below, as float32
        rows_found.append((np.repeat(q, np.diff(limits).astype(np.int64)), f[nearest], distance.astype(np.int32)))
    looking, filed_item, distance = (np.concatenate(column) for column in zip(*rows_found))
    by_inner, looking, filed_item = inner_row[looking], item[looking], item[filed_item]
    other = looking != filed_item
    looking, filed_item, distance, by_inner = looking[other], filed_item[other], distance[other], by_inner[other]
    if not looking.size:
        return _no_item_pairs()
    pair = looking * (item.max() + 1) + filed_item  # a pair meets in many buckets: keep it once, closest
    order = np.lexsort((by_inner, distance, pair))  # at equal distance, the whole-image hashes' match
    first = order[np.flatnonzero(np.r_[True, pair[order][1:] != pair[order][:-1]])]
    return looking[first], filed_item[first], distance[first], by_inner[first]


def bucket_pairs(rows: pa.Table, k: int) -> pa.Table:
    """The best winner (ID_PAIRS_SCHEMA) of every loser that the buckets in `rows` (one shuffle
    partition) reveal.

    Either image of a close pair may win (a crop hash finds the pair from one side only): the
    larger one, then the smaller id (key). A pair shows up in several buckets and through several
    of an image's hashes: each pair is kept once (at its closest) in numpy, and best_winners reduces
    them to one row per loser here, before anything is shuffled again, and across partitions later."""
    if rows.num_rows == 0:
        return ID_PAIRS_SCHEMA.empty_table()
    rows = rows.sort_by("bucket")
    ids, first, item = np.unique(rows["id"].to_numpy(), return_index=True, return_inverse=True)
    a, b, distance, by_inner = _close_pairs(rows, item, k)  # items numbered in id order: smaller number, smaller id
    area = rows["area"].to_numpy()[first]
    a_wins = (area[a] > area[b]) | ((area[a] == area[b]) & (a < b))
    loser, winner = np.where(a_wins, b, a), np.where(a_wins, a, b)
    keep = area[loser] != REFERENCE_AREA  # excluded images are never removed
    loser, winner, distance, by_inner = loser[keep], winner[keep], distance[keep], by_inner[keep]
    return best_winners(pa.table({"loser": ids[loser], "winner": ids[winner], "winner_area": area[winner],
                                  "distance": distance.astype(np.int32), "by_inner": by_inner}, schema=ID_PAIRS_SCHEMA))


def best_winners(pairs: pa.Table) -> pa.Table:
    """One ID_PAIRS_SCHEMA row per loser: an excluded image if any (the closest), else the
    highest-priority winner."""
    if pairs.num_rows == 0:
        return ID_PAIRS_SCHEMA.empty_table()
    pairs = pairs.select(ID_PAIRS_SCHEMA.names)
    not_overlap = pc.not_equal(pairs["winner_area"], REFERENCE_AREA)  # only excluded images have that area
    rank = pc.if_else(not_overlap, pc.negate(pairs["winner_area"]), pc.cast(pairs["distance"], pa.int64()))
    ranked = pairs.append_column("not_overlap", not_overlap).append_column("rank", rank).sort_by(
        [(column, "ascending") for column in ("loser", "not_overlap", "rank", "winner", "distance", "by_inner")])
    losers = ranked["loser"].to_numpy()
    return ranked.take(pa.array(np.flatnonzero(np.r_[True, losers[1:] != losers[:-1]]))).select(ID_PAIRS_SCHEMA.names)
