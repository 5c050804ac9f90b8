"""Multi-index hashing of pHashes and crop pHashes: it finds exactly the pairs brute force finds
(either image's pHash near any of the other's 16 hashes), decides the same way whatever the
partitioning, and lets excluded images win; the excluded images' hash cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import skimage.data
from PIL import Image

from pipeline import near_buckets, near_dedupe
from pipeline.config import ConfigError
from pipeline.decode import HASHES
from pipeline.exclusions import EXCLUSIONS_SCHEMA, exclusion_sets
from pipeline.near_buckets import REFERENCE_AREA, band_rows, bucket_pairs
from pipeline.near_dedupe import (ITEMS_SCHEMA, exclusion_items, find_near_duplicates, hex_to_int64, mark_copies,
                                  with_ids)
from pipeline.storage import Output


def random_items(n: int, k: int, seed: int = 0) -> pa.Table:
    """n items of 16 + INNER_HASHES random hashes (pHash, 15 crop pHashes, inner part as it is and turned) with
    planted pairs within 0..k+2 bits: pHash near an earlier pHash, a crop hash near an earlier pHash,
    a pHash near an earlier crop; and within 0..INNER_DISTANCE+2 bits: an inner part near an earlier
    one's or its turns', a turn near an earlier inner part."""
    rng = np.random.default_rng(seed)
    width = 16 + near_buckets.INNER_HASHES
    hashes = rng.integers(0, 2**63, size=(n, width), dtype=np.int64).view(np.uint64) * np.uint64(2) + np.uint64(1)

    def near(value: np.uint64, bits: int = k) -> np.uint64:
        flips = rng.choice(64, size=rng.integers(0, bits + 3), replace=False)
        return value ^ np.uint64(sum(1 << int(b) for b in flips))

    for i in range(1, n):
        j = rng.integers(0, i)
        if i % 3 == 1:
            hashes[i, 0] = near(hashes[j, 0])
        elif i % 5 == 2:
            hashes[i, rng.integers(1, 16)] = near(hashes[j, 0])
        elif i % 7 == 3:
            hashes[i, 0] = near(hashes[j, rng.integers(1, 16)])
        elif i % 11 == 4:
            hashes[i, 16] = near(hashes[j, rng.integers(16, width)], near_buckets.INNER_DISTANCE)
        elif i % 13 == 5:
            hashes[i, rng.integers(17, width)] = near(hashes[j, 16], near_buckets.INNER_DISTANCE)
    signed = hashes.view(np.int64)
    return pa.table({"key": [f"{i:05d}" for i in range(n)], "phash": pa.array(signed[:, 0]),
                     "crops": pa.array(signed[:, 1:16].tolist(), pa.list_(pa.int64())),
                     "inner": pa.array(signed[:, 16:].tolist(), pa.list_(pa.int64())),
                     "area": pa.array(rng.integers(1, 4, size=n), pa.int64()), "shard": ["00000"] * n,
                     "overlap_set": pa.nulls(n, pa.string())}, schema=ITEMS_SCHEMA)


def all_hashes(items: pa.Table) -> np.ndarray:
    crops = np.array(items["crops"].to_pylist(), dtype=np.int64).reshape(items.num_rows, 15)
    inner = np.array(items["inner"].to_pylist(), dtype=np.int64).reshape(items.num_rows, near_buckets.INNER_HASHES)
    return np.concatenate([items["phash"].to_numpy()[:, None], crops, inner], axis=1).view(np.uint64)


def brute_force_spaces(items: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair's distance within k bits by the whole-image hashes (i's pHash vs j's 16, either
    way) and within INNER_DISTANCE (at most k) by the inner parts (i's vs j's, turned too); 99: none."""
    h = all_hashes(items)
    one_way = np.bitwise_count(h[:, None, :1] ^ h[None, :, :16]).min(axis=2)  # i's pHash vs j's 16
    inner_way = np.bitwise_count(h[:, None, 16:17] ^ h[None, :, 16:]).min(axis=2)  # i's inner part vs j's, turned too
    whole, inner = np.minimum(one_way, one_way.T), np.minimum(inner_way, inner_way.T)
    return np.where(whole <= k, whole, 99), np.where(inner <= min(k, near_buckets.INNER_DISTANCE), inner, 99)


