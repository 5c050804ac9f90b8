"""Near-duplicate detection quality and cost of the pHash stage, on real photos.

    python -m bench.dedupe_quality [--out out/bench/dedupe_quality.json] [--per-kind 24] [--workers 2]

No downloads: the photos are the ones installed packages ship (scikit-image's data, insightface's
test images). Everything is hashed through the pipeline's own code paths:

  dataset side   pipeline.decode.decode_image(JPEG bytes, BuildConfig()) and its decode.HASHES pHashes
                 (decode.phashes: the image's own, its 15 crops by 2% off one to four sides, its
                 inner part as it is and turned),
                 exactly what the builder stores (re-encoded to <= image_max_side, 512 px).
  excluded side  pipeline.exclusions.hash_files on a file: the decode.HASHES pHashes of the full-resolution
                 image and of its mirror (what --exclude-images caches).
  pairs          as near_dedupe decides: the plain pHash of one within k bits of any of the other's
                 16 whole-image hashes, or its inner part's within INNER_DISTANCE of the other's
                 inner part's as it is or turned (either way round; as_decided makes it one
                 distance); a dataset image vs an excluded one, against the excluded image's
                 plain and mirrored hashes.

Quality
  near-duplicates  every whole photo is the "original" (its JPEG q95 bytes); each kind of
                   transform makes --per-kind random copies of the full-resolution pixels:
                     jpeg                 re-encode at quality 40..95
                     resize               0.5x..2x (log-uniform), bilinear/bicubic/lanczos/box
                     crop                 each side 0..2.5% (so up to 5% per axis)
                     brightness_contrast  brightness and contrast each x0.9..1.1
                     resize+jpeg          both
                     all                  crop + brightness/contrast + resize + jpeg
                     mirror               horizontal flip (decontamination only: the pipeline
                                          catches it with the excluded image's mirrored hash)
                     mirror+resize+jpeg   the same, also resized and re-encoded
                   and copies as the web makes them (bench.dedupe_images.web_transform):
                     crop10, crop15       one to four sides cut by 3-10 %, by 10-15 %
                     letterbox            black or white bars of 5-20 % on two opposite sides
                     rotate               1-5 degrees either way, corners filled black or white
                     grey                 greyscale
                     text                 a black caption bar with text over the bottom 8-14 %
                     recompress3          three JPEG rounds at quality 60-90
                     crop10+text+recompress3, letterbox+grey+recompress3   combinations
                   (every copy not re-encoded at a random quality is saved at q95). Distances are
                   "dedupe" (copy vs original, both through decode_image) and "decontam" (copy vs
                   the original's excluded-set hashes, plain and mirrored). The same is repeated on
                   a sample of 128-px tiles (small images).
  distinct pairs   the whole photos, non-overlapping 128-px tiles of the photos of at least 256 px
                   (flat tiles, grey std < 10, dropped), and scikit-image's 200 LFW 25-px crops
                   (100 faces picked at random from LFW, 100 background patches). Tiles of one
                   photo are distinct images but correlated (same scene, lighting, texture), so
                   merge rates are given for whole images only (photos + LFW) and with the tiles
                   ("all"), "dedupe" (hash vs hash, pairs once) and "decontam" (dataset image vs an
                   excluded image's plain and mirrored hashes, ordered pairs).
  alternatives     "whole_image": the pipeline's 16 whole-image hashes alone (without the inner
                   part's: what it used before them); "phash_plain": the pipeline's own pHash
                   alone (index 0 of the 16: what it used before the crop hashes);
                   prototypes, not pipeline code, hashed on the decoded stored image: dhash,
                   and imagehash's phash of the central 90%.
  scale            the false neighbours per image at 50M images if hashes were independent and
                   uniform (pHash: 64 bits with exactly 32 set, as it thresholds at the median;
                   dhash: any 64 bits), times the hash comparisons per pair of the multi-hashes.

Cost
  Hashes per second on one core (decode.phashes and imagehash on a decoded 512-px image;
  decode_image end-to-end from JPEG bytes), Arrow bytes per million items of the near-dedupe stage
  (ITEMS_SCHEMA rows, band_rows at the default k with and without the shuffle's partition column),
  the candidate comparisons per item at 50M images (its 64 looks x the pHashes filed per bucket,
  N / 65536 x the 17 band values each is filed under at k = 6)
  and the measured cost of one comparison in pipeline.near_buckets.bucket_pairs (one bucket).

The photos and their near-copies are made in bench.dedupe_images, the cost measured in
bench.dedupe_cost; this module hashes, pairs, counts and reports.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import tempfile
import time
import zlib
from math import comb
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core per worker: the throughput numbers are per core

import imagehash  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from bench.dedupe_cost import memory_and_comparisons, throughput  # noqa: E402
from bench.dedupe_images import KINDS, cut_tiles, jpeg, load_lfw, load_photos, transform  # noqa: E402
from pipeline.build_config import BuildConfig  # noqa: E402
from pipeline.decode import CROPS, HASHES as PIPELINE_HASHES, decode_image  # noqa: E402
from pipeline.exclusions import hash_files  # noqa: E402
from pipeline.near_buckets import INNER_DISTANCE  # noqa: E402

CONFIG = BuildConfig()
DEFAULT_K = CONFIG.near_duplicate_distance
KS = list(range(4, 13))
MIRROR_KINDS = ("mirror", "mirror+resize+jpeg")
HASHES = ("pipeline", "whole_image", "phash_plain", "dhash", "phash_centre90")
HASH_COUNT = {"pipeline": len(CROPS), "whole_image": len(CROPS), "phash_plain": 1, "dhash": 1, "phash_centre90": 1}
RECALL_TARGET, MERGE_TARGET = 0.95, 0.001


# --- hashes ----------------------------------------------------------------------------------------

def h64(value) -> int:
    return int(str(value), 16)


def pipeline_hashes(hexes: list[str]) -> dict[str, list[int]]:
    """The pipeline's hashes (decode.HASHES), and its plain pHash alone (all it had before the crop hashes)."""
    hashes = [h64(h) for h in hexes]
    assert len(hashes) == PIPELINE_HASHES
    return {"pipeline": hashes, "whole_image": hashes[:len(CROPS)], "phash_plain": hashes[:1]}


