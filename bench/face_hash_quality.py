"""Does the aligned-face pHash (pipeline.face_hash) catch the web copies that the whole-image pHashes
miss? Measured on the bench photos that show faces.

    python -m bench.face_hash_quality [--per-kind 12] [--out out/bench/face_hash_quality.json]

Sources: bench.dedupe_images' photos in which the pipeline's detector (RetinaFace, score >= 0.9)
finds a face. Each web family of bench.dedupe_images (crops of 3-15 % on one to four sides,
letterbox bars, turns of 1-5 degrees, greyscale, a caption bar, three JPEG rounds, combinations)
makes --per-kind copies of each. Every original and copy is stored as the builder stores it
(pipeline.decode.decode_image) and gets:

  pipeline   its pHashes, compared as near_dedupe does (bench.dedupe_quality.pair_distance)
  face       pipeline.face_hash of each face it shows (score >= 0.9; a copy is caught when any of
             its faces is near any of its original's): the copy's plain hashes, one per view,
             against the original's 7 jittered ones per view, every view with every view, as
             --exclude-images compares a written face with a reference image's; and each view
             alone against the same view (what each adds)

Recall: a copy counts as caught at k when its distance to its original is <= k; "face" counts,
as the build does, only pairs whose check hashes (pipeline.face_hash.check_hash, 144 bits) are
within CHECK_DISTANCE as well, "face_phash_alone" and the single views do not; "either" when whole
image or face is (what --exclude-images decides).

Distinct faces: every face the detector finds at >= 0.9 in the photos (group photos give several
people), all pairs, every view of one against every view of the other; and, as decontamination
compares them, scikit-image's 100 LFW crops (the only distinct faces installed by the hundred:
25-px grey, enlarged to LFW_SIDE), every ordered pair one as written, the other as an excluded
image with its mirror, with the rate at k = 6 and the share of written faces it would remove
against a benchmark of EXCLUDED_FACES faces.

Also a looser rule, measured and not used: a pair matches when its pHashes are within
SUM_PHASH_LIMIT and its pHash and check distances add up to at most T (one 208-bit distance); the
recall per family at SUM_LIMITS and the closest distinct LFW pairs by that sum say what it would
gain and how near distinct people come.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import zlib
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy.stats import beta

from bench.dedupe_images import KINDS, load_lfw, load_photos, transform
from bench.dedupe_quality import pair_distance
from pipeline.build_config import BuildConfig
from pipeline.decode import decode_image
from pipeline.detect import RetinaFaceDetector
from pipeline.face_hash import CHECK_DISTANCE, JITTERS, VIEWS, shared_face_hasher

WEB_KINDS = KINDS[KINDS.index("crop10"):]
KS = (4, 6, 8, 10, 12)
MIN_SCORE = 0.9
CONFIG = BuildConfig()
LFW_SIDE = 100  # scikit-image's 25-px LFW crops, enlarged so that RetinaFace finds the faces
EXCLUDED_FACES = (1_000, 10_000, 30_000)  # a benchmark's test faces; FaRL's together are ~30k
SUM_PHASH_LIMIT, SUM_LIMITS = 12, (32, 36, 40)  # the looser rule: pHash within 12, pHash + check within T


def stored(data: bytes) -> tuple[np.ndarray, list[int]]:
    """The image as the builder stores it, and its pHashes (decode.phashes)."""
    jpeg, *_, hashes = decode_image(data, CONFIG)
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), [int(h, 16) for h in hashes]


def bits(a: int, b: int) -> int:
    return (a ^ b).bit_count()


Hashes = tuple[int, int]  # an aligned face's pHash and check hash (pipeline.face_hash.check_hash)


def face_distance(copy_faces: list[list[Hashes]], reference_faces: list[list[list[Hashes]]], same_view: int | None,
                  checked: bool | None = True) -> int:
    """The smallest pHash distance between a copy's faces (a plain hash per view) and its original's
    (7 jittered hashes per view): every view against every view, or only view `same_view` against
    itself; `checked`: only pairs whose check hashes are within CHECK_DISTANCE, as the build counts;
    None: the looser rule's pHash + check distance instead (sum_distance)."""
    pairs = [(c[v], h) for c in copy_faces for r in reference_faces for v in range(len(VIEWS)) for w in range(len(VIEWS))
             if same_view is None or v == w == same_view for h in r[w]]
    if checked is None:
        return sum_distance(pairs)
    return min((bits(a[0], b[0]) for a, b in pairs if not checked or bits(a[1], b[1]) <= CHECK_DISTANCE),
               default=65)  # 65: no face found


def sum_distance(pairs: list[tuple[Hashes, Hashes]]) -> int:
    """The smallest pHash + check distance of the pairs whose pHashes are within SUM_PHASH_LIMIT."""
    return min((bits(a[0], b[0]) + bits(a[1], b[1]) for a, b in pairs if bits(a[0], b[0]) <= SUM_PHASH_LIMIT),
               default=999)


