"""Near-duplicates and benchmark decontamination, global, by multi-index hashing of 64-bit pHashes.

Every image has its pHash and the pHashes of 15 crops of itself (2% off one to four sides:
decode.phashes). Two images are near-duplicates when the pHash of one is within k bits
(`near_duplicate_distance`) of any of the other's 16: so a copy cropped by a few per cent is
caught, which its own pHash alone misses (docs/PERFORMANCE.md). Or when the pHash of one's inner
part is within near_buckets.INNER_DISTANCE bits of the other's inner part's, as it is or turned:
so a copy with a caption bar, or turned a few degrees, is caught too. To find every such pair without
comparing all pairs, each hash is cut into 4 bands of 16 bits: two hashes within k bits agree
within r = k // 4 bits on at least one band (pigeonhole). Every image is filed under the band
values within r bits of its pHash's and looks under the exact band values of each of its 16
hashes; a Ray Data groupby on (band, value) brings candidates together, where the full distance
is checked (pipeline.near_buckets makes the band rows and compares a bucket). No process ever
holds every hash, and no shuffle every band row: the buckets go through in as many passes as the
object store needs, each in partitions of at most ~2M rows, so a reducer's rows and a pass's
share of the object store stay bounded as the images grow (the comparisons do not: a bucket's
occupancy grows with the images). Images with all the same hashes (a photo served at many URLs)
are found first, by a groupby on the pHash: only the best of them is compared, and the others
lose to it or inherit its winner, so copies cost rows, not pairs of rows.

The kept copy is deterministic: the larger image (original pixels), then the smaller key. An
image is removed when any image of higher priority is near it as above. Images of the
--exclude-images sets (pipeline.exclusions, and their mirrors) always win, and what they catch is
a `benchmark_overlap` instead of a `near_duplicate`. pipeline.face_overlaps compares faces with
the excluded ones' by an index of the latter.
"""

from __future__ import annotations

import math
from hashlib import blake2b

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.decode import CROPS
from pipeline.dedupe import (REMOVED_SCHEMA, Rows, by_group, count, map_tables, materialize, unit_partitions,
                             written_samples)
from pipeline.exclusions import exclusion_rows
from pipeline.near_buckets import (BAND_ROWS_PER_PARTITION, CROP_HASHES, INNER_HASHES, REFERENCE_AREA, band_passes,
                                   band_rows, band_rows_per_item, best_winners, bucket_pairs)
from pipeline.storage import Output

# Ray's pull-based sort shuffle keeps a reference in the driver per (input block, partition), a few
# KB each, and pieces under 100 KB in full: the naming shuffles, after passes that leave many small
# blocks, held 6.8 GB in a 10M-image driver. So their inputs and partitions are ~64 MB each.
NAMING_BYTES = 64 << 20
# In the driver, a pass's band rows (1.8M at most), not all of them at once; and a pass
# reuses much of what the last one freed instead of faulting in fresh pages, which are slow to touch
# on some VMs (100,000 images: 30 s and 1.2 GB in one pass, 11 s and 0.27 GB in ten; 14,000 web
# images in a build: 4.3-5.0 s in one, 1.7-2.9 s in two)
LOCAL_PASS_BYTES = 64 << 20

ITEMS_SCHEMA = pa.schema([("key", pa.string()), ("phash", pa.int64()), ("crops", pa.list_(pa.int64())),
                          ("inner", pa.list_(pa.int64())),
                          ("area", pa.int64()), ("shard", pa.string()), ("overlap_set", pa.string())])
PAIRS_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("winner", pa.string()),
                          ("winner_area", pa.int64()), ("distance", pa.int32()), ("by_inner", pa.bool_()),
                          ("overlap_set", pa.string())])
# Names and id pairs meet in one shuffle (by the id to name): name rows fill id..overlap_set, pair rows the rest.
LINK_SCHEMA = pa.schema([("id", pa.int64()), ("key", pa.string()), ("shard", pa.string()), ("overlap_set", pa.string()),
                         ("loser", pa.int64()), ("loser_key", pa.string()), ("loser_shard", pa.string()),
                         ("winner", pa.int64()), ("winner_area", pa.int64()), ("distance", pa.int32()),
                         ("by_inner", pa.bool_())])


