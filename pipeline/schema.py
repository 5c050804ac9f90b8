"""The data contract between stages and of the output tables.

Stages pass *work units*: one unit is a slice of one input file (`shard_size` rows) and
becomes one shard. A unit travels through Ray Data as one row `{"unit": int, "shard": str, "samples": bytes}`
whose bytes are the pickled `list[Sample]`, so a unit is never split across blocks and can
be committed (or redone) as a whole.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

# Every outcome a row can have, with what it means. `ok` rows are in the shards.
STATUSES: dict[str, str] = {
    "ok": "written to the shards",
    "not_in_allowlist": "SAMPLE_ID not in the --sample-ids allow-list",
    "taken_down": "on a takedown list: its URL (--exclude-urls), or its image by sha256 or pHash (--exclude-hashes)",
    "filtered_metadata": "dropped by a metadata filter (NSFW, similarity, size, caption length)",
    "invalid_url": "missing URL, or a scheme other than http/https",
    "duplicate_url": "same URL as an earlier row (duplicate_of names it)",
    "blocked_address": "resolves to a private, loopback, link-local, multicast or reserved address",
    "opted_out": "X-Robots-Tag asked AI/index crawlers to stay away",
    "robots_disallowed": "the host's robots.txt disallows the URL for our user agent or * (--respect-robots)",
    "timeout": "connect/read timeout or total URL deadline exceeded (transient)",
    "rate_limited": "HTTP 429 after every retry (transient)",
    "server_error": "HTTP 5xx after every retry (transient)",
    "connection_error": "connection refused, reset or DNS failure (transient)",
    "http_error": "HTTP 4xx other than 429",
    "too_many_redirects": "more redirect hops than max_redirects, or a redirect loop",
    "too_large": "response body larger than max_bytes",
    "decode_error": "not an image, or a truncated or corrupt one",
    "image_too_large": "more pixels than max_image_pixels (decompression-bomb guard)",
    "no_face": "the detector found no face",
    "face_rejected": "faces found, none passing min_face_score and min_face_size",
    "duplicate_image": "same image bytes (sha256) as another written row (duplicate_of names it)",
    "near_duplicate": "perceptual hash (whole image, or its inner part) near a kept image's (duplicate_of names it)",
    "benchmark_overlap": "perceptual hash within near_duplicate_distance of an --exclude-images image or its mirror",
}
TRANSIENT_STATUSES = frozenset({"timeout", "rate_limited", "server_error", "connection_error"})

FACE_TYPE = pa.struct([
    ("box", pa.list_(pa.float32())),  # x1, y1, x2, y2 in original-image pixels
    ("landmarks", pa.list_(pa.list_(pa.float32()))),  # 5 x [x, y]: eyes, nose, mouth corners
    ("score", pa.float32()),
    ("phashes", pa.list_(pa.string())),  # pHashes of the face aligned by its landmarks, one per face_hash.VIEWS
    ("check_hashes", pa.list_(pa.string())),  # their 144-bit check hashes (face_hash.check_hash), one per view
])

# Which decode.phashes made `phash`, `phash_crops` and `phash_inner`, and face_hash the faces' `phashes`: bump it when
# their output changes, so that hashes of two versions are never compared (a build checks it against
# what it finds). 2: faces have a phash. 3: three, one per face_hash.VIEWS. 4: and a check hash each.
# 5: an image's own pHash is of it without letterbox bars (decode.phashes). 6: and `phash_inner`.
PHASH_VERSION = "7"
PHASH_VERSION_KEY = b"phash_version"  # where METADATA_SCHEMA and the exclusion caches record it


def phash_version(schema: pa.Schema) -> str | None:
    """The pHash version a file's schema records; None for files written before versions existed."""
    version = (schema.metadata or {}).get(PHASH_VERSION_KEY)
    return version.decode() if version is not None else None

METADATA_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("sample_id", pa.int64()),
    ("width", pa.int32()),  # stored image
    ("height", pa.int32()),
    ("original_width", pa.int32()),  # image as downloaded (after EXIF orientation)
    ("original_height", pa.int32()),
    ("sha256", pa.string()),  # of the stored bytes
    ("phash", pa.string()),  # 64-bit perceptual hash (pHash) of the stored image, 16 hex digits
    ("phash_crops", pa.list_(pa.string())),  # pHashes of its 15 crops by 2% on 1-4 sides (decode.phashes)
    ("phash_inner", pa.list_(pa.string())),  # pHashes of its inner part, as it is and turned (decode.TURNS)
    ("num_faces", pa.int32()),
    ("faces", pa.list_(FACE_TYPE)),
    ("detected_by", pa.string()),  # the detector's backend: onnxruntime-cpu, torch-cuda-fp16, ...
    ("license", pa.string()),
    ("nsfw", pa.string()),
    ("similarity", pa.float32()),
], metadata={PHASH_VERSION_KEY: PHASH_VERSION})