def alternative_hashes(image: Image.Image) -> dict[str, list[int]]:
    width, height = image.size
    centre = image.crop((round(0.05 * width), round(0.05 * height), width - round(0.05 * width),
                         height - round(0.05 * height)))
    return {"dhash": [h64(imagehash.dhash(image))], "phash_centre90": [h64(imagehash.phash(centre))]}


def dataset_hashes(data: bytes) -> dict[str, list[int]]:
    """What the builder stores (decode_image's pHashes), and the prototypes on the stored image."""
    stored, *_, hexes = decode_image(data, CONFIG)
    with Image.open(io.BytesIO(stored)) as image:
        hashes = alternative_hashes(image.convert("RGB"))
    return {**pipeline_hashes(hexes), **hashes}


def reference_hashes(path: str) -> dict[str, list[list[int]]]:
    """An excluded image's hashes, plain and mirrored: the pipeline's (hash_files), and the prototypes'."""
    row = hash_files({"path": [path]})
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
    sides = [{**pipeline_hashes(row[column][0]), **alternative_hashes(side)}
             for column, side in (("phashes", upright), ("phashes_mirror", ImageOps.mirror(upright)))]
    return {name: [side[name] for side in sides] for name in HASHES}


def popcount(a: int, b: int) -> int:
    return int(np.bitwise_count(np.uint64(a) ^ np.uint64(b)))


def as_decided(whole: np.ndarray | int, inner: np.ndarray | int) -> np.ndarray | int:
    """The pipeline's decision as one distance: an inner-part match within INNER_DISTANCE at its
    own distance, else the whole-image hashes' distance; so `<= k` is the decision at every k of KS."""
    return np.where(np.asarray(inner) <= INNER_DISTANCE, np.minimum(whole, inner), whole)


