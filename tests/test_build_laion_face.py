"""The builder end to end: real loopback server, real Ray, real detector, Parquet and tar read back."""

from __future__ import annotations

import argparse
import io
import re
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds
from PIL import Image

from bench.dedupe_images import captioned
from demo.server import ImageServer
from outputs import ROOT, check_consistent, laion_parquet, metadata_table, photo_server, status_table
from pipeline import dedupe
from pipeline.build import build
from pipeline.build_config import BuildConfig
from pipeline.face_hash import VIEWS
from pipeline.schema import METADATA_SCHEMA, STATUSES

@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with photo_server() as srv:
        yield srv


def settings(server: ImageServer, out: Path, **changes) -> BuildConfig:
    base = dict(output=str(out), allow_host=[f"127.0.0.1:{server.port}"], shard_size=8, progress=False,
                read_timeout=5.0, url_deadline=15.0, retry_backoff=0.05, retries=1)  # patient: a slow box times nothing out
    return BuildConfig(**{**base, **changes})


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.build_laion_face", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


# --- the demo build --------------------------------------------------------------------------------

def test_demo_build_is_consistent_and_covers_every_fault(built_output: Path) -> None:
    rows = pq.read_metadata(built_output / "demo_input" / "laion_demo.parquet").num_rows
    status, metadata, samples = check_consistent(built_output, rows)
    counts = Counter(status["status"].to_pylist())
    assert set(counts) <= set(STATUSES)
    for expected in ("ok", "no_face", "duplicate_url", "duplicate_image", "blocked_address", "opted_out",
                     "timeout", "too_large", "image_too_large", "decode_error", "too_many_redirects",
                     "invalid_url", "http_error", "server_error", "rate_limited"):
        assert counts[expected] > 0, f"the demo never produced '{expected}'"
    stats = json.loads((built_output / "stats.json").read_text())
    assert stats["counts"] == dict(counts) and stats["written"] == metadata.num_rows
    # hostile rows end with a status of their own, never a failed build
    rows = status.to_pylist()

    def statuses(fragment: str) -> set[str]:
        found = {r["status"] for r in rows if r["url"] and fragment in r["url"] and r["status"] != "duplicate_url"}
        assert found, f"no row fetched {fragment}"
        return found

    assert statuses("/fault/slow-headers") == statuses("/fault/slow-trailer") == {"timeout"}
    assert statuses("/fault/gzip-empty") == {"too_large"}
    assert statuses("http://[::1/x.jpg") == {"invalid_url"} and statuses("to=http%3A%2F%2F%5B%3A%3A1") == {"invalid_url"}
    for face_photo in ("/img/camera_16bit.png", "/img/astronaut_bad_exif.jpg"):  # 16-bit grey, corrupt EXIF
        assert statuses(face_photo) <= {"ok", "near_duplicate", "duplicate_image"}, face_photo
    # t1.jpg (6 faces) is written, or removed as a near-duplicate of a larger copy that is
    faces_of = dict(zip(metadata["key"].to_pylist(), metadata["num_faces"].to_pylist()))
    t1 = [r for r in status.to_pylist()
          if r["url"] and r["url"].endswith("/img/t1.jpg") and r["status"] != "duplicate_url"]
    assert len(t1) == 1 and faces_of[t1[0]["key"] or t1[0]["duplicate_of"]] == 6
    for row in metadata.to_pylist():
        assert row["num_faces"] >= 1 and all(f["score"] >= 0.9 for f in row["faces"])
        with Image.open(io.BytesIO(samples[row["key"]]["jpg"])) as image:
            assert image.mode == "RGB" and image.size == (row["width"], row["height"])
        x1, y1, x2, y2 = row["faces"][0]["box"]
        assert 0 <= x1 < x2 <= row["original_width"] and 0 <= y1 < y2 <= row["original_height"]


