"""Takedowns: deny-lists of URLs and image hashes that a build never writes and removes where written.

A takedown request names a URL, or an image (its bytes' sha256, or a 64-bit pHash that also
catches its re-encoded, resized and lightly cropped copies). The lists are applied three times:
to the input rows before anything is downloaded (URLs), to each image before it is written (the
sha256 of the bytes as downloaded and as stored, and the pHash and crop pHashes within
--near-duplicate-distance of a listed one), and to everything already written by earlier runs,
through the dedupe's removal plan, so a later run with a longer list removes what it names and a
run killed half-way through is finished by the next. Rows get the status `taken_down`.

pHashes are compared to each listed one directly (a popcount per pair): takedown lists are short
(thousands, not the millions the near dedupe's bands are built for).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError
from pipeline.dedupe import REMOVED_SCHEMA, Rows, map_tables, materialize, written_samples
from pipeline.near_dedupe import hex_to_int64
from pipeline.schema import Sample
from pipeline.storage import Output

SHA256 = re.compile(r"[0-9a-f]{64}")
PHASH = re.compile(r"[0-9a-f]{16}")
PHASH_BLOCK = 4096  # images compared with every listed pHash at once: 4096 x 10k pairs is 330 MB of xor


def url_ids(urls: list[str | None]) -> np.ndarray:
    """64-bit ids of URLs (blake2b): a takedown list of millions of URLs costs 8 bytes a URL."""
    return np.array([int.from_bytes(hashlib.blake2b((url or "").encode(), digest_size=8).digest(), "little",
                                    signed=True) for url in urls], dtype=np.int64)


@dataclass(frozen=True)
class Takedowns:
    urls: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # sorted url_ids
    sha256: frozenset[str] = frozenset()
    phashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    distance: int = 0

    def __bool__(self) -> bool:
        return bool(len(self.urls) or self.sha256 or len(self.phashes))

    def url_listed(self, urls: list[str | None]) -> np.ndarray:
        """Which of these URLs a list names (a boolean per URL)."""
        return np.isin(url_ids(urls), self.urls) if len(self.urls) else np.zeros(len(urls), bool)

    def phash_distances(self, hashes: np.ndarray) -> np.ndarray:
        """The smallest Hamming distance from each int64 pHash to a listed one (65: none listed)."""
        if not len(self.phashes):
            return np.full(len(hashes), 65)
        out = np.empty(len(hashes), np.int64)
        for start in range(0, len(hashes), PHASH_BLOCK):
            block = hashes[start:start + PHASH_BLOCK]
            bits = np.bitwise_count((block[:, None] ^ self.phashes[None, :]).view(np.uint64))
            out[start:start + PHASH_BLOCK] = bits.min(axis=1)
        return out

    def image_reason(self, sha256s: list[str], phash: str, crops: list[str]) -> str | None:
        """Why an image is taken down (its sha256s: as downloaded and as stored), or None."""
        if listed := next((h for h in sha256s if h in self.sha256), None):
            return f"sha256 {listed} on an --exclude-hashes list"
        distances = self.phash_distances(hex_to_int64([phash, *crops]))
        if distances.min() <= self.distance:
            return f"pHash within {distances.min()} bits of one on an --exclude-hashes list"
        return None

    def check(self, sample: Sample, downloaded_sha256: str | None) -> None:
        """Before a decoded sample is written: fail it as taken_down if a list names it."""
        if self and sample.pending and sample.phash is not None:  # no lists (the usual case): nothing to do
            hashes = [h for h in (downloaded_sha256, sample.sha256) if h]
            if reason := self.image_reason(hashes, sample.phash, sample.phash_crops):
                sample.fail("taken_down", reason)


def _lines(path: str, what: str) -> list[tuple[int, str]]:
    try:
        with fsspec.open(path, "rt") as f:
            return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip() and not line.startswith("#")]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {what} list {path}: {err}") from None


def load_takedowns(url_files: list[str], hash_files: list[str], distance: int) -> Takedowns:
    """The lists as text files (one entry a line; '#' comments): URLs, and hashes, each a 64-hex
    sha256 or a 16-hex pHash. A line that is neither is one error naming file and line."""
    urls = [line for path in url_files for _, line in _lines(path, "--exclude-urls")]
    sha256, phashes = set(), []
    for path in hash_files:
        for n, line in _lines(path, "--exclude-hashes"):
            value = line.lower()
            if SHA256.fullmatch(value):
                sha256.add(value)
            elif PHASH.fullmatch(value):
                phashes.append(value)
            else:
                raise ConfigError(f"{path} line {n}: not a sha256 (64 hex digits) or a pHash (16): {line[:80]!r}")
    return Takedowns(np.unique(url_ids(urls)), frozenset(sha256),
                     hex_to_int64(phashes) if phashes else np.empty(0, np.int64), distance)


def takedown_removals(output: Output, takedowns: Takedowns) -> Rows | None:
    """REMOVED_SCHEMA rows of the written samples a list names (None: no lists, or nothing written)."""
    written = written_samples(output, ["key", "shard", "url", "sha256", "phash", "phash_crops"]) if takedowns else None
    if written is None:
        return None

    def named(t: pa.Table) -> pa.Table:  # whole blocks at once: a Python call per hash would cost more than the rest
        by_url = takedowns.url_listed(t["url"].to_pylist())
        by_sha = pc.is_in(t["sha256"], value_set=pa.array(sorted(takedowns.sha256), pa.string())).to_numpy(
            zero_copy_only=False) if takedowns.sha256 else np.zeros(t.num_rows, bool)
        hashes = np.concatenate([hex_to_int64(t["phash"])[:, None],
                                 hex_to_int64(pc.list_flatten(t["phash_crops"])).reshape(t.num_rows, -1)], axis=1)
        nearest = takedowns.phash_distances(hashes.ravel()).reshape(t.num_rows, -1).min(axis=1)
        reasons = np.where(by_url, "URL on an --exclude-urls list", np.where(
            by_sha, "sha256 on an --exclude-hashes list",
            np.char.add("pHash within ", np.char.add(nearest.astype(str), " bits of one on an --exclude-hashes list"))))
        hit = by_url | by_sha | (nearest <= takedowns.distance)
        n = int(hit.sum())
        return pa.table({"key": t["key"].filter(hit), "shard": t["shard"].filter(hit), "status": ["taken_down"] * n,
                         "reason": reasons[hit].tolist(), "duplicate_of": pa.nulls(n, pa.string()),
                         "distance": pa.nulls(n, pa.int32()), "overlap_set": pa.nulls(n, pa.string())},
                        schema=REMOVED_SCHEMA)

    return materialize(map_tables(written, named))