def pair_distance(a: list[int], b: list[int]) -> int:
    """Single hashes: their distance. The pipeline's: one's plain hash against any of the other's
    16 whole-image hashes, or one's inner part against the other's inner part as it is or turned."""
    if len(a) == 1 and len(b) == 1:
        return popcount(a[0], b[0])
    crops = len(CROPS)
    whole = min(min(popcount(a[0], x) for x in b[:crops]), min(popcount(b[0], x) for x in a[:crops]))
    if len(a) == crops:
        return whole
    inner = min(min(popcount(a[crops], x) for x in b[crops:]), min(popcount(b[crops], x) for x in a[crops:]))
    return int(as_decided(whole, inner))


# --- workers ---------------------------------------------------------------------------------------

SOURCES: dict[str, Image.Image] = {}  # set before the pool forks


def _hash_item(args: tuple[str, bytes]) -> tuple[str, dict]:
    name, data = args
    return name, dataset_hashes(data)


def _reference_item(args: tuple[str, str]) -> tuple[str, dict]:
    name, path = args
    return name, reference_hashes(path)


def _variant_item(args: tuple[str, str, int, int]) -> dict:
    name, kind, index, seed = args
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), KINDS.index(kind), index])
    data, params = transform(SOURCES[name], kind, rng)
    return {"source": name, "kind": kind, "index": index, "params": params, "hashes": dataset_hashes(data)}


# --- statistics ------------------------------------------------------------------------------------

def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def recall_table(distances: list[int]) -> dict:
    d = np.array(distances)
    return {"n": int(d.size), "recall": {k: float((d <= k).mean()) for k in KS},
            "recall_ci95_at_default": wilson(int((d <= DEFAULT_K).sum()), int(d.size)),
            "distance_percentiles": {p: float(np.percentile(d, p)) for p in (50, 90, 95, 99, 100)}}


def merge_table(d: np.ndarray) -> dict:
    n = int(d.size)
    merged = {k: int((d <= k).sum()) for k in KS}
    return {"pairs": n, "merged": merged, "merge_rate": {k: merged[k] / n for k in KS},
            "upper95_if_zero": 3 / n, "min_distance": int(d.min()),
            "distance_percentiles": {p: float(np.percentile(d, p)) for p in (0.01, 0.1, 1, 5, 50)},
            "histogram": np.bincount(d, minlength=65).tolist()}