def test_shards_read_with_webdataset(built_output: Path) -> None:
    shards = sorted(str(p) for p in (built_output / "shards").glob("*.tar"))
    dataset = wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    seen = [(key, image.size, meta["faces"]) for key, image, _, meta in dataset]
    assert len(seen) == metadata_table(built_output).num_rows
    assert all(faces for _, _, faces in seen)


def test_shards_read_with_open_clip_training_loader(built_output: Path) -> None:
    import open_clip
    from open_clip_train.data import get_dataset_size, get_wds_dataset

    shards = sorted(str(p) for p in (built_output / "shards").glob("*.tar"))
    args = argparse.Namespace(train_data="::".join(shards), train_num_samples=None, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, batch_size=4, workers=1, world_size=1,
                              distributed=False)
    _, preprocess, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    images, texts = next(iter(data.dataloader))
    assert images.shape == (4, 3, 224, 224) and texts.shape == (4, 77)
    assert get_dataset_size(args.train_data) == (metadata_table(built_output).num_rows, len(shards))  # sizes.json


# --- dedupe across input files and reruns --------------------------------------------------------------

@pytest.mark.parametrize("where", ["driver", "ray"])
def test_dedupe_is_global_across_files_and_reruns(server: ImageServer, ray_address: str, tmp_path: Path,
                                                  where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if where == "ray":  # the path of builds over LOCAL_ROWS rows: Ray Data groupbys instead of the driver
        monkeypatch.setattr(dedupe, "LOCAL_ROWS", 0)
    faces = [path for path, image in server.photos if image.has_face][:4]
    first = laion_parquet(tmp_path / "a.parquet", [server.url(faces[0]), server.url(faces[1])])
    out = tmp_path / "out"
    build(settings(server, out, input=[str(first)]))
    before = metadata_table(out)
    tar_before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    # a second file, added later: the same URL, the same bytes at a new URL, a new photo, and a
    # URL repeated inside the file
    server.add("/copy-of-first.jpg", dict(server.photos)[faces[0]].data)
    second = laion_parquet(tmp_path / "b.parquet", [server.url(faces[1]), server.url("/copy-of-first.jpg"),
                                                    server.url(faces[2]), server.url(faces[2])])
    build(settings(server, out, input=[str(first), str(second)]))
    status, metadata, _ = check_consistent(out, 6)
    by_row = {(Path(f).name, r): (s, d) for f, r, s, d in zip(status["input_file"].to_pylist(),
              status["input_row"].to_pylist(), status["status"].to_pylist(), status["duplicate_of"].to_pylist())}
    key_of = dict(zip(before["url"].to_pylist(), before["key"].to_pylist()))
    assert by_row[("b.parquet", 0)] == ("duplicate_url", key_of[server.url(faces[1])])
    assert by_row[("b.parquet", 1)] == ("duplicate_image", key_of[server.url(faces[0])])
    assert by_row[("b.parquet", 2)][0] == "ok" and by_row[("b.parquet", 3)][0] == "duplicate_url"
    assert metadata.num_rows == 3
    assert all((out / "shards" / name).read_bytes() == data for name, data in tar_before.items())


@pytest.mark.parametrize("where", ["driver", "ray"])
def test_plan_only_plans_the_url_dedupe_and_downloads_nothing(server: ImageServer, ray_address: str,
                                                               tmp_path: Path, where: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if where == "ray":  # one planning task per input file, as at LAION size
        monkeypatch.setattr(dedupe, "LOCAL_ROWS", 0)
    # units of 8 rows over row groups of 7: a unit's rows span two groups, a group two units
    # 9 photos, each at least twice and in both files, /p/0 and /p/1 three times, /p/3 at the end of b
    urls = [server.url(f"/p/{i % 9}") for i in range(20)] + ["not a url", server.url("/p/3")]
    first = laion_parquet(tmp_path / "a.parquet", urls[:13])
    second = laion_parquet(tmp_path / "b.parquet", urls[13:])
    out = tmp_path / "out"
    plan = build(settings(server, out, input=[str(first), str(second)], plan_only=True))
    rows = [(0, i, url) for i, url in enumerate(urls[:13])] + [(1, i, url) for i, url in enumerate(urls[13:])]
    kept: dict[str, str] = {}
    expected = {}
    for file_index, row, url in rows:  # the first row of a URL keeps it; "not a url" is never fetched
        if url.startswith("http"):
            key = f"{file_index:05d}{row:09d}"
            if url in kept:
                expected[key] = kept[url]
            kept.setdefault(url, key)
    assert plan["input_rows"] == 22 and plan["input_files"] == 2 and plan["units"] == 2 + 2
    assert plan["url_duplicates_planned"] == len(expected) == 21 - 9
    planned = pq.read_table(out / "plan" / "url_duplicates").to_pylist()
    assert {r["key"]: r["duplicate_of"] for r in planned} == expected
    assert json.loads((out / "inputs.json").read_text())["files"][1]["first_unit"] == 2
    assert not [p for p in out.iterdir() if p.name in ("status", "metadata", "shards", "stats.json", "report")
                and (p.is_file() or any(p.iterdir()))], "nothing downloaded, nothing written but the plan"


def test_without_shard_size_a_build_plans_units_for_every_cpu(server: ImageServer, ray_address: str,
                                                              tmp_path: Path) -> None:
    """5,000 rows on this session's 2-CPU Ray: 2 units per CPU of 1,250 rows, not one unit (one
    fetch task, one busy core); the output records the size for its reruns."""
    out = tmp_path / "out"
    parquet = laion_parquet(tmp_path / "a.parquet", [server.url(f"/p/{i}") for i in range(5_000)])
    assert ray.cluster_resources()["CPU"] == 2
    plan = build(settings(server, out, input=[str(parquet)], shard_size=None, plan_only=True))
    assert (plan["units"], plan["rows_per_unit"]) == (4, 1_250)
    assert json.loads((out / "inputs.json").read_text())["shard_size"] == 1_250


# --- resume after kill -9, and --retry-failed --------------------------------------------------------

def resume_input(server: ImageServer, tmp_path: Path) -> Path:
    """Units that each take a second or more (a stalled URL in every one), for a kill to land mid-run."""
    urls = []
    for i, (path, _) in enumerate(server.photos[:40]):
        urls.append(server.url(f"/fault/stall?id={i}") if i % 8 == 3 else server.url(path))
    urls += [server.url(server.photos[0][0]), server.url("/fault/404")]
    return laion_parquet(tmp_path / "resume.parquet", urls)


def summary_of(out: Path) -> tuple[list, dict[str, bytes]]:
    status = status_table(out).sort_by([("input_row", "ascending")])
    rows = list(zip(status["input_row"].to_pylist(), status["key"].to_pylist(), status["status"].to_pylist(),
                    status["duplicate_of"].to_pylist()))
    images = {r["key"]: r["sha256"] for r in metadata_table(out).to_pylist()}
    return rows, images


def test_resume_after_kill_minus_9_matches_an_uninterrupted_run(server: ImageServer, ray_address: str,
                                                                 tmp_path: Path) -> None:
    parquet = resume_input(server, tmp_path)
    out = tmp_path / "killed"
    args = ["--input", str(parquet), "--output", str(out), "--allow-host", f"127.0.0.1:{server.port}",
            "--shard-size", "6", "--read-timeout", "1", "--url-deadline", "2", "--retries", "0",
            "--no-progress", "--address", ray_address]
    for wait_for_units in (1, 4):  # kill once early, once later: both reruns must pick up the pieces
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.build_laion_face", *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / "status").glob("*.parquet"))) >= wait_for_units:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    reference = tmp_path / "reference"
    build(settings(server, reference, input=[str(parquet)], shard_size=6, read_timeout=1.0, url_deadline=2.0,
                   retries=0))
    check_consistent(out, 42)
    assert summary_of(out) == summary_of(reference)


def test_a_second_build_into_an_output_being_built_is_refused(server: ImageServer, ray_address: str,
                                                               tmp_path: Path) -> None:
    """Two real builds started into one output: the second stops at once with one line naming the
    first, and writes nothing; the first finishes as if alone and releases the output."""
    out = tmp_path / "out"
    args = ["--input", str(resume_input(server, tmp_path)), "--output", str(out), "--allow-host",
            f"127.0.0.1:{server.port}", "--shard-size", "6", "--read-timeout", "3", "--url-deadline", "4",
            "--retries", "0", "--no-progress", "--address", ray_address]  # 3 s a unit: time for the second to start
    first = subprocess.Popen([sys.executable, "-m", "pipeline.build_laion_face", *args], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "build.lock").exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = cli(*args)
    assert first.poll() is None, "the first build ended before the second started"
    assert second.returncode == 2
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"error: {out} is being built by another build (host ") and f"pid {first.pid}, started " in line
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert not (out / "build.lock").exists()
    check_consistent(out, 42)


def test_retry_failed_adds_what_now_succeeds(server: ImageServer, ray_address: str, tmp_path: Path) -> None:
    photos = [path for path, image in server.photos if image.has_face][:6]
    urls = [server.url(p) for p in photos[:3]]
    urls += [server.url(f"/fault/flaky?id=retry-{tmp_path.name}-{i}&fail=1&src={p}") for i, p in enumerate(photos[3:])]
    parquet = laion_parquet(tmp_path / "flaky.parquet", urls + [server.url("/fault/404")])
    out = tmp_path / "out"
    build(settings(server, out, input=[str(parquet)], retries=0, shard_size=4, near_dedupe=False))
    status, _, _ = check_consistent(out, 7)
    assert Counter(status["status"].to_pylist()) == {"ok": 3, "server_error": 3, "http_error": 1}

    build(settings(server, out, input=[str(parquet)], retries=0, shard_size=4, retry_failed=True, near_dedupe=False))
    status, metadata, _ = check_consistent(out, 7)
    assert Counter(status["status"].to_pylist()) == {"ok": 6, "http_error": 1}
    assert {"00000_1", "00001_1"} & set(metadata["shard"].to_pylist())
    assert server.requests["/fault/404"] >= 1
    shards_before = sorted(p.name for p in (out / "shards").glob("*.tar"))
    build(settings(server, out, input=[str(parquet)], retries=0, shard_size=4, retry_failed=True, near_dedupe=False))
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == shards_before  # nothing left to retry


# --- the command line: bad input gives one line, exit 2, and leaves nothing ---------------------------

def test_bad_input_gives_one_clear_line_and_leaves_nothing(tmp_path: Path) -> None:
    good = laion_parquet(tmp_path / "good.parquet", ["http://example.invalid/a.jpg"])
    no_caption = tmp_path / "no_caption.parquet"
    pq.write_table(pq.read_table(good).drop_columns(["TEXT"]), no_caption)
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("hello")
    config = tmp_path / "bad.yaml"
    config.write_text("min_face_scor: 0.5\n")
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    cases = {
        "missing.parquet": (["--input", str(tmp_path / "missing.parquet")], "input not found"),
        "column": (["--input", str(no_caption)], "missing column 'TEXT'"),
        "not parquet": (["--input", str(not_parquet)], "cannot read parquet file"),
        "config key": (["--input", str(good), "--config", str(config)], "unknown config key 'min_face_scor'"),
        "allow-host": (["--input", str(good), "--allow-host", "127.0.0.1"], "HOST:PORT"),
        "allowlist": (["--input", str(good), "--sample-ids", str(tmp_path / "ids.txt")], "allow-list"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = cli(*args, "--output", str(out))
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, lines)
        assert not out.exists(), f"{name}: output created"
    unwritable = cli("--input", str(good), "--output", str(a_file / "out"))
    assert unwritable.returncode == 2 and "not writable" in unwritable.stderr


def corrupt_pages(path: Path) -> Path:
    """Overwrites a parquet file's pages and keeps its footer: the input check passes, reading fails."""
    data = bytearray(path.read_bytes())
    pages_end = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    data[4:pages_end] = b"\x55" * (pages_end - 4)
    path.write_bytes(data)
    return path


def test_an_input_unreadable_past_its_footer_gives_one_line_naming_it(tmp_path: Path) -> None:
    bad = corrupt_pages(laion_parquet(tmp_path / "bad.parquet", [f"http://example.invalid/{i}.jpg" for i in range(20)]))
    result = cli("--input", str(bad), "--output", str(tmp_path / "out"), "--detector", "none")
    # Ray's own start-up warnings may come first, and its core worker may log a C++ line such as
    # "task_manager.cc:1545: Failed to push error to driver" as the driver shuts down (seen once in CI-like runs)
    lines = [line for line in result.stderr.strip().splitlines() if not re.match(r"\[\d{4}-.*\.cc:\d+\]?", line)]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert [line for line in lines if line.startswith("error")] == lines[-1:], result.stderr
    assert lines[-1].startswith(f"error: input {bad}: rows 0-20 cannot be read: ") and "rerun" in lines[-1]
    assert not list((tmp_path / "out").glob("shards/*")), "nothing written"


def test_a_failed_ray_task_is_reduced_to_its_cause(ray_address: str, tmp_path: Path) -> None:
    from pipeline.build_laion_face import task_failure
    from pipeline.source import read_rows

    bad = corrupt_pages(laion_parquet(tmp_path / "bad.parquet", [f"http://example.invalid/{i}.jpg" for i in range(20)]))

    def read(batch: dict) -> dict:
        read_rows(str(bad), 0, 20, ["URL"])
        return batch

    with pytest.raises(ray.exceptions.RayTaskError) as failed:
        ray.data.range(1).map_batches(read).materialize()
    assert task_failure(failed.value).startswith(f"input {bad}: rows 0-20 cannot be read: ")

    def store_failure(batch: dict) -> dict:
        raise OSError(5, "SlowDown", "bucket/part-0.parquet")

    with pytest.raises(ray.exceptions.RayTaskError) as failed:
        ray.data.range(1).map_batches(store_failure).materialize()
    assert task_failure(failed.value) == "OSError: [Errno 5] SlowDown: 'bucket/part-0.parquet'"


@pytest.mark.parametrize("old_schema, message", [
    (METADATA_SCHEMA.remove(METADATA_SCHEMA.get_field_index("phash_crops")), "has no column phash_crops"),
    (METADATA_SCHEMA.with_metadata({"phash_version": "0"}), "has pHashes of version 0"),
])
def test_an_output_of_another_version_is_refused_before_any_work(tmp_path: Path, old_schema: pa.Schema,
                                                                 message: str) -> None:
    good = laion_parquet(tmp_path / "good.parquet", ["http://example.invalid/a.jpg"])
    old = tmp_path / "old"
    (old / "metadata").mkdir(parents=True)
    pq.write_table(old_schema.empty_table(), old / "metadata" / "00000.parquet")
    result = cli("--input", str(good), "--output", str(old))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "another version" in lines[0] and message in lines[0]
    assert sorted(p.name for p in old.iterdir()) == ["metadata"]  # nothing written


def test_help_documents_every_setting() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for flag in ("--input", "--output", "--config", "--detector", "--allow-host", "--address", "--min-face-score",
                 "--min-face-size", "--retry-failed", "--sample-ids", "--max-bytes", "--shard-size"):
        assert flag in result.stdout


def test_fsspec_urls_and_no_detector(server: ImageServer, ray_address: str, tmp_path: Path) -> None:
    """Input and output as fsspec URLs (file:// here; s3:// and gs:// take the same path), no detector:
    every decodable image is written, with no faces."""
    photos = [path for path, _ in server.photos[:5]]
    laion_parquet(tmp_path / "in.parquet", [server.url(p) for p in photos] + [server.url("/fault/html")])
    out = tmp_path / "out"
    build(settings(server, f"file://{out}", input=[f"file://{tmp_path}/*.parquet"], detector="none"))
    status, metadata, _ = check_consistent(out, 6)
    assert Counter(status["status"].to_pylist()) == {"ok": 5, "decode_error": 1}
    assert metadata["num_faces"].to_pylist() == [0] * 5


def test_an_allowlist_build_fetches_only_the_listed_ids(server: ImageServer, ray_address: str, tmp_path: Path) -> None:
    """--sample-ids, as LAION-Face's released ID lists are used: the list, put in the object store
    once, reaches every fetch task; only its rows are fetched and written."""
    parquet = laion_parquet(tmp_path / "in.parquet", [server.url(path) for path, _ in server.photos[:6]])
    (tmp_path / "ids.txt").write_text("1001\n1004\n")  # laion_parquet numbers its rows from SAMPLE_ID 1000
    out = tmp_path / "out"
    build(settings(server, out, input=[str(parquet)], sample_ids=str(tmp_path / "ids.txt"), detector="none"))
    status, metadata, _ = check_consistent(out, 6)
    assert dict(zip(status["input_row"].to_pylist(), status["status"].to_pylist())) == {
        0: "not_in_allowlist", 1: "ok", 2: "not_in_allowlist", 3: "not_in_allowlist", 4: "ok", 5: "not_in_allowlist"}
    assert sorted(metadata["sample_id"].to_pylist()) == [1001, 1004]


def test_a_headerless_two_column_tsv_builds_with_a_preset_and_ids_from_its_rows(server: ImageServer, ray_address: str,
                                                                                tmp_path: Path) -> None:
    """CC12M's TSV as a new user has it (url and caption, no header line): built with --preset cc12m
    from its conversion in OUT/inputs/, every other field null, each sample's id that of its key, and
    stats say what was read."""
    urls = [server.url(path) for path, _ in server.photos[:3]]
    (tmp_path / "cc12m.tsv").write_text("".join(f"{url}\t{caption}\n" for url, caption in zip(urls, ["one", "two", "three"])))
    out = tmp_path / "out"
    stats = build(settings(server, out, input=[str(tmp_path / "cc12m.tsv")], preset="cc12m", detector="none"))
    [staged] = (out / "inputs").iterdir()
    assert pq.read_table(staged)["url"].to_pylist() == urls
    _, metadata, _ = check_consistent(out, 3)
    assert sorted(metadata["sample_id"].to_pylist()) == sorted(int(key) for key in metadata["key"].to_pylist())
    assert set(metadata["similarity"].to_pylist()) == {None} and sorted(metadata["caption"].to_pylist()) == [
        "one", "three", "two"]
    assert stats["last_run"]["columns"] == {"url": "url", "caption": "caption"}


# --- near-duplicates and benchmark decontamination -----------------------------------------------------

def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def letterboxed(image: Image.Image) -> Image.Image:
    """Shown in a wider frame with black bars, as a page lays out a portrait."""
    canvas = Image.new("RGB", (image.width * 4 // 3, image.height), "black")
    canvas.paste(image, (image.width // 6, 0))
    return canvas


def test_near_duplicates_and_benchmark_overlaps_are_removed_the_same_way_with_1_or_2_workers(
        server: ImageServer, ray_address: str, tmp_path: Path) -> None:
    from PIL import ImageEnhance, ImageOps

    first_of_source = {}
    for _, image in server.photos:  # three different photos, one per source
        if image.has_face and image.source != "t1":
            first_of_source.setdefault(image.source, image)
    original, other, benchmark = (Image.open(io.BytesIO(image.data)).convert("RGB")
                                  for image in list(first_of_source.values())[:3])
    width, height = original.size
    variants = {  # web copies of one photo: re-encoded, resized, brightened, cropped
        "orig.jpg": jpeg_bytes(original, 95), "q40.jpg": jpeg_bytes(original, 40),
        "small.jpg": jpeg_bytes(original.resize((original.width * 3 // 4, original.height * 3 // 4))),
        "bright.jpg": jpeg_bytes(ImageEnhance.Brightness(original).enhance(1.08)),
        "other.jpg": jpeg_bytes(other), "benchmark-copy.jpg": jpeg_bytes(benchmark, 70),
        "cropped.jpg": jpeg_bytes(original.crop((width * 3 // 100, height * 2 // 100, width, height - height // 50))),
        # framed by letterbox bars: its whole-image hashes catch it, the bars cut off before hashing
        "benchmark-letterbox.jpg": jpeg_bytes(letterboxed(benchmark)),
        # cropped by a tenth: its whole-image hashes miss it, its face hash catches it
        "benchmark-crop10.jpg": jpeg_bytes(benchmark.crop((benchmark.width // 10, benchmark.height // 10,
                                                           benchmark.width, benchmark.height))),
        # a caption bar over the bottom, a turn: the inner part's hashes catch them
        "captioned.jpg": jpeg_bytes(captioned(original, 0.12)),
        "turned.jpg": jpeg_bytes(original.rotate(-4, resample=Image.Resampling.BICUBIC, fillcolor="white")),
    }
    for name, data in variants.items():
        server.add(f"/near/{tmp_path.name}/{name}", data)
    urls = [server.url(f"/near/{tmp_path.name}/{name}") for name in variants]
    parquet = laion_parquet(tmp_path / "near.parquet", urls)
    excluded = tmp_path / "wflw_test"
    excluded.mkdir()
    ImageOps.mirror(benchmark).save(excluded / "0001.png")  # the test split holds it mirrored
    results = []
    for run, (shard_size, actors) in enumerate(((2, 1), (3, 2))):
        out = tmp_path / f"out{run}"
        build(settings(server, out, input=[str(parquet)], shard_size=shard_size, detect_actors=actors,
                       exclude_images=[str(excluded)]))
        status, _, _ = check_consistent(out, len(urls))
        rows = sorted(zip(status["input_row"].to_pylist(), status["status"].to_pylist(),
                          status["duplicate_of"].to_pylist(), status["overlap_set"].to_pylist()))
        results.append(rows)
        assert (out / "exclusions" / "wflw_test.parquet").exists()  # hashes cached beside the output
    assert results[0] == results[1]
    by_row = {row: (status, duplicate_of, overlap) for row, status, duplicate_of, overlap in results[0]}
    kept_key = "00000000000000"  # orig.jpg: the largest copy
    assert by_row[0][0] == "ok" and by_row[4][0] == "ok"
    assert [by_row[i][:2] for i in (1, 2, 3, 6, 9, 10)] == [("near_duplicate", kept_key)] * 6
    for row in (5, 7):
        assert by_row[row] == ("benchmark_overlap", str(excluded / "0001.png") + " (mirrored)", "wflw_test")
    # the face hash: the excluded image's file, its mirror's face having matched
    assert by_row[8] == ("benchmark_overlap", str(excluded / "0001.png"), "wflw_test"), by_row[8]
    reasons = dict(zip(status["input_row"].to_pylist(), status["reason"].to_pylist()))
    assert reasons[9].startswith("inner part's pHash within ") and reasons[1].startswith("pHash within "), reasons
    views = "|".join(VIEWS)  # which face and view of each side matched
    assert re.fullmatch(rf"face 0 \(({views})\) within \d bits of mirrored face 0, ({views}) of wflw_test image "
                        rf"{re.escape(str(excluded / '0001.png'))} \(aligned-face pHashes; check hashes \d+ bits apart\)",
                        reasons[8]), reasons[8]