def brute_force_distances(items: pa.Table, k: int) -> np.ndarray:
    """The closest match of every pair of items by either kind of hash; a pair without one is at 99."""
    return np.minimum(*brute_force_spaces(items, k))


def brute_force_winners(items: pa.Table, k: int) -> dict[str, tuple[str, int]]:
    """loser -> (its best winner: the largest, then smallest key, of those within k; their distance)."""
    distance = brute_force_distances(items, k)
    area, keys = items["area"].to_numpy(), items["key"].to_pylist()
    best = {}
    for i in range(len(keys)):
        winners = [j for j in range(len(keys)) if i != j and distance[i, j] < 99 and
                   (area[j] > area[i] or (area[j] == area[i] and keys[j] < keys[i]))]
        if winners:
            j = min(winners, key=lambda j: (-area[j], keys[j]))
            best[keys[i]] = (keys[j], int(distance[i, j]))
    return best


def brute_force_losers(items: pa.Table, k: int) -> set[str]:
    return set(brute_force_winners(items, k))


@pytest.mark.parametrize("k", [0, 3, 5, 6, 8])
@pytest.mark.parametrize("small_pairs, batch_pairs", [(4096, 2_000_000), (0, 1), (3, 5)],
                         ids=["numpy", "faiss", "both-in-small-batches"])