def _one_way(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """d[i, j], q's first hash of a space against any of r's in it, per space, as the pipeline decides."""
    if q.shape[1] == 1:
        return np.bitwise_count(q[:, None, :] ^ r[None, :, :])[:, :, 0].astype(np.int64)
    crops = len(CROPS)
    whole = np.bitwise_count(q[:, None, :1] ^ r[None, :, :crops]).min(axis=2).astype(np.int64)
    if q.shape[1] == crops:
        return whole
    inner = np.bitwise_count(q[:, None, crops:crops + 1] ^ r[None, :, crops:]).min(axis=2).astype(np.int64)
    return np.stack([whole, inner])


def _decided(one_way: np.ndarray, other_way: np.ndarray) -> np.ndarray:
    both = np.minimum(one_way, other_way)
    return both if both.ndim == 2 else as_decided(both[0], both[1])


def distance_matrix(hashes: list[list[int]]) -> np.ndarray:
    """Symmetric pair distances (the pipeline's: pair_distance's)."""
    m = np.array(hashes, dtype=np.uint64)  # (n, h)
    d = _one_way(m, m)
    return _decided(d, np.swapaxes(d, -1, -2))


def reference_matrix(dataset: list[list[int]], references: list[list[list[int]]]) -> np.ndarray:
    """d[i, j]: dataset image i vs excluded image j (plain or mirrored hash), as the pipeline decides."""
    q = np.array(dataset, dtype=np.uint64)  # (n, h)
    best = None
    for side in (0, 1):
        r = np.array([ref[side] for ref in references], dtype=np.uint64)  # (n, h)
        d = _decided(_one_way(q, r), np.swapaxes(_one_way(r, q), -1, -2))
        best = d if best is None else np.minimum(best, d)
    return best


def random_neighbours(hname: str, k: int, images: int = 50_000_000) -> float:
    """Expected hashes within k bits of one image among `images` independent uniform ones."""
    if hname == "dhash":
        p = sum(comb(64, i) for i in range(k + 1)) / 2 ** 64
    else:  # 32 ones out of 64: distances are even, 2j for j ones moved
        p = sum(comb(32, j) ** 2 for j in range(k // 2 + 1)) / comb(64, 32)
    within = p * (2 * HASH_COUNT[hname] - 1) * images
    if hname == "pipeline":  # and the inner parts' hashes, within INNER_DISTANCE
        turns = PIPELINE_HASHES - len(CROPS)
        within += sum(comb(32, j) ** 2 for j in range(min(k, INNER_DISTANCE) // 2 + 1)) / comb(64, 32) * (
            2 * turns - 1) * images
    return within


# --- main ----------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    photos = load_photos()
    tiles, flat = cut_tiles(photos)
    lfw = load_lfw()
    rng = np.random.default_rng(args.seed)
    recall_tiles = sorted(rng.choice(sorted(tiles), size=min(args.recall_tiles, len(tiles)), replace=False))
    print(f"{len(photos)} photos, {len(tiles)} tiles ({flat} flat ones dropped), {len(lfw)} LFW crops", flush=True)

    SOURCES.update(photos)
    SOURCES.update(tiles)
    distinct = {**photos, **tiles, **lfw}
    with tempfile.TemporaryDirectory() as tmp:
        originals = {name: jpeg(image) for name, image in distinct.items()}  # the "web" copy: JPEG q95
        paths = {}
        for i, (name, data) in enumerate(originals.items()):
            paths[name] = os.path.join(tmp, f"{i:05d}.jpg")
            Path(paths[name]).write_bytes(data)
        tasks = [(name, kind, i, args.seed) for name in photos for kind in KINDS for i in range(args.per_kind)]
        tasks += [(name, kind, i, args.seed) for name in recall_tiles for kind in KINDS for i in range(args.per_tile)]
        with get_context("fork").Pool(args.workers) as pool:
            dataset = dict(pool.imap_unordered(_hash_item, originals.items(), chunksize=8))
            references = dict(pool.imap_unordered(_reference_item, paths.items(), chunksize=8))
            print(f"hashed {len(dataset)} distinct images in {time.perf_counter() - started:.0f} s", flush=True)
            variants = list(pool.imap_unordered(_variant_item, tasks, chunksize=4))
            print(f"hashed {len(variants)} near-copies in {time.perf_counter() - started:.0f} s", flush=True)

    # near-duplicates: distances per kind, hash, and decision path
    near: dict = {}
    crop_bins: dict = {}
    for group, sources in (("photos", set(photos)), ("tiles", set(recall_tiles))):
        rows = [v for v in variants if v["source"] in sources]
        for kind in KINDS:
            kind_rows = [v for v in rows if v["kind"] == kind]
            for hname in HASHES:
                dedupe = [pair_distance(v["hashes"][hname], dataset[v["source"]][hname]) for v in kind_rows]
                decontam = [min(pair_distance(v["hashes"][hname], side) for side in references[v["source"]][hname])
                            for v in kind_rows]
                near.setdefault(group, {}).setdefault(kind, {})[hname] = {
                    "dedupe": recall_table(dedupe), "decontam": recall_table(decontam)}
        crop_rows = [v for v in rows if v["kind"] == "crop"]
        for hname in HASHES:
            bins: dict = {}
            for v in crop_rows:
                amount = max(v["params"]["crop_x"], v["params"]["crop_y"])
                label = f"{int(amount * 100)}-{int(amount * 100) + 1}%"
                bins.setdefault(label, []).append(pair_distance(v["hashes"][hname], dataset[v["source"]][hname]))
            crop_bins.setdefault(group, {})[hname] = {
                label: {"n": len(d), "recall": {k: float((np.array(d) <= k).mean()) for k in KS}}
                for label, d in sorted(bins.items())}
        worst = sorted(((pair_distance(v["hashes"]["pipeline"], dataset[v["source"]]["pipeline"]),
                         v["source"], v["kind"], v["params"]) for v in rows if v["kind"] not in MIRROR_KINDS),
                       key=lambda t: -t[0])[:15]
        near.setdefault(group, {})["worst_pipeline_dedupe"] = [
            {"distance": d, "source": s, "kind": k, "params": p} for d, s, k, p in worst]
    per_source = {}
    for name in photos:
        d = [pair_distance(v["hashes"]["pipeline"], dataset[name]["pipeline"])
             for v in variants if v["source"] == name and v["kind"] not in MIRROR_KINDS]
        per_source[name] = {"n": len(d), "recall_at_default": float((np.array(d) <= DEFAULT_K).mean()),
                            "max_distance": int(max(d))}

    # distinct pairs
    names = list(distinct)
    group_of = {n: ("photo" if n in photos else "tile" if n in tiles else "lfw") for n in names}
    parent = {n: n.split("@")[0] for n in names}
    is_photo = np.array([group_of[n] == "photo" for n in names])
    is_tile = np.array([group_of[n] == "tile" for n in names])
    is_lfw = np.array([group_of[n] == "lfw" for n in names])
    parents = np.array([parent[n] for n in names])
    iu = np.triu_indices(len(names), 1)
    off_diagonal = ~np.eye(len(names), dtype=bool)
    masks = {
        "photos": is_photo[:, None] & is_photo[None, :],
        "whole_images": (is_photo | is_lfw)[:, None] & (is_photo | is_lfw)[None, :],
        "photos+tiles": (is_photo | is_tile)[:, None] & (is_photo | is_tile)[None, :],
        "tiles_of_different_photos": is_tile[:, None] & is_tile[None, :] & (parents[:, None] != parents[None, :]),
        "tiles_of_the_same_photo": is_tile[:, None] & is_tile[None, :] & (parents[:, None] == parents[None, :]),
        "lfw": is_lfw[:, None] & is_lfw[None, :],
        "all": np.ones((len(names), len(names)), dtype=bool),
    }
    distinct_out: dict = {}
    closest: dict = {}
    for hname in HASHES:
        dd = distance_matrix([dataset[n][hname] for n in names])
        dr = reference_matrix([dataset[n][hname] for n in names], [references[n][hname] for n in names])
        for label, mask in masks.items():
            distinct_out.setdefault(label, {})[hname] = {
                "dedupe": merge_table(dd[iu][mask[iu]]),
                "decontam": merge_table(dr[mask & off_diagonal])}
        if hname == "pipeline":
            order = np.argsort(dd[iu], kind="stable")[:20]
            closest = [{"a": names[iu[0][i]], "b": names[iu[1][i]], "distance": int(dd[iu][i])} for i in order]

    # stereo pair: two photos of one scene a few cm apart (not in the distinct set)
    left, right, _ = __import__("skimage.data", fromlist=["x"]).stereo_motorcycle()
    views = [dataset_hashes(jpeg(Image.fromarray(view))) for view in (left, right)]
    stereo = {hname: pair_distance(views[0][hname], views[1][hname]) for hname in ("pipeline", "phash_plain")}

    quality_seconds = time.perf_counter() - started
    print(f"quality done in {quality_seconds:.0f} s; measuring cost", flush=True)
    cost = {"throughput_per_core": throughput(photos, CONFIG),
            "memory": memory_and_comparisons(args.items, args.band_items, args.bucket_filed, args.seed, DEFAULT_K, KS)}

    # verdicts
    def meets(k: int, hname: str) -> dict:
        recalls = {kind: near["photos"][kind][hname]["decontam" if kind in MIRROR_KINDS else "dedupe"]["recall"][k]
                   for kind in KINDS}
        merges = {f"{label} {path}": distinct_out[label][hname][path]["merge_rate"][k]
                  for label in ("whole_images", "all") for path in ("dedupe", "decontam")}
        return {"recall": recalls, "recall_ok": {kind: r >= RECALL_TARGET for kind, r in recalls.items()},
                "merge_rate": merges, "merge_ok": max(merges.values()) <= MERGE_TARGET,
                "random_neighbours_per_image_at_50M": random_neighbours(hname, k)}
    verdict = {h: {k: meets(k, h) for k in KS} for h in HASHES}
    best = {h: [k for k in KS if all(verdict[h][k]["recall_ok"].values()) and verdict[h][k]["merge_ok"]]
            for h in HASHES}

    return {"command": "python -m bench.dedupe_quality " + " ".join(args.argv), "machine": {
                "python": platform.python_version(), "cpus": os.cpu_count(), "workers": args.workers,
                "loadavg_at_start": args.loadavg,
                "imagehash": imagehash.__version__, "pillow": Image.__version__},
            "default_k": DEFAULT_K, "targets": {"recall": RECALL_TARGET, "merge_rate": MERGE_TARGET},
            "counts": {"photos": len(photos), "tiles": len(tiles), "flat_tiles_dropped": flat, "lfw": len(lfw),
                       "recall_tiles": len(recall_tiles), "per_kind": args.per_kind, "per_tile": args.per_tile,
                       "variants": len(variants)},
            "near_duplicates": near, "crop_recall_by_amount": crop_bins, "per_source_at_default": per_source,
            "distinct": distinct_out, "closest_distinct_pairs": closest, "stereo_pair_distance": stereo,
            "verdict": verdict, "k_meeting_all_targets": best,  # merges: whole images, and with tiles
            "cost": cost,
            "seconds": {"quality": quality_seconds, "total": time.perf_counter() - started}}


def summary(result: dict) -> str:
    lines = []
    k0 = result["default_k"]
    lines.append(f"recall (photos; decontam path for mirror kinds) at k = {KS}")
    for hname in HASHES:
        lines.append(f"  {hname}")
        for kind in KINDS:
            path = "decontam" if kind in MIRROR_KINDS else "dedupe"
            r = result["near_duplicates"]["photos"][kind][hname][path]
            lines.append(f"    {kind:22s} n={r['n']:4d} " + " ".join(f"{r['recall'][k]:.3f}" for k in KS))
        for label in ("whole_images", "all"):
            for path in ("dedupe", "decontam"):
                m = result["distinct"][label][hname][path]
                lines.append(f"    merge {label:12s} {path:8s} pairs={m['pairs']:6d} "
                             + " ".join(f"{m['merge_rate'][k] * 100:.4f}%" for k in KS))
    lines.append(f"k meeting every target: {result['k_meeting_all_targets']} (default {k0})")
    for hname in ("pipeline", "phash_plain"):
        bins = result["crop_recall_by_amount"]["photos"][hname]
        lines.append(f"crop recall at k={k0} by amount, {hname}: "
                     + ", ".join(f"{label} {b['recall'][k0]:.3f} (n={b['n']})" for label, b in bins.items()))
    cost = result["cost"]
    lines.append("throughput per core: " + ", ".join(f"{k} {v:.0f}/s" for k, v in cost["throughput_per_core"].items()))
    mem = cost["memory"]
    lines.append(f"items {mem['items_GB_per_million']:.3f} GB/M, band rows k={k0} ({mem['band_rows_per_item'][k0]} per"
                 f" item) {mem['band_rows_GB_per_million']:.2f} GB/M ({mem['shuffled_GB_per_million']:.2f} GB/M with"
                 f" the partition column); at 50M: {mem['at_50M']['candidate_comparisons_per_item'][k0]:.0f}"
                 f" comparisons per item, {mem['at_50M']['core_hours']:.0f} core-hours")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import sys
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/bench/dedupe_quality.json")
    parser.add_argument("--per-kind", type=int, default=24, help="random copies of each photo per kind")
    parser.add_argument("--recall-tiles", type=int, default=60, help="tiles also used as near-duplicate sources")
    parser.add_argument("--per-tile", type=int, default=4, help="random copies of each such tile per kind")
    parser.add_argument("--items", type=int, default=100_000, help="synthetic items for the Arrow sizes")
    parser.add_argument("--band-items", type=int, default=20_000, help="of which expanded by band_rows")
    parser.add_argument("--bucket-filed", type=int, default=3000, help="filed rows of the timed bucket")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = argv
    args.loadavg = os.getloadavg()
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(summary(result))
    print(f"written {out} in {result['seconds']['total']:.0f} s")


if __name__ == "__main__":
    main()