def hex_to_int64(hashes: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """16-hex-digit pHashes -> the same 64 bits as signed int64 (Arrow has no uint64 groupby keys),
    all at once: a Python call per hash cost ~1.7 s per 100k images with their crops."""
    digits = hashes if isinstance(hashes, list) else hashes.to_pylist()
    joined = "".join(digits)
    if len(joined) != 16 * len(digits):  # one short hash would shift every later one
        raise ValueError("a pHash is not 16 hex digits")
    return np.frombuffer(bytes.fromhex(joined), dtype=">u8").astype(np.uint64).view(np.int64)


def with_ids(items: pa.Table) -> pa.Table:
    """Adds `id`: a dataset key's number (make_key's digits, so ids order as keys do), or for an
    excluded image (its key a path) a negative 63-bit hash of the path, which no process has to hand
    out and which collides with odds of ~n^2 / 2^64 among n excluded images."""
    keys = items["key"].to_pylist()
    ids = np.array([int(key) if key.isdigit() else -1 - (int.from_bytes(blake2b(key.encode(), digest_size=8).digest(),
                                                                          "little") >> 1) for key in keys], np.int64)
    return items.append_column("id", pa.array(ids, pa.int64()))


def link_rows(table: pa.Table, by: str, partitions: int) -> pa.Table:
    """LINK_SCHEMA rows of names (an item's id, key, shard, set) or of id pairs, in the part of `by`."""
    columns = {field.name: table[field.name] if field.name in table.column_names else pa.nulls(table.num_rows, field.type)
               for field in LINK_SCHEMA}
    return with_partition(pa.table(columns, schema=LINK_SCHEMA), by, partitions)


def _names_and_pairs(linked: pa.Table) -> tuple[pa.Table, pa.Table]:
    named = pc.is_valid(linked["id"])
    return linked.filter(named), linked.filter(pc.invert(named))


def name_losers(linked: pa.Table) -> pa.Table:
    """One part by loser id: each loser's best winner over every bucket partition, with the loser's
    key and shard."""
    names, pairs = _names_and_pairs(linked)
    best = best_winners(pairs)
    named = best.join(names.select(["id", "key", "shard"]), keys="loser", right_keys="id", join_type="inner")
    return named.rename_columns({"key": "loser_key", "shard": "loser_shard"})


def name_winners(linked: pa.Table) -> pa.Table:
    """One part by winner id: PAIRS_SCHEMA rows, the winner's key and set added."""
    names, pairs = _names_and_pairs(linked)
    named = pairs.select(["loser_key", "loser_shard", "winner", "winner_area", "distance", "by_inner"]).join(
        names.select(["id", "key", "overlap_set"]), keys="winner", right_keys="id", join_type="inner")
    return pa.table({"key": named["loser_key"], "shard": named["loser_shard"], "winner": named["key"],
                     "winner_area": named["winner_area"], "distance": named["distance"], "by_inner": named["by_inner"],
                     "overlap_set": named["overlap_set"]}, schema=PAIRS_SCHEMA)


def with_partition(table: pa.Table, column: str, partitions: int) -> pa.Table:
    """Adds `part`, the shuffle partition of each row: by an integer column (a bucket, a pHash), or
    by a key (a loser's, a representative's)."""
    values = table[column].to_numpy(False) if pa.types.is_integer(table[column].type) else np.array(
        [int(key) for key in table[column].to_pylist()], dtype=np.int64)  # dataset keys are digits
    return table.append_column("part", pa.array(values % partitions, pa.int32()))  # 4 bytes of each band row


def mark_copies(items: pa.Table) -> pa.Table:
    """Adds `representative`: for an item whose hashes all equal a higher-priority item's (the larger,
    then the smaller key), that item's key; else null. Excluded images are never marked.

    A copy's comparisons are its representative's, so only representatives go through the buckets:
    a photo copied c times would otherwise cost c x c comparisons in each bucket it falls in."""
    n = items.num_rows
    hashes = np.c_[items["phash"].to_numpy(), pc.list_flatten(items["crops"]).to_numpy().reshape(n, CROP_HASHES),
                   pc.list_flatten(items["inner"]).to_numpy().reshape(n, INNER_HASHES)]
    area, keys = items["area"].to_numpy(), np.array(items["key"].to_pylist(), dtype=str)
    order = np.lexsort((keys, -area, *hashes.T[::-1]))  # same hashes together, best first
    excluded = area[order] == REFERENCE_AREA  # neither marked nor a representative
    same = np.r_[False, (hashes[order][1:] == hashes[order][:-1]).all(axis=1) & ~excluded[1:] & ~excluded[:-1]]
    first = np.maximum.accumulate(np.where(same, 0, np.arange(n)))  # each row's run start
    representative, representative_area = np.full(n, None, dtype=object), np.zeros(n, np.int64)
    representative[order[same]] = keys[order[first[same]]]
    representative_area[order[same]] = area[order[first[same]]]
    return items.append_column("representative", pa.array(representative, pa.string())).append_column(
        "representative_area", pa.array(representative_area))


def copy_pairs(marked: pa.Table) -> pa.Table:
    """PAIRS_SCHEMA rows of the marked copies: each loses to its representative, at distance 0."""
    copies = marked.filter(pc.is_valid(marked["representative"]))
    return pa.table({"key": copies["key"], "shard": copies["shard"], "winner": copies["representative"],
                     "winner_area": copies["representative_area"], "distance": pa.array(np.zeros(copies.num_rows, np.int32)),
                     "by_inner": pa.array(np.zeros(copies.num_rows, bool)),
                     "overlap_set": pa.nulls(copies.num_rows, pa.string())}, schema=PAIRS_SCHEMA)


def inherit_winners(rows: pa.Table) -> pa.Table:
    """Rows of one part by representative: the representatives' losing rows (`copy` false) and their
    copies' rows (`copy` true). A copy whose representative loses takes its winner and distance, since
    the images near the copy are those near the representative; the others keep the representative."""
    losers = rows.filter(pc.invert(rows["copy"])).drop_columns(["copy", "part"])
    copies = rows.filter(rows["copy"]).drop_columns(["copy", "part"])
    inherited = copies.join(losers.select(["key", "winner", "winner_area", "distance", "by_inner", "overlap_set"]),
                            keys="winner", right_keys="key", join_type="left outer", right_suffix=" of winner")
    columns = {name: pc.coalesce(inherited[f"{name} of winner"], inherited[name]) if name in (
        "winner_area", "distance", "by_inner", "overlap_set") else inherited[name] for name in PAIRS_SCHEMA.names}
    columns["winner"] = pc.if_else(pc.is_valid(inherited["winner_area of winner"]),
                                   inherited["winner of winner"], inherited["winner"])
    return pa.concat_tables([losers, pa.table(columns, schema=PAIRS_SCHEMA)])


def _union(first: Rows, second: Rows) -> Rows:
    return pa.concat_tables([first, second]) if isinstance(first, pa.Table) else first.union(second)


def find_near_duplicates(items: Rows, k: int, partitions: int) -> Rows:
    """Losers among `items` (ITEMS_SCHEMA rows; excluded images have area REFERENCE_AREA).

    Buckets are shuffled in groups (`partitions`, or more when the band rows need them), not one
    group each: most buckets hold a single hash, and a Ray task per bucket would cost far more than
    the comparisons. Items with all the same hashes meet first, in groups by pHash: only the best of
    them is compared (mark_copies).
    """
    partitions = unit_partitions(partitions)
    marked = materialize(by_group(map_tables(items, lambda t: with_partition(t, "phash", partitions)), "part",
                                  lambda t: mark_copies(t.drop_columns(["part"])), partitions))
    compared = materialize(map_tables(marked, lambda t: with_ids(t.filter(pc.is_null(t["representative"])).drop_columns(
        ["representative", "representative_area"]))))
    budget = LOCAL_PASS_BYTES if isinstance(compared, pa.Table) else pass_budget_bytes(
        marked.size_bytes() + compared.size_bytes())
    pairs = _bucket_pairs_in_passes(compared, k, partitions, budget)
    if not isinstance(compared, pa.Table):  # the names outweigh the pairs: a few of them per loser
        partitions = max(1, min(partitions, math.ceil(compared.size_bytes() / NAMING_BYTES)))
    names = map_tables(compared, lambda t: link_rows(t, "id", partitions))
    losers = by_group(_union(map_tables(pairs, lambda t: link_rows(t, "loser", partitions)), names), "part",
                      name_losers, partitions)
    losers = by_group(_union(map_tables(losers, lambda t: link_rows(t, "winner", partitions)), names), "part",
                      name_winners, partitions)
    copies = map_tables(marked, lambda t: by_representative(copy_pairs(t), True, partitions))
    losers = map_tables(losers, lambda t: by_representative(t, False, partitions))
    return by_group(_union(losers, copies), "part", inherit_winners, partitions)


def pass_budget_bytes(held: int) -> float:
    """Half of what the object store has beside `held` bytes of materialized rows (at least an
    eighth of it): a shuffle holds its map outputs and its reducers' inputs at once, and what spills
    stays on disk until every object of its spill file is freed."""
    store = ray.cluster_resources().get("object_store_memory", 0)
    return max(store / 8, (store - held) / 2)


def _bucket_pairs_in_passes(compared: Rows, k: int, partitions: int, budget_bytes: float) -> Rows:
    """bucket_pairs over every bucket, in band_passes passes, each pass's pairs materialized before
    the next pass's band rows are made; on Ray, their many small blocks joined into ~NAMING_BYTES ones."""
    images = count(compared)
    passes = band_passes(images, k, budget_bytes)
    parts = max(partitions, -(-images * band_rows_per_item(k) // passes // BAND_ROWS_PER_PARTITION))
    found = []
    for which in range(passes):
        found.append(materialize(by_group(
            map_tables(compared, lambda t, which=which: with_partition(band_rows(t, k, passes, which), "bucket", parts)),
            "part", lambda t: bucket_pairs(t, k), parts)))
    if isinstance(compared, pa.Table):
        return pa.concat_tables(found)
    blocks = max(1, math.ceil(sum(done.size_bytes() for done in found) / NAMING_BYTES))
    return (found[0].union(*found[1:]) if len(found) > 1 else found[0]).repartition(blocks)  # no shuffle


def by_representative(pairs: pa.Table, copies: bool, partitions: int) -> pa.Table:
    """Adds `copy` and the part of the representative: a copy's winner, a loser's own key."""
    table = pairs.append_column("copy", pa.array(np.full(pairs.num_rows, copies)))
    part = with_partition(table, "winner" if copies else "key", partitions)["part"]
    return table.append_column("part", part)


# --- the driver's side: excluded sets, then one pass over everything written --------------------

def exclusion_items(output: Output, patterns: list[str]) -> pa.Table:
    """ITEMS_SCHEMA rows for every excluded image and its mirror."""
    tables = []
    for name, rows in exclusion_rows(output, patterns).items():
        for column, suffix in (("phashes", ""), ("phashes_mirror", " (mirrored)")):
            tables.append(pa.table({"key": [r["path"] + suffix for r in rows],
                                    "phash": pa.array(hex_to_int64([r[column][0] for r in rows]), pa.int64()),
                                    "crops": hex_to_int64([h for r in rows for h in r[column][1:len(CROPS)]]).reshape(
                                        len(rows), CROP_HASHES).tolist(),
                                    "inner": hex_to_int64([h for r in rows for h in r[column][len(CROPS):]]).reshape(
                                        len(rows), INNER_HASHES).tolist(),
                                    "area": pa.array([REFERENCE_AREA] * len(rows), pa.int64()),
                                    "shard": [""] * len(rows), "overlap_set": [name] * len(rows)},
                                   schema=ITEMS_SCHEMA))
    return pa.concat_tables(tables) if tables else ITEMS_SCHEMA.empty_table()


def _written_items(t: pa.Table) -> pa.Table:
    area = pc.multiply(pc.cast(t["original_width"], pa.int64()), pc.cast(t["original_height"], pa.int64()))
    crops, inner = (pa.ListArray.from_arrays(pa.array(np.arange(t.num_rows + 1, dtype=np.int32) * width),
                                             hex_to_int64(pc.list_flatten(t[column])))
                    for column, width in (("phash_crops", CROP_HASHES), ("phash_inner", INNER_HASHES)))
    return pa.table({"key": t["key"], "phash": hex_to_int64(t["phash"]), "crops": crops, "inner": inner,
                     "area": area, "shard": t["shard"], "overlap_set": pa.nulls(t.num_rows, pa.string())},
                    schema=ITEMS_SCHEMA)


def _as_removed(t: pa.Table) -> pa.Table:
    rows = []
    for r in t.to_pylist():
        hashes = "inner part's pHash" if r["by_inner"] else "pHash"
        if r["overlap_set"]:
            reason = f"{hashes} within {r['distance']} bits of {r['overlap_set']} image {r['winner']}"
            status = "benchmark_overlap"
        else:
            reason, status = f"{hashes} within {r['distance']} bits of {r['winner']}", "near_duplicate"
        rows.append({"key": r["key"], "shard": r["shard"], "status": status, "reason": reason,
                     "duplicate_of": r["winner"], "distance": r["distance"], "overlap_set": r["overlap_set"]})
    return pa.Table.from_pylist(rows, schema=REMOVED_SCHEMA)


def near_duplicate_removals(output: Output, k: int, exclude: list[str], dedupe_within: bool) -> Rows | None:
    """REMOVED_SCHEMA rows of the benchmark overlaps, and of the near-duplicates when dedupe_within
    (None: nothing to do). Exact copies among the written samples need not be gone first: they
    have the same hashes, so they are compared once (mark_copies) and change no one's winner."""
    written = written_samples(output, ["key", "phash", "phash_crops", "phash_inner", "original_width",
                                       "original_height", "shard"])
    if written is None or (not exclude and not dedupe_within):
        return None
    items = map_tables(written, _written_items)
    references = exclusion_items(output, exclude)
    if references.num_rows:
        items = pa.concat_tables([items, references]) if isinstance(items, pa.Table) else items.union(
            ray.data.from_arrow(references))
    losers = find_near_duplicates(items, k, len(output.list("metadata", ".parquet")))
    if not dedupe_within:  # only what an excluded image caught
        losers = map_tables(losers, lambda t: t.filter(pc.is_valid(t["overlap_set"])))
    return materialize(map_tables(losers, _as_removed))