def test_band_buckets_find_exactly_the_brute_force_pairs(k: int, small_pairs: int, batch_pairs: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Small buckets compared together in numpy, large ones by faiss, and the mix, with numpy's
    batches split mid-way: every case gives brute force's winners."""
    monkeypatch.setattr(near_buckets, "SMALL_BUCKET_PAIRS", small_pairs)
    monkeypatch.setattr(near_buckets, "SMALL_BATCH_PAIRS", batch_pairs)
    items = random_items(120, k, seed=k)
    pairs = bucket_pairs(band_rows(with_ids(items), k), k)
    found = {f"{loser:05d}" for loser in pairs["loser"].to_pylist()}  # random_items' keys are their ids
    winners = {f"{loser:05d}": (f"{winner:05d}", distance) for loser, winner, distance in zip(
        pairs["loser"].to_pylist(), pairs["winner"].to_pylist(), pairs["distance"].to_pylist())}
    assert winners == brute_force_winners(items, k)  # the best winner, at their smallest distance
    whole, inner = brute_force_spaces(items, k)  # by the inner parts only when they are closer
    assert pairs["by_inner"].to_pylist() == [bool(inner[a, b] < whole[a, b]) for a, b in zip(
        pairs["loser"].to_pylist(), pairs["winner"].to_pylist())]
    assert k < near_buckets.INNER_DISTANCE or any(pairs["by_inner"].to_pylist())
    assert found  # the planted pairs are there
    plain = items["phash"].to_numpy().view(np.uint64)
    plain_only = np.bitwise_count(plain[:, None] ^ plain[None, :])
    assert any(np.sort(plain_only[int(key)])[1] > k for key in found)  # some only through a crop hash
    hashes = all_hashes(items)
    whole_way = np.bitwise_count(hashes[:, None, :1] ^ hashes[None, :, :16]).min(axis=2)
    whole_only = np.minimum(whole_way, whole_way.T)
    if k >= near_buckets.INNER_DISTANCE:  # some only through an inner part, and some inner parts too far
        assert any(np.sort(whole_only[int(key)])[1] > k for key in found)


def test_flat_inner_parts_are_left_out_of_the_inner_bands() -> None:
    """decode hashes an inner part without detail as 0 (it would match every other flat one): such
    an item gets no rows in the inner bands, and two of them far apart otherwise are no pair."""
    items = random_items(40, 6, seed=9)
    flat = [0, 1, 2, 3]
    inner = np.array(items["inner"].to_pylist(), dtype=np.int64)
    inner[flat] = 0
    items = items.set_column(items.schema.get_field_index("inner"), "inner",
                             pa.array(inner.tolist(), pa.list_(pa.int64())))
    rows = band_rows(with_ids(items), 6)
    in_inner_bands = rows.filter(pc.greater_equal(rows["bucket"], near_buckets.BANDS << near_buckets.BAND_BITS))
    assert set(in_inner_bands["id"].to_pylist()) == set(range(4, 40))  # random_items' ids are their row numbers
    assert rows.num_rows == 40 * near_buckets.band_rows_per_item(6) - 4 * 4 * near_buckets.INNER_HASHES
    found = bucket_pairs(rows, 6)  # the four would all pair at 0 bits if their inner bands were filed
    assert set(found["loser"].to_pylist()) == set(brute_force_winners_without_flat(items, 6))


def brute_force_winners_without_flat(items: pa.Table, k: int) -> dict[int, int]:
    """brute_force_winners' losers, a pair of flat inner parts (0) counting only by its whole-image hashes."""
    hashes = all_hashes(items)
    flat = hashes[:, 16] == 0
    distance = brute_force_distances(items, k)
    whole_way = np.bitwise_count(hashes[:, None, :1] ^ hashes[None, :, :16]).min(axis=2)
    whole = np.minimum(whole_way, whole_way.T)
    both_flat = flat[:, None] & flat[None, :]
    distance = np.where(both_flat, np.where(whole <= k, whole, 99), distance)
    area, keys = items["area"].to_numpy(), items["key"].to_pylist()
    return {int(keys[i]): j for i in range(len(keys)) for j in range(len(keys)) if i != j and distance[i, j] < 99
            and (area[j] > area[i] or (area[j] == area[i] and keys[j] < keys[i]))}


def test_passes_follow_the_budget_and_take_every_band_row_once() -> None:
    need = 1000 * near_buckets.band_rows_per_item(6) * near_buckets.BAND_ROW_BYTES
    assert near_buckets.band_rows_per_item(6) == 4 * (17 + 15) + 4 * (1 + 8)
    assert near_buckets.band_passes(1000, 6, float("inf")) == near_buckets.band_passes(1000, 6, need) == 1
    assert near_buckets.band_passes(1000, 6, need - 1) == near_buckets.band_passes(1000, 6, need / 2) == 2
    assert near_buckets.band_passes(1000, 6, need / 2 - 1) == 3
    items = with_ids(random_items(300, 6, seed=5))
    whole = band_rows(items, 6).sort_by([(name, "ascending") for name in ("bucket", "id", "query", "filed", "probes")])
    passes = [band_rows(items, 6, 4, which) for which in range(4)]
    assert all(p.num_rows > whole.num_rows / 8 for p in passes)  # the hash spreads the buckets
    assert {b for p in passes for b in p["bucket"].to_pylist()} == set(whole["bucket"].to_pylist())
    assert not set(passes[0]["bucket"].to_pylist()) & set(passes[1]["bucket"].to_pylist())  # whole buckets
    assert pa.concat_tables(passes).sort_by(
        [(name, "ascending") for name in ("bucket", "id", "query", "filed", "probes")]).equals(whole)
    parts = near_dedupe.with_partition(passes[0], "bucket", 200)["part"].to_numpy()
    assert len(np.unique(parts)) > 150  # a pass's rows still spread over the partitions (bucket % 4 would fill 50)


def test_the_drivers_path_holds_a_bounded_pass_and_decides_as_in_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Band rows beyond LOCAL_PASS_BYTES are taken in passes in the driver, with the same losers
    and winners as one pass over all of them."""
    items = random_items(200, 8, seed=4)
    need = 200 * near_buckets.band_rows_per_item(8) * near_buckets.BAND_ROW_BYTES
    passes = []
    record = near_dedupe.band_passes
    monkeypatch.setattr(near_dedupe, "band_passes", lambda *args: passes.append(record(*args)) or passes[-1])
    monkeypatch.setattr(near_dedupe, "LOCAL_PASS_BYTES", float("inf"))
    in_one = find_near_duplicates(items, 8, 7).sort_by("key")
    monkeypatch.setattr(near_dedupe, "LOCAL_PASS_BYTES", need / 2.5)
    in_three = find_near_duplicates(items, 8, 7).sort_by("key")
    assert passes == [1, 3]
    assert in_three.equals(in_one)
    assert set(in_three["key"].to_pylist()) == brute_force_losers(items, 8)


def test_ray_result_does_not_depend_on_partitioning(ray_address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray in three passes, in more partitions than the units, and with the naming shuffles in
    several partitions and pair blocks (a budget and the sizes of a partition made small) decides
    as the driver's path does in one. (One pass on Ray: the copies test below.)"""
    items = random_items(200, 8, seed=3)
    need = 200 * near_buckets.band_rows_per_item(8) * near_buckets.BAND_ROW_BYTES
    local = find_near_duplicates(items, 8, 7).to_pandas().sort_values("key")  # a table: the driver's path
    passes = []
    monkeypatch.setattr(near_dedupe, "pass_budget_bytes", lambda held: need / 2.5)
    monkeypatch.setattr(near_dedupe, "BAND_ROWS_PER_PARTITION", 5000)
    monkeypatch.setattr(near_dedupe, "NAMING_BYTES", 2000)
    record = near_dedupe.band_passes
    monkeypatch.setattr(near_dedupe, "band_passes", lambda *args: passes.append(record(*args)) or passes[-1])
    on_ray = find_near_duplicates(ray.data.from_arrow(items).repartition(5), 8, 7).to_pandas().sort_values("key")
    assert passes == [3]
    results = [list(zip(losers["key"], losers["winner"], losers["distance"])) for losers in (on_ray, local)]
    assert results[0] == results[1]
    assert {key for key, _, _ in results[0]} == brute_force_losers(items, 8)
    area = dict(zip(items["key"].to_pylist(), items["area"].to_pylist()))
    for key, winner, _ in results[0]:  # the kept copy: larger image, then smaller key
        assert area[winner] > area[key] or (area[winner] == area[key] and winner < key)


def with_copies(items: pa.Table, seed: int) -> pa.Table:
    """items plus exact-hash copies (new keys, random sizes: some larger than the original, some equal)
    of a few of them, some copied many times, as popular web images are."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(items.num_rows, 12, replace=False)
    copies = items.take(np.repeat(picks, rng.integers(1, 30, len(picks))))
    n = items.num_rows
    copies = copies.set_column(0, "key", pa.array([f"{n + i:05d}" for i in range(copies.num_rows)]))
    copies = copies.set_column(copies.schema.get_field_index("area"), "area", pa.array(rng.integers(1, 4, copies.num_rows), pa.int64()))
    return pa.concat_tables([items, copies])


@pytest.mark.parametrize("k", [0, 6, 8])
def test_copies_with_the_same_hashes_decide_as_brute_force(ray_address: str, k: int) -> None:
    """Only one of each set of identical hashes goes through the buckets: the losers, their best
    winners and distances stay brute force's, in the driver and on Ray."""
    items = with_copies(random_items(150, k, seed=k), seed=k)
    expected = brute_force_winners(items, k)
    for rows in (items, ray.data.from_arrow(items).repartition(4)):
        losers = find_near_duplicates(rows, k, 5)
        losers = losers if isinstance(losers, pa.Table) else pa.Table.from_pandas(losers.to_pandas())
        assert dict(zip(losers["key"].to_pylist(), zip(losers["winner"].to_pylist(),
                                                        losers["distance"].to_pylist()))) == expected
    assert mark_copies(items)["representative"].null_count == 150  # the copies are marked


def test_an_excluded_image_catches_every_copy_of_what_it_catches(ray_address: str) -> None:
    items = with_copies(random_items(40, 6, seed=7), seed=7)
    victim = items.slice(int(items["key"].to_pylist().index(items["key"][40].as_py())), 1).to_pylist()[0]
    reference = pa.table({"key": ["/bench/test/002.png"], "phash": [victim["phash"]], "crops": [victim["crops"]],
                          "inner": [victim["inner"]],
                          "area": pa.array([REFERENCE_AREA], pa.int64()), "shard": [""],
                          "overlap_set": ["bench"]}, schema=ITEMS_SCHEMA)
    losers = find_near_duplicates(pa.concat_tables([items, reference]), 6, 3)
    caught = losers.filter(pc.equal(losers["winner"], "/bench/test/002.png"))
    same = [r["key"] for r in items.to_pylist() if r["phash"] == victim["phash"] and r["crops"] == victim["crops"]
            and r["inner"] == victim["inner"]]
    distance = dict(zip(caught["key"].to_pylist(), caught["distance"].to_pylist()))
    assert len(same) > 1 and {key: distance.get(key) for key in same} == dict.fromkeys(same, 0)
    assert set(caught["overlap_set"].to_pylist()) == {"bench"} and "/bench/test/002.png" not in losers["key"].to_pylist()


def test_excluded_images_always_win_and_only_catch(ray_address: str) -> None:
    items = random_items(30, 6, seed=5)
    victim = items.slice(4, 1).to_pylist()[0]
    reference = pa.table({"key": ["/bench/test/001.png"], "phash": [victim["phash"] ^ 0b101],
                          "crops": [[0] * 15], "inner": [[0] * near_buckets.INNER_HASHES],
                          "area": pa.array([REFERENCE_AREA], pa.int64()), "shard": [""],
                          "overlap_set": ["bench"]}, schema=ITEMS_SCHEMA)
    losers = find_near_duplicates(ray.data.from_arrow(pa.concat_tables([items, reference])), 6, 3).to_pandas()
    caught = losers[losers["key"] == victim["key"]].iloc[0]
    assert caught["winner"] == "/bench/test/001.png" and caught["overlap_set"] == "bench" and caught["distance"] == 2
    assert "/bench/test/001.png" not in set(losers["key"])  # a reference never loses


def test_hex_to_int64_keeps_all_64_bits() -> None:
    hashes = ["ffffffffffffffff", "8000000000000001", "0123456789abcdef", "0000000000000000"]
    values = hex_to_int64(pa.chunked_array([hashes[:2], hashes[2:]]))
    assert values.tolist() == [-1, -(2**63) + 1, 0x0123456789ABCDEF, 0]
    assert [f"{v:016x}" for v in values.view(np.uint64)] == hashes


def test_exclusion_sets_are_named_by_folder(tmp_path: Path) -> None:
    for folder in ("celebamask_hq/test", "wflw"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "a.jpg").write_bytes(b"x")
        (tmp_path / folder / "notes.txt").write_text("no image")
    sets = exclusion_sets([str(tmp_path / "celebamask_hq/test/*.jpg"), str(tmp_path / "wflw")])
    assert sets == {"test": [str(tmp_path / "celebamask_hq/test/a.jpg")], "wflw": [str(tmp_path / "wflw/a.jpg")]}
    with pytest.raises(ConfigError, match="no images found"):
        exclusion_sets([str(tmp_path / "nothing-*")])


def test_buckets_without_close_pairs_give_no_pairs() -> None:
    items = random_items(40, 4, seed=1)
    far = items.take(pa.array([0, 1]))  # random 64-bit hashes: far apart, but their buckets are shared
    far = far.set_column(1, "phash", pa.array([0x0F0F0F0F0F0F0F0F, 0x0F0F0F0F0F0F0F0F ^ 0xFFFF0000], pa.int64()))
    assert bucket_pairs(band_rows(with_ids(far), 6), 6).num_rows == 0
    assert bucket_pairs(band_rows(with_ids(items.slice(0, 0)), 6), 6).num_rows == 0


def test_ids_are_key_numbers_and_excluded_paths_get_distinct_negative_ones() -> None:
    items = random_items(3, 6).take([0, 1, 2])
    items = items.set_column(0, "key", pa.array(["00001000000007", "/bench/a.png", "/bench/a.png (mirrored)"]))
    ids = with_ids(items)["id"].to_pylist()
    assert ids[0] == 1000000007 and ids[1] < 0 and ids[2] < 0 and ids[1] != ids[2]
    assert with_ids(items)["id"].to_pylist() == ids  # the same in every process


def test_cached_hashes_of_another_version_are_recomputed(ray_address: str, tmp_path: Path) -> None:
    """OUT/exclusions/SET.parquet carries the pHash version; a cache of another version is hashed again."""
    folder = tmp_path / "celebamask_test"
    folder.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(folder / "0001.png")
    output = Output(str(tmp_path / "out"))
    fresh = exclusion_items(output, [str(folder)])
    cache = tmp_path / "out" / "exclusions" / "celebamask_test.parquet"
    stale = pq.read_table(cache)
    stale = stale.set_column(3, "phashes", pa.array([["0" * 16] * HASHES], pa.list_(pa.string())))
    pq.write_table(stale.replace_schema_metadata({"phash_version": "0"}), cache)  # another version's hashes
    assert exclusion_items(output, [str(folder)]).equals(fresh)
    pq.write_table(stale.replace_schema_metadata(EXCLUSIONS_SCHEMA.metadata), cache)  # the same version: trusted
    assert exclusion_items(output, [str(folder)])["phash"].to_pylist()[0] == 0
