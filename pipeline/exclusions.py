"""The --exclude-images sets (benchmark test splits): found, hashed once and cached in
OUT/exclusions/SET.parquet. near_dedupe compares their whole-image hashes, face_overlaps their
face hashes, with what the build wrote."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import ray
from PIL import Image, ImageOps

from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError
from pipeline.decode import phashes
from pipeline.detect import RetinaFaceDetector
from pipeline.face_hash import JITTERS, shared_face_hasher
from pipeline.schema import PHASH_VERSION, PHASH_VERSION_KEY, phash_version
from pipeline.storage import Output

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EXCLUSIONS_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()),
                               ("phashes", pa.list_(pa.string())), ("phashes_mirror", pa.list_(pa.string())),
                               ("face_phashes", pa.list_(pa.string())), ("face_phashes_mirror", pa.list_(pa.string())),
                               ("face_check_hashes", pa.list_(pa.string())),
                               ("face_check_hashes_mirror", pa.list_(pa.string()))],
                              metadata={PHASH_VERSION_KEY: PHASH_VERSION})


def exclusion_sets(patterns: list[str]) -> dict[str, list[str]]:
    """{set name: image paths}; a folder's name, or the last folder before a glob's wildcards."""
    sets: dict[str, list[str]] = {}
    for pattern in patterns:
        fs, root = fsspec.core.url_to_fs(pattern)
        if fs.isdir(root):
            files, name = fs.find(root), root.rstrip("/").rsplit("/", 1)[-1]
        else:
            files = fs.glob(root)
            folder = root.split("*", 1)[0].split("?", 1)[0].rsplit("/", 1)[0]  # drop a partial file name
            name = folder.rsplit("/", 1)[-1]
        images = sorted(f for f in files if f.lower().endswith(IMAGE_SUFFIXES))
        if not images:
            raise ConfigError(f"--exclude-images {pattern}: no images found")
        protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        sets.setdefault(name, []).extend(protocol + f for f in images)
    return sets


def hash_files(batch: dict) -> dict:
    """EXCLUSIONS_SCHEMA columns for a batch of image paths: the pHashes (decode.phashes) of each image and of its
    mirror, and the jittered face pHashes and check hashes of every face in either (face by face,
    each face's face_hash.VIEWS one after the other, 7 alignments each: face_hash.JITTERS), found
    by RetinaFace with the build's default size and score (the cache holds one answer per file)."""
    defaults = BuildConfig()
    detector = RetinaFaceDetector(defaults.detect_size, use_gpu=False)
    hasher = shared_face_hasher()
    out: dict[str, list] = {name: [] for name in EXCLUSIONS_SCHEMA.names}
    for path in batch["path"]:
        fs, local = fsspec.core.url_to_fs(path)
        info = fs.info(local)
        with fs.open(local, "rb") as f, Image.open(f) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
        out["path"].append(path), out["size"].append(int(info.get("size", 0)))
        out["mtime"].append(float(info.get("mtime", 0) or 0))
        for suffix, picture in (("", upright), ("_mirror", ImageOps.mirror(upright))):
            rgb = np.asarray(picture)
            faces = [face for face in detector([rgb])[0] if face.score >= defaults.min_face_score]
            out[f"phashes{suffix}"].append(phashes(picture))
            views = [view for face in faces for view in hasher.hashes(rgb, face.landmarks, JITTERS)]
            out[f"face_phashes{suffix}"].append([phash for view in views for phash, _ in view])
            out[f"face_check_hashes{suffix}"].append([check for view in views for _, check in view])
    return out


def exclusion_rows(output: Output, patterns: list[str]) -> dict[str, list[dict]]:
    """{set name: EXCLUSIONS_SCHEMA rows of its images}, hashed once and cached in OUT/exclusions/."""
    found = {}
    for name, paths in exclusion_sets(patterns).items():
        cache_path = output.path("exclusions", f"{name}.parquet")
        cached = output.read_table(cache_path) if output.fs.exists(cache_path) else EXCLUSIONS_SCHEMA.empty_table()
        current = cached.schema.equals(EXCLUSIONS_SCHEMA) and phash_version(cached.schema) == PHASH_VERSION  # else: rehash
        known = {r["path"]: r for r in cached.to_pylist()} if current else {}
        todo = [p for p in paths if p not in known]  # a file is hashed once; delete the cache to redo
        if todo:
            fresh = ray.data.from_items([{"path": p} for p in todo]).map_batches(hash_files, batch_size=64)
            known.update({r["path"]: r for r in fresh.take_all()})
            output.makedirs(output.path("exclusions"))
            output.write_table(cache_path, pa.Table.from_pylist(sorted(known.values(), key=lambda r: r["path"]),
                                                                schema=EXCLUSIONS_SCHEMA))
        found[name] = [known[p] for p in paths]
    return found