STATUS_SCHEMA = pa.schema([
    ("input_file", pa.string()),
    ("input_row", pa.int64()),
    ("unit", pa.int32()),
    ("sample_id", pa.int64()),
    ("url", pa.string()),
    ("key", pa.string()),  # set when written
    ("shard", pa.string()),  # set when written
    ("status", pa.string()),
    ("reason", pa.string()),
    ("duplicate_of", pa.string()),  # key of the kept copy (duplicates), path of the excluded image (overlaps)
    ("http_status", pa.int32()),
    ("distance", pa.int32()),  # Hamming distance of the perceptual hashes, for near_duplicate and benchmark_overlap
    ("overlap_set", pa.string()),  # name of the --exclude-images set, for benchmark_overlap
])


def make_key(file_index: int, row: int) -> str:
    """The deterministic key of an input row: 5 digits of input file, 9 of row."""
    return f"{file_index:05d}{row:09d}"


def shard_name(unit: int, attempt: int = 0) -> str:
    """Unit u's first pass writes shard '0000u'; the n-th --retry-failed pass '0000u_n'."""
    return f"{unit:05d}" if attempt == 0 else f"{unit:05d}_{attempt}"


def shard_unit(name: str) -> int:
    """The unit of a shard, or of a file named after one: '00003_1.tar' -> 3, '123456.tar' -> 123456."""
    return int(name.split(".")[0].split("_")[0])


def shard_attempt(name: str) -> int:
    """Which pass wrote a shard: '00003' -> 0, '00003_2' -> 2."""
    return int(name.split(".")[0].split("_")[1]) if "_" in name else 0


@dataclass
class Face:
    box: list[float]
    landmarks: list[list[float]]
    score: float
    phashes: list[str] | None = None  # set for the faces kept (face_hash.FaceHasher.hash_samples)
    check_hashes: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"box": self.box, "landmarks": self.landmarks, "score": self.score, "phashes": self.phashes,
                "check_hashes": self.check_hashes}


@dataclass
class Sample:
    """One input row on its way through the stages. `status` stays None while it is pending."""

    key: str
    unit: int
    input_file: str
    input_row: int
    url: str | None
    caption: str | None
    sample_id: int | None = None
    license: str | None = None
    nsfw: str | None = None
    similarity: float | None = None
    status: str | None = None
    reason: str | None = None
    duplicate_of: str | None = None
    http_status: int | None = None
    content: bytes | None = None  # downloaded bytes, then the stored JPEG
    original_width: int | None = None
    original_height: int | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    phash: str | None = None
    phash_crops: list[str] | None = None
    phash_inner: list[str] | None = None
    faces: list[Face] = field(default_factory=list)
    detected_by: str | None = None  # which backend found the faces (detect.make_detector's `name`)

    @property
    def pending(self) -> bool:
        return self.status is None

    def fail(self, status: str, reason: str, keep_content: bool = False) -> None:
        """Give the sample its final status; keep_content keeps a decoded image for the report's
        thumbnails of rejected images."""
        assert status in STATUSES, status
        self.status, self.reason = status, reason
        if not keep_content:
            self.content = None

    def metadata(self, shard: str) -> dict[str, Any]:
        return {
            "key": self.key, "shard": shard, "url": self.url, "caption": self.caption,
            "sample_id": self.sample_id, "width": self.width, "height": self.height,
            "original_width": self.original_width, "original_height": self.original_height,
            "sha256": self.sha256, "phash": self.phash, "phash_crops": self.phash_crops,
            "phash_inner": self.phash_inner, "num_faces": len(self.faces), "faces": [f.to_dict() for f in self.faces],
            "detected_by": self.detected_by,
            "license": self.license, "nsfw": self.nsfw, "similarity": self.similarity,
        }

    def status_row(self, shard: str | None) -> dict[str, Any]:
        written = self.status == "ok"
        return {
            "input_file": self.input_file, "input_row": self.input_row, "unit": self.unit,
            "sample_id": self.sample_id, "url": self.url,
            "key": self.key if written else None, "shard": shard if written else None,
            "status": self.status, "reason": self.reason, "duplicate_of": self.duplicate_of,
            "http_status": self.http_status, "distance": None, "overlap_set": None,
        }


def pack(unit: int, shard: str, samples: list[Sample]) -> dict[str, Any]:
    return {"unit": unit, "shard": shard, "samples": pickle.dumps(samples, protocol=pickle.HIGHEST_PROTOCOL)}


def iter_units(batch: dict[str, Any]) -> Iterator[tuple[int, str, list[Sample]]]:
    """(unit, shard, samples) for every packed unit in a Ray Data batch."""
    for unit, shard, data in zip(batch["unit"], batch["shard"], batch["samples"]):
        yield int(unit), str(shard), pickle.loads(data)


def map_units(batch: dict[str, Any], fn: Callable[[list[Sample]], list[Sample]]) -> dict[str, list]:
    """Apply fn to the samples of every unit in a Ray Data batch of packed units."""
    out: dict[str, list] = {"unit": [], "shard": [], "samples": []}
    for unit, shard, samples in iter_units(batch):
        for name, value in pack(unit, shard, fn(samples)).items():
            out[name].append(value)
    return out
