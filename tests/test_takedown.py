"""Takedown lists (pipeline.takedown): parsing, matching, and real builds in which listed rows are
never fetched or written, and a later run with a longer list removes what an earlier one wrote."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.server import ImageServer
from outputs import check_consistent, laion_parquet, metadata_table, photo_server, tar_samples
from pipeline.build import build
from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError
from pipeline.decode import phashes
from pipeline.schema import make_key
from pipeline.takedown import Takedowns, load_takedowns, url_ids


def lines(path: Path, *entries: str) -> str:
    path.write_text("\n".join(entries) + "\n")
    return str(path)


def flip(phash: str, bits: int) -> str:
    return f"{int(phash, 16) ^ ((1 << bits) - 1):016x}"


def test_lists_are_read_with_comments_and_either_case(tmp_path: Path) -> None:
    urls = lines(tmp_path / "urls.txt", "# takedowns of 2026-12", "https://a.example/1.jpg", "", "https://b.example/2.jpg")
    hashes = lines(tmp_path / "hashes.txt", "A" * 64, "00ff00ff00ff00ff")
    takedowns = load_takedowns([urls], [hashes], 6)
    assert takedowns.url_listed(["https://b.example/2.jpg", "https://a.example/3.jpg", None]).tolist() == [
        True, False, False]
    assert takedowns.sha256 == {"a" * 64} and len(takedowns.phashes) == 1
    assert not load_takedowns([], [], 6)


def test_a_line_that_is_no_hash_is_one_error_naming_file_and_line(tmp_path: Path) -> None:
    hashes = lines(tmp_path / "hashes.txt", "a" * 64, "not-a-hash")
    with pytest.raises(ConfigError, match=r"hashes.txt line 2: not a sha256 \(64 hex digits\) or a pHash"):
        load_takedowns([], [hashes], 6)
    with pytest.raises(ConfigError, match="cannot read --exclude-urls list"):
        load_takedowns([str(tmp_path / "missing.txt")], [], 6)


def test_images_match_by_sha256_and_by_phash_within_the_distance(tmp_path: Path) -> None:
    listed = "0123456789abcdef"
    takedowns = load_takedowns([], [lines(tmp_path / "h.txt", "b" * 64, listed)], 6)
    other = "f" * 16
    assert takedowns.image_reason(["c" * 64, "b" * 64], other, [other]) == f"sha256 {'b' * 64} on an --exclude-hashes list"
    assert takedowns.image_reason(["c" * 64], flip(listed, 6), [other]) == (
        "pHash within 6 bits of one on an --exclude-hashes list")
    assert takedowns.image_reason(["c" * 64], other, [other, flip(listed, 3)]) is not None  # a crop's hash counts
    assert takedowns.image_reason(["c" * 64], flip(listed, 7), [other]) is None


def test_phash_distances_equal_brute_force_across_blocks() -> None:
    rng = np.random.default_rng(0)
    listed = rng.integers(-2**63, 2**63 - 1, size=37, dtype=np.int64)
    takedowns = Takedowns(phashes=listed, distance=6)
    hashes = rng.integers(-2**63, 2**63 - 1, size=5000, dtype=np.int64)  # more than one PHASH_BLOCK
    expected = [min(bin((int(h) ^ int(p)) & (2**64 - 1)).count("1") for p in listed) for h in hashes]
    assert takedowns.phash_distances(hashes).tolist() == expected
    assert len(set(url_ids(["a", "b", "a"]).tolist())) == 2


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with photo_server() as srv:
        yield srv


def test_listed_rows_are_never_written_and_a_longer_list_removes_what_was(server: ImageServer, ray_address: str,
                                                                         tmp_path: Path) -> None:
    photos = [image for _, image in server.photos[:6]]
    copy = io.BytesIO()
    Image.open(io.BytesIO(photos[1].data)).convert("RGB").save(copy, format="JPEG", quality=70)
    server.add("/copy/1", copy.getvalue(), "image/jpeg")  # other bytes, the same picture
    urls = [server.url(path) for path, _ in server.photos[:6]] + [server.url("/copy/1")]
    parquet = laion_parquet(tmp_path / "in.parquet", urls)
    out = tmp_path / "out"

    def run(url_list: list[str], hash_list: list[str]) -> dict:
        return build(BuildConfig(input=[str(parquet)], output=str(out), allow_host=[f"127.0.0.1:{server.port}"],
                                 detector="none", progress=False, shard_size=4,
                                 exclude_urls=[lines(tmp_path / "urls.txt", *url_list)],
                                 exclude_hashes=[lines(tmp_path / "hashes.txt", *hash_list)]))

    photo1_phash = phashes(Image.open(io.BytesIO(photos[1].data)))[0]
    first = run([urls[0]], [hashlib.sha256(photos[2].data).hexdigest(), photo1_phash])
    assert first["last_run"]["taken_down_removed"] == 0, "listed rows were never fetched or written"
    status, _, _ = check_consistent(out, 7)
    by_row = dict(zip(status["input_row"].to_pylist(), zip(status["status"].to_pylist(), status["reason"].to_pylist())))
    assert by_row[0] == ("taken_down", "URL on an --exclude-urls list")
    assert by_row[2][0] == by_row[1][0] == by_row[6][0] == "taken_down"
    assert by_row[2][1].startswith("sha256 ") and by_row[6][1].startswith("pHash within ")
    assert {by_row[row][0] for row in (3, 4, 5)} == {"ok"}

    written = {r["key"]: r for r in metadata_table(out).to_pylist()}
    stats = run([urls[0], urls[3]], [hashlib.sha256(photos[2].data).hexdigest(), photo1_phash,
                                     written[make_key(0, 4)]["sha256"]])  # the bytes as stored, as a takedown of a shard names them
    assert stats["last_run"]["taken_down_removed"] == 2
    status, metadata, _ = check_consistent(out, 7)
    assert dict(zip(status["input_row"].to_pylist(), status["status"].to_pylist())) == {
        0: "taken_down", 1: "taken_down", 2: "taken_down", 3: "taken_down", 4: "taken_down", 5: "ok", 6: "taken_down"}
    assert metadata["key"].to_pylist() == [make_key(0, 5)] == list(tar_samples(out))