def lfw_faces(detector: RetinaFaceDetector, face_hashes) -> list[tuple[int, list[Hashes], list[list[Hashes]]]]:
    """scikit-image's 100 LFW face crops: per crop in which a face is found, its best face's plain
    hashes as the build stores the image, and as --exclude-images hashes a file: 7 jittered hashes
    per view of the best face of the crop and of its mirror."""
    found = []
    crops = [crop for name, crop in load_lfw().items() if "_face_" in name]
    for index, crop in enumerate(crops):
        image = crop.resize((LFW_SIDE, LFW_SIDE), Image.BICUBIC)
        rgb = stored(_jpeg(image))[0]
        written = [f for f in detector([rgb])[0] if f.score >= MIN_SCORE]
        references = []
        for picture in (image, ImageOps.mirror(image)):
            faces = [f for f in detector([np.asarray(picture)])[0] if f.score >= MIN_SCORE]
            references += face_hashes(np.asarray(picture), [max(faces, key=lambda f: f.score)], JITTERS) if faces else []
        plain = face_hashes(rgb, [max(written, key=lambda f: f.score)]) if written else []
        if plain and references:
            found.append((index, [view[0] for view in plain[0]], [view for face in references for view in face]))
    return found


def distinct_lfw(faces: list[tuple[int, list[Hashes], list[list[Hashes]]]]) -> dict:
    """Every ordered pair of distinct LFW faces as decontamination compares them: one as written,
    the other as excluded; how many are within k, and what that projects to against a benchmark."""
    rows = []
    for (a, written, _), (b, _, excluded) in ((x, y) for x in faces for y in faces if x[0] != y[0]):
        pairs = [(w, e) for w in written for view in excluded for e in view]
        rows.append((min(bits(w[0], e[0]) for w, e in pairs),
                     min((bits(w[0], e[0]) for w, e in pairs if bits(w[1], e[1]) <= CHECK_DISTANCE), default=65), a, b,
                     sum_distance(pairs), min(bits(w[1], e[1]) for w, e in pairs)))
    result: dict = {"face_count": len(faces), "ordered_pairs": len(rows),
                    "closest_by_phash_plus_check": sorted(row[4] for row in rows)[:10],
                    "closest_by_check": sorted(row[5] for row in rows)[:10]}
    for name, column in (("phash_alone", 0), ("checked", 1)):
        distances = np.array([row[column] for row in rows])
        matched = int((distances <= 6).sum())
        rate_high = float(beta.ppf(0.975, matched + 1, len(rows) - matched))  # Clopper-Pearson, 95 %
        result[name] = {"within": {k: int((distances <= k).sum()) for k in KS},
                        "rate_k6": matched / len(rows), "rate_k6_upper_95": rate_high,
                        "written_faces_removed_k6": {e: {"at_rate": 1 - (1 - matched / len(rows)) ** e,
                                                         "at_upper_95": 1 - (1 - rate_high) ** e}
                                                     for e in EXCLUDED_FACES},
                        "closest": [{"distance": int(row[column]), "written": row[2], "excluded": row[3]}
                                    for row in sorted(rows, key=lambda r: r[column])[:6]]}
    return result


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    detector = RetinaFaceDetector(CONFIG.detect_size, use_gpu=False)
    hasher = shared_face_hasher()

    def face_hashes(rgb: np.ndarray, faces: list, jitters=JITTERS[:1]) -> list[list[list[Hashes]]]:
        """Per face, per view, its hashes; a face whose landmarks align nothing ([]) is left out, as the build does."""
        views = [hasher.hashes(rgb, f.landmarks, jitters) for f in faces]
        return [[[(int(phash, 16), int(check, 16)) for phash, check in view] for view in face]
                for face in views if face]

    sources, distinct = {}, []
    for name, photo in load_photos().items():
        rgb, hashes = stored(_jpeg(photo))
        faces = [f for f in detector([rgb])[0] if f.score >= MIN_SCORE]
        if faces:
            sources[name] = (photo, hashes, face_hashes(rgb, faces, JITTERS))  # JITTERS[0]: the plain alignment
            distinct += [(f"{name}#{i}", [view[0][0] for view in face]) for i, face in enumerate(sources[name][2])]
    print(f"{len(sources)} photos with a face, {len(distinct)} distinct faces", flush=True)
    methods = ["pipeline", "face", "face_phash_alone", *VIEWS]
    distances: dict[str, dict[str, list]] = {kind: {method: [] for method in methods} for kind in WEB_KINDS}
    missed_face = {kind: 0 for kind in WEB_KINDS}
    sums: dict[str, list[int]] = {kind: [] for kind in WEB_KINDS}  # the looser rule's distances
    face_seconds: list[tuple[float, int]] = []  # (seconds, faces) of hashing a copy's faces
    for name, (photo, hashes, reference_faces) in sources.items():
        for kind in WEB_KINDS:
            for i in range(args.per_kind):
                rng = np.random.default_rng([args.seed, zlib.crc32(name.encode()), KINDS.index(kind), i])
                rgb, copy_hashes = stored(transform(photo, kind, rng)[0])
                distances[kind]["pipeline"].append(pair_distance(copy_hashes, hashes))
                copy_faces = [f for f in detector([rgb])[0] if f.score >= MIN_SCORE]
                missed_face[kind] += not copy_faces
                started_faces = time.perf_counter()
                copy_views = [[view[0] for view in face] for face in face_hashes(rgb, copy_faces)]
                face_seconds.append((time.perf_counter() - started_faces, len(copy_faces)))
                distances[kind]["face"].append(face_distance(copy_views, reference_faces, None))
                distances[kind]["face_phash_alone"].append(face_distance(copy_views, reference_faces, None, checked=False))
                sums[kind].append(face_distance(copy_views, reference_faces, None, checked=None))
                for v, view in enumerate(VIEWS):
                    distances[kind][view].append(face_distance(copy_views, reference_faces, v, checked=False))
    for by in distances.values():  # what --exclude-images decides: either within k
        by["either"] = np.minimum(by["pipeline"], by["face"]).tolist()
    recall = {kind: {method: {k: float(np.mean(np.array(d) <= k)) for k in KS} for method, d in by.items()}
              for kind, by in distances.items()}
    pairs = sorted((min(bits(a, b) for a in views_a for b in views_b), x, y)
                   for (x, views_a), (y, views_b) in combinations(distinct, 2))
    return {"command": "python -m bench.face_hash_quality " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                          for k, v in vars(args).items() if k != "out"),
            "photos": sorted(sources), "copies_per_kind": args.per_kind * len(sources), "recall": recall,
            "phash_plus_check_recall": {kind: {t: float(np.mean(np.array(d) <= t)) for t in SUM_LIMITS}
                                        for kind, d in sums.items()},
            "copies_without_a_face_found": missed_face, "distinct_faces": len(distinct),
            "distinct_pairs": len(pairs), "distinct_pairs_within": {k: sum(d <= k for d, _, _ in pairs) for k in KS},
            "closest_distinct_pairs": [{"distance": d, "a": x, "b": y} for d, x, y in pairs[:8]],
            "distinct_lfw": distinct_lfw(lfw_faces(detector, face_hashes)),
            "ms_per_face_hash": round(1000 * sum(s for s, _ in face_seconds) / max(1, sum(n for _, n in face_seconds)), 1),
            "seconds": round(time.perf_counter() - started, 1)}


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def summary(result: dict) -> str:
    lines = [f"{result['copies_per_kind']} copies per family of {len(result['photos'])} photos: "
             f"{', '.join(result['photos'])}", f"{'family':28} {'method':20} " + " ".join(f"k={k:<4}" for k in KS)]
    for kind, by in result["recall"].items():
        for method, values in by.items():
            lines.append(f"{kind:28} {method:20} " + " ".join(f"{values[k]:.3f} " for k in KS))
    lines.append(f"looser rule (pHash within {SUM_PHASH_LIMIT}, pHash + check within T), recall at T = {SUM_LIMITS}:")
    for kind, by in result["phash_plus_check_recall"].items():
        lines.append(f"{kind:28} " + " ".join(f"{by[t]:.3f}" for t in SUM_LIMITS))
    lines.append(f"copies without a face found: {result['copies_without_a_face_found']}")
    lines.append(f"{result['distinct_faces']} distinct faces, {result['distinct_pairs']} pairs; within k: "
                 f"{result['distinct_pairs_within']}; closest: {result['closest_distinct_pairs'][:3]}")
    lfw = result["distinct_lfw"]
    for name in ("phash_alone", "checked"):
        by = lfw[name]
        lines.append(f"LFW, {lfw['face_count']} faces, {lfw['ordered_pairs']} ordered pairs as decontamination compares them "
                     f"({name}): within k {by['within']}; rate at k=6 {by['rate_k6']:.2e} (95 % upper "
                     f"{by['rate_k6_upper_95']:.2e}); written faces removed against "
                     + ", ".join(f"{e:,} excluded faces: {p['at_rate']:.1%} (upper {p['at_upper_95']:.1%})"
                                 for e, p in by["written_faces_removed_k6"].items()))
    lines.append(f"LFW: closest distinct pairs by pHash + check: {lfw['closest_by_phash_plus_check']}; "
                 f"by check alone: {lfw['closest_by_check']}")
    lines.append(f"{result['ms_per_face_hash']} ms per face hashed (second looks included), one core")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/bench/face_hash_quality.json")
    parser.add_argument("--per-kind", type=int, default=12, help="copies of each photo per web family")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(summary(result))
    print(f"written {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
