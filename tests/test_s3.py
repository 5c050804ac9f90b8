"""Object storage for real: builds, queries, the report, resume, subset, pre-training and export
against a local S3-compatible server (moto's server mode: a real HTTP server on loopback that speaks
the S3 API), reached the way a cluster reaches S3, through the usual AWS environment variables.

Everything that touches S3 runs in child processes (the builder, the queries CLI, the trainer) or in
this process through s3fs; builds join a Ray instance this module starts with the same environment,
so its workers see the endpoint and the credentials too (a Ray instance started earlier in the
session would not). One input, built once to S3 and once locally, serves most tests.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest
import requests
import s3fs
import torch
from moto.server import ThreadedMotoServer

from demo.server import ImageServer
from outputs import (ROOT, check_consistent, laion_parquet, metadata_table, photo_server, race_for, status_table,
                     tar_members)
from pipeline.build_config import BuildConfig
from pipeline.source import check_inputs, input_rows
from pipeline.storage import Output, read_parquet
from pipeline.text_inputs import staged_parquet
from queries import list_queries, run_query
from queries.__main__ import format_table as cli_table

BUCKET = "laion-face-test"
# Fake, but recognisable anywhere they might leak to.
KEY_ID = "AKIAS3TESTLEAKCHECK7Q"
SECRET = "s3test/FakeSecret+LeakCanary0123456789zz"
ENV_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_CA_BUNDLE",
               "FSSPEC_S3", "FSSPEC_S3_ENDPOINT_URL", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
# Rows per unit; every unit holds a stalled URL, so each takes a second or more (for the kill to land mid-run).
SHARD_SIZE = 8
BUILD_FLAGS = ("--shard-size", str(SHARD_SIZE), "--detector", "none", "--read-timeout", "1", "--url-deadline", "2",
               "--retries", "0", "--retry-backoff", "0.05")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3:
    fs: s3fs.S3FileSystem  # no instance or listing cache: sees what child processes wrote
    endpoint: str

    def find(self, prefix: str) -> list[str]:
        """Every object under s3://BUCKET/prefix, relative to it."""
        root = f"{BUCKET}/{prefix}"
        return sorted(p[len(root) + 1:] for p in self.fs.find(root))

    def download(self, prefix: str, to: Path) -> Path:
        for name in self.find(prefix):
            target = to / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.fs.cat_file(f"{BUCKET}/{prefix}/{name}"))
        return to


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """A moto S3 server on a free loopback port; endpoint and credentials in the environment (this
    module only), as a cluster's nodes would have them."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV_CLEARED:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)  # botocore's service-specific endpoint; s3fs honours it
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never wait for an instance-metadata service
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        fs.mkdir(BUCKET)
        try:
            yield S3(fs, endpoint)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()  # no S3 file system with this endpoint outlives the module
    server.stop()


RAY_HEAD = """
import logging, sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes stdin; then the cluster goes with this driver
"""


@pytest.fixture(scope="module")
def ray_cluster(s3: S3) -> Iterator[str]:
    """A Ray instance started with the S3 environment, which its workers inherit; builds join it."""
    proc = subprocess.Popen([sys.executable, "-c", RAY_HEAD], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    address = proc.stdout.readline().strip()
    assert address, "the Ray head did not start"
    yield address
    proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with photo_server() as srv:
        srv.photos = [path for path, _ in srv.photos]
        yield srv


def cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, text=True, capture_output=True,
                          timeout=timeout)


def build_args(server: ImageServer, ray_cluster: str, input_: str, output: str, *more: str) -> list[str]:
    return ["--input", input_, "--output", output, "--allow-host", f"127.0.0.1:{server.port}", *BUILD_FLAGS,
            "--address", ray_cluster, *more]


@dataclass
class Built:
    rows: int
    input_url: str  # s3://BUCKET/in/*.parquet
    local_input: Path
    url: str  # s3://BUCKET/out
    local: Path  # the same input built into a local folder
    copy: Path  # the S3 output, downloaded
    result: subprocess.CompletedProcess  # of the S3 build


@pytest.fixture(scope="module")
def built(s3: S3, ray_cluster: str, server: ImageServer, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """One input (photos, near-copies among them, a stalled URL per unit, a repeated URL, a 404) in
    S3, built into S3 and, the same input from a local file, into a local folder."""
    tmp = tmp_path_factory.mktemp("s3")
    urls = []
    for i, path in enumerate(server.photos[:28]):
        urls.append(server.url(f"/fault/stall?id={i}") if i % SHARD_SIZE == 3 else server.url(path))
    urls += [server.url(server.photos[0]), server.url("/fault/404")]
    local_input = laion_parquet(tmp / "part-00000.parquet", urls)
    s3.fs.put_file(str(local_input), f"{BUCKET}/in/part-00000.parquet")
    url = f"s3://{BUCKET}/out"
    result = cli("pipeline.build_laion_face", *build_args(server, ray_cluster, f"s3://{BUCKET}/in/*.parquet", url))
    assert result.returncode == 0, result.stderr
    local = tmp / "local"
    done = cli("pipeline.build_laion_face", *build_args(server, ray_cluster, str(local_input), str(local),
                                                       "--no-progress"))
    assert done.returncode == 0, done.stderr
    copy = s3.download("out", tmp / "copy")
    return Built(len(urls), f"s3://{BUCKET}/in/*.parquet", local_input, url, local, copy, result)


def rows_of(table: pa.Table, drop: tuple[str, ...] = ()) -> list[dict]:
    rows = [{k: v for k, v in row.items() if k not in drop} for row in table.to_pylist()]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


# --- 1. input and output on S3, the same as a local build -------------------------------------------


def test_build_from_s3_into_s3_is_consistent_and_equals_a_local_build(s3: S3, built: Built) -> None:
    objects = s3.find("out")
    assert not [n for n in objects if ".tmp-" in n], "no temporary object left"
    assert objects == sorted(p.relative_to(built.local).as_posix() for p in built.local.rglob("*") if p.is_file())
    for required in ("inputs.json", "stats.json", "sizes.json", "shards/sizes.json", "report/index.html"):
        assert required in objects
    # read straight from S3: status and metadata tables, and shards that are tar files
    status_names = [n for n in objects if n.startswith("status/") and n.endswith(".parquet")]
    assert len(status_names) == -(-built.rows // SHARD_SIZE)
    status = pa.concat_tables(read_parquet(s3.fs.open(f"{BUCKET}/out/{n}", "rb")) for n in status_names)
    assert status.num_rows == built.rows
    assert set(status["input_file"].to_pylist()) == {f"s3://{BUCKET}/in/part-00000.parquet"}
    metadata = pa.concat_tables(read_parquet(s3.fs.open(f"{BUCKET}/out/{n}", "rb"))
                                for n in objects if n.startswith("metadata/") and n.endswith(".parquet"))
    shards = [n for n in objects if n.startswith("shards/") and n.endswith(".tar")]
    in_tars = set()
    for name in shards:
        with s3.fs.open(f"{BUCKET}/out/{name}", "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            in_tars |= {member.name.split(".", 1)[0] for member in tar}
    assert in_tars == set(metadata["key"].to_pylist()) and metadata.num_rows >= 10
    # the downloaded copy passes every cross-check of a local build ...
    status, metadata, samples = check_consistent(built.copy, built.rows)
    counts = Counter(status["status"].to_pylist())
    assert {"ok", "timeout", "duplicate_url", "http_error", "near_duplicate"} <= set(counts), counts
    # ... and holds what the local build of the same input holds: rows, shard bytes, totals
    local_status, local_metadata, local_samples = check_consistent(built.local, built.rows)
    assert rows_of(status, drop=("input_file",)) == rows_of(local_status, drop=("input_file",))
    assert rows_of(metadata) == rows_of(local_metadata)
    assert samples == local_samples
    for tar in sorted((built.local / "shards").glob("*.tar")):
        assert tar_members(built.copy / "shards" / tar.name) == tar_members(tar), tar.name
    for name in ("sizes.json", "shards/sizes.json"):
        assert json.loads((built.copy / name).read_text()) == json.loads((built.local / name).read_text())
    stats, local_stats = (json.loads((out / "stats.json").read_text()) for out in (built.copy, built.local))
    assert {k: v for k, v in stats.items() if k != "last_run"} == {k: v for k, v in local_stats.items() if k != "last_run"}
    inputs = json.loads((built.copy / "inputs.json").read_text())
    assert [f["path"] for f in inputs["files"]] == [f"s3://{BUCKET}/in/part-00000.parquet"]


# --- 2. every query over S3 ----------------------------------------------------------------------------


def test_every_query_over_s3_equals_the_same_query_over_a_local_copy(built: Built) -> None:
    names = list(list_queries())
    assert len(names) >= 11
    for name in names:
        over_s3 = run_query(name, built.url)
        assert over_s3 == run_query(name, built.copy), name
        assert over_s3.columns, name
    assert run_query("overview", built.url).rows, "the overview of a real build has rows"
    # the command line too, in a process of its own
    result = cli("queries", "rejects_by_reason", "--data", built.url, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == cli_table(run_query("rejects_by_reason", built.copy)).strip()


# --- 3. the report ---------------------------------------------------------------------------------------


def test_the_report_is_written_to_s3(s3: S3, built: Built) -> None:
    report = [n for n in s3.find("out") if n.startswith("report/")]
    local = sorted(p.relative_to(built.local).as_posix() for p in (built.local / "report").rglob("*") if p.is_file())
    assert report == local and "report/index.html" in report
    html = s3.fs.cat_file(f"{BUCKET}/out/report/index.html").decode()
    linked = set(re.findall(r'(?:src|href)="([^"#:]+)"', html))
    assert linked, "the report shows images"
    for link in linked:
        assert f"report/{link}" in report, f"the report links {link}, which is not in S3"
    stats = json.loads(s3.fs.cat_file(f"{BUCKET}/out/stats.json"))
    assert str(stats["written"]) in html
    # the summary the build printed points at the report in S3
    assert f"s3://{BUCKET}/out/report/index.html" in built.result.stderr


# --- 4. resume after kill -9, and --retry-failed, into S3 ------------------------------------------------


def summary_of(out: Path) -> tuple[list, dict[str, str]]:
    status = status_table(out).sort_by([("input_row", "ascending")])
    rows = list(zip(status["input_row"].to_pylist(), status["key"].to_pylist(), status["status"].to_pylist(),
                    status["duplicate_of"].to_pylist()))
    return rows, {r["key"]: r["sha256"] for r in metadata_table(out).to_pylist()}


def test_resume_after_kill_minus_9_into_s3(s3: S3, built: Built, ray_cluster: str, server: ImageServer,
                                           tmp_path: Path) -> None:
    args = build_args(server, ray_cluster, built.input_url, f"s3://{BUCKET}/killed", "--no-progress")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.build_laion_face", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if any(n.startswith("status/") and n.endswith(".parquet") and ".tmp-" not in n for n in s3.find("killed")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "stats.json" not in s3.find("killed"), "killed mid-run"
    done = cli("pipeline.build_laion_face", *args)
    assert done.returncode == 0, done.stderr
    objects = s3.find("killed")
    assert not [n for n in objects if ".tmp-" in n], "no temporary object left"
    assert objects == s3.find("out"), "the files of an uninterrupted build"
    copy = s3.download("killed", tmp_path / "killed")
    check_consistent(copy, built.rows)
    assert summary_of(copy) == summary_of(built.copy)
    for tar in sorted((built.copy / "shards").glob("*.tar")):
        assert tar_members(copy / "shards" / tar.name) == tar_members(tar), tar.name


def test_retry_failed_into_s3(s3: S3, ray_cluster: str, server: ImageServer, tmp_path: Path) -> None:
    photos = server.photos[:3]
    urls = [server.url(p) for p in photos]
    urls += [server.url(f"/fault/flaky?id=s3-retry-{i}&fail=1&src={p}") for i, p in enumerate(server.photos[3:5])]
    s3.fs.put_file(str(laion_parquet(tmp_path / "flaky.parquet", urls + [server.url("/fault/404")])),
                   f"{BUCKET}/retry-in/flaky.parquet")
    args = build_args(server, ray_cluster, f"s3://{BUCKET}/retry-in/flaky.parquet", f"s3://{BUCKET}/retry",
                      "--shard-size", "3", "--no-near-dedupe", "--no-progress")
    first = cli("pipeline.build_laion_face", *args)
    assert first.returncode == 0, first.stderr
    status, _, _ = check_consistent(s3.download("retry", tmp_path / "first"), 6)
    assert Counter(status["status"].to_pylist()) == {"ok": 3, "server_error": 2, "http_error": 1}
    again = cli("pipeline.build_laion_face", *args, "--retry-failed")
    assert again.returncode == 0, again.stderr
    status, metadata, _ = check_consistent(s3.download("retry", tmp_path / "again"), 6)
    assert Counter(status["status"].to_pylist()) == {"ok": 5, "http_error": 1}
    assert "00001_1" in set(metadata["shard"].to_pylist())  # the retried rows went into a shard of their own
    assert "shards/00001_1.tar" in s3.find("retry")


# --- 5. subset, pre-training and export on S3 -------------------------------------------------------------


def test_subset_reads_s3_and_writes_s3(s3: S3, built: Built, tmp_path: Path) -> None:
    keys = sorted(metadata_table(built.copy)["key"].to_pylist())[::2]
    (tmp_path / "keys.txt").write_text("".join(f"{k}\n" for k in keys))
    result = cli("pipeline.subset", "--data", built.url, "--keys", str(tmp_path / "keys.txt"),
                 "--output", f"s3://{BUCKET}/subset", "--shard-size", "3", timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{len(keys)} samples in" in result.stdout
    subset = s3.download("subset", tmp_path / "subset")
    assert sorted((subset / "keys.txt").read_text().split()) == keys
    metadata = metadata_table(subset)
    assert sorted(metadata["key"].to_pylist()) == keys
    originals = {}
    for tar in (built.copy / "shards").glob("*.tar"):
        originals.update(tar_members(tar))
    copied = {}
    for tar in sorted((subset / "shards").glob("*.tar")):
        copied.update(tar_members(tar))
    assert copied == {name: data for name, data in originals.items() if name.split(".", 1)[0] in set(keys)}
    assert not [n for n in s3.find("subset") if ".tmp-" in n]


def test_no_program_creates_a_bucket_a_typo_names(s3: S3, built: Built, tmp_path: Path) -> None:
    """s3fs's makedirs creates a missing bucket; every program makes its folders through
    Output.makedirs, which refuses instead (the subset here; checkpoints, export, fine-tuning and the
    builder's own folders call the same function)."""
    (tmp_path / "keys.txt").write_text(sorted(metadata_table(built.copy)["key"].to_pylist())[0] + "\n")
    result = cli("pipeline.subset", "--data", built.url, "--keys", str(tmp_path / "keys.txt"),
                 "--output", "s3://no-such-bucket/subset", timeout=120)
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert "bucket no-such-bucket does not exist (create it first" in line
    with pytest.raises(FileNotFoundError, match="bucket no-such-bucket-either does not exist"):
        Output("s3://no-such-bucket-either/run").makedirs("no-such-bucket-either/run/checkpoints")
    assert not s3.fs.exists("no-such-bucket") and not s3.fs.exists("no-such-bucket-either")


def test_pretrain_reads_s3_and_checkpoints_to_s3_then_export_reads_and_writes_s3(s3: S3, built: Built, ray_cluster: str,
                                                                                 tmp_path: Path) -> None:
    """Two Ray Train workers (DDP over gloo), as on a cluster: they read the shards from S3, and rank 0
    writes the checkpoints there from a Ray worker process."""
    output = f"s3://{BUCKET}/pretrain"
    result = cli("train.pretrain", "--config", str(ROOT / "configs" / "pretrain_tiny.yaml"), "--data", built.url,
                 "--output", output, "--log-dir", str(tmp_path / "logs"), "--steps", "2", "--checkpoint-every", "1",
                 "--log-every", "1", "--batch-size", "4", "--warmup-steps", "1", "--no-progress",
                 "--workers", "2", "--address", ray_cluster, timeout=300)
    assert result.returncode == 0, result.stderr
    checkpoints = [n for n in s3.find("pretrain") if n.startswith("checkpoints/")]
    assert {"checkpoints/latest.json", "checkpoints/step_00000002.pt", "checkpoints/step_00000002.state.pt"} \
        <= set(checkpoints), checkpoints
    assert not [n for n in checkpoints if ".tmp-" in n]
    assert json.loads(s3.fs.cat_file(f"{BUCKET}/pretrain/checkpoints/latest.json"))["step"] == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 2
    trained = torch.load(io.BytesIO(s3.fs.cat_file(f"{BUCKET}/pretrain/checkpoints/step_00000002.pt")),
                         map_location="cpu", weights_only=True)
    assert trained["step"] == 2

    exported = cli("train.export", "--source", output, "--output", f"s3://{BUCKET}/export/farl.pt", timeout=120)
    assert exported.returncode == 0, exported.stderr
    assert f"from {output}/checkpoints/step_00000002.pt" in exported.stdout
    weights = torch.load(io.BytesIO(s3.fs.cat_file(f"{BUCKET}/export/farl.pt")), map_location="cpu", weights_only=True)
    assert weights["exported_from"].endswith("step_00000002.pt")
    assert set(weights["state_dict"]) < set(trained["state_dict"])  # without the MIM branch
    for key, value in weights["state_dict"].items():
        assert torch.equal(value, trained["state_dict"][key]), key
    assert s3.find("export") == ["farl.pt"]


# --- 6. credentials stay out of everything the build writes or says --------------------------------------


def test_credentials_appear_nowhere(s3: S3, built: Built) -> None:
    said = built.result.stdout + built.result.stderr
    assert said.strip(), "the build said something (its summary)"
    for secret in (KEY_ID, SECRET):
        assert secret not in said
        for path in sorted(p for p in built.copy.rglob("*") if p.is_file()):  # stats, inputs, report, tables, shards
            assert secret.encode() not in path.read_bytes(), path.relative_to(built.copy)


# --- 7. a bucket that refuses writes ---------------------------------------------------------------------


def test_a_bucket_that_refuses_writes_gives_one_error_line(s3: S3, built: Built, tmp_path: Path) -> None:
    """A user whose policy denies PutObject on the bucket, with moto's IAM checks on for this test."""
    import boto3

    s3.fs.mkdir("refusing-bucket")
    iam = boto3.client("iam", endpoint_url=s3.endpoint, region_name="us-east-1")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::refusing-bucket/*"}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    previous = requests.post(f"{s3.endpoint}/moto-api/reset-auth", data=b"0", timeout=10).json()
    try:
        result = subprocess.run([sys.executable, "-m", "pipeline.build_laion_face", "--input", str(built.local_input),
                                 "--output", "s3://refusing-bucket/out", "--detector", "none"],
                                cwd=ROOT, text=True, capture_output=True, timeout=120, env=env)
    finally:
        requests.post(f"{s3.endpoint}/moto-api/reset-auth",
                      data=str(previous["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]).encode(), timeout=10)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: output s3://refusing-bucket/out is not writable"), lines
    assert "Access Denied" in lines[0] or "AccessDenied" in lines[0], lines
    assert key["SecretAccessKey"] not in result.stderr and SECRET not in result.stderr
    assert s3.fs.find("refusing-bucket") == [], "nothing written"


def test_a_bucket_that_does_not_exist_is_refused_not_created(s3: S3, tmp_path: Path) -> None:
    """s3fs's makedirs creates a missing bucket: a typo in --output would make one and build into it."""
    parquet = laion_parquet(tmp_path / "in.parquet", ["http://127.0.0.1:9/a.jpg"])
    result = cli("pipeline.build_laion_face", "--input", str(parquet), "--output", "s3://no-such-bucket-typo/out",
                 "--detector", "none", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines == ["error: output s3://no-such-bucket-typo/out is not writable: bucket no-such-bucket-typo does "
                     "not exist (create it first: this project never creates buckets)"], lines
    assert not s3.fs.exists("no-such-bucket-typo")


# --- a store that throttles and drops connections ------------------------------------------------------
# A reverse proxy on loopback in front of the moto server that answers some object writes (PUT) with
# S3's 503 SlowDown or cuts the connection half-way through the upload, or refuses the reads (GET) of
# some objects with 503 SlowDown: what a busy bucket does.

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class Faults:
    slow_down: int = 0  # the next this many PUTs get 503 SlowDown
    drop: int = 0  # the next this many PUTs lose their connection half-way
    fail_after: int | None = None  # every PUT after this many get 503 SlowDown
    refuse_reads: str = ""  # every GET of an object whose path holds this gets 503 SlowDown ...
    refuse_reads_after: int = 0  # ... once this many such GETs went through
    puts: int = 0
    reads: int = 0
    injected: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self) -> str:
        with self.lock:
            self.puts += 1
            for name in ("slow_down", "drop"):
                if getattr(self, name) > 0:
                    setattr(self, name, getattr(self, name) - 1)
                    self.injected[name] += 1
                    return name
            if self.fail_after is not None and self.puts > self.fail_after:
                self.injected["slow_down"] += 1
                return "slow_down"
            return "pass"

    def decide_read(self, path: str) -> str:
        if not self.refuse_reads or self.refuse_reads not in path:
            return "pass"
        with self.lock:
            self.reads += 1
            if self.reads <= self.refuse_reads_after:
                return "pass"
            self.injected["read_refused"] += 1
            return "slow_down"


def faulty_proxy(upstream: str, faults: Faults) -> ThreadingHTTPServer:
    host, port = upstream.rsplit("/", 1)[1].split(":")

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def relay(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = (faults.decide() if self.command == "PUT" else faults.decide_read(self.path) if self.command == "GET"
                     else "pass")
            if fault == "drop":
                self.connection.shutdown(socket.SHUT_RDWR)  # mid-upload, as far as the client can tell
                self.close_connection = True
                return
            if fault == "slow_down":
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            connection = HTTPConnection(host, int(port), timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(name, value)
            # a HEAD's Content-Length is the object's size, with no body
            self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                             else str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            connection.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def build_through(proxy: ThreadingHTTPServer, server: ImageServer, built: Built, output: str,
                  **env_changes: str) -> subprocess.CompletedProcess:
    """A build with its own Ray, whose workers reach S3 only through the proxy."""
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy.server_address[1]}", **env_changes}
    return subprocess.run([sys.executable, "-m", "pipeline.build_laion_face", "--input", built.input_url,
                           "--output", output, "--allow-host", f"127.0.0.1:{server.port}", *BUILD_FLAGS,
                           "--no-progress"], cwd=ROOT, text=True, capture_output=True, timeout=300, env=env)


def test_throttling_and_dropped_uploads_are_retried(s3: S3, built: Built, server: ImageServer,
                                                    tmp_path: Path) -> None:
    faults = Faults(slow_down=6, drop=3)
    proxy = faulty_proxy(s3.endpoint, faults)
    try:
        result = build_through(proxy, server, built, f"s3://{BUCKET}/throttled")
    finally:
        proxy.shutdown()
    assert result.returncode == 0, result.stderr[-3000:]
    assert faults.injected == {"slow_down": 6, "drop": 3}
    copy = s3.download("throttled", tmp_path / "throttled")
    assert not [n for n in s3.find("throttled") if ".tmp-" in n]
    check_consistent(copy, built.rows)
    assert summary_of(copy) == summary_of(built.copy)


def test_a_store_that_keeps_refusing_gives_one_error_line_and_leaves_nothing_half_written(
        s3: S3, built: Built, server: ImageServer) -> None:
    faults = Faults(fail_after=8)  # the output's first files go through, then every write is throttled
    proxy = faulty_proxy(s3.endpoint, faults)
    try:
        # botocore's own attempts cut to 2 (AWS_MAX_ATTEMPTS, as a user may set it): the same
        # give-up, without a minute of its backoff
        result = build_through(proxy, server, built, f"s3://{BUCKET}/refused", AWS_MAX_ATTEMPTS="2")
    finally:
        proxy.shutdown()
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
    assert re.fullmatch(rf"error: writing unit \d+ to s3://{BUCKET}/refused failed after the store's retries: "
                        r"\w+: .*Please reduce your request rate\.; nothing half-written is left: "
                        r"rerun the same command to go on", errors[0]), errors
    assert faults.injected["slow_down"] > 1  # retried before giving up
    objects = s3.find("refused")
    assert not [n for n in objects if ".tmp-" in n], "nothing half-written"
    assert "stats.json" not in objects


def test_a_write_whose_rename_is_refused_leaves_no_temporary_file(s3: S3) -> None:
    """On S3 the rename into place is a copy, a write of its own: the temporary file goes through, then
    the store throttles the copy past its retries (what left two shards' temporaries in CI)."""
    faults = Faults(fail_after=1)
    proxy = faulty_proxy(s3.endpoint, faults)
    output = Output(f"s3://{BUCKET}/rename-refused")
    output.fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                  endpoint_url=f"http://127.0.0.1:{proxy.server_address[1]}",
                                  config_kwargs={"retries": {"max_attempts": 2}})  # botocore's backoff: seconds, not a minute
    try:
        with pytest.raises(OSError, match="reduce your request rate"):
            output.write_json("stats.json", {"rows": 1})
    finally:
        proxy.shutdown()
    assert faults.injected["slow_down"] > 1, "the copy was retried and refused, after the upload went through"
    assert s3.find("rename-refused") == [], "neither the file nor its temporary"


def test_of_builds_claiming_one_s3_output_at_once_one_holds(s3: S3) -> None:
    """Object storage has no create-if-absent for every backend: the claim's write, settle and
    read-back must still leave exactly one holder among processes that claim together."""
    s3.fs.makedirs(f"{BUCKET}/locked", exist_ok=True)
    assert race_for(f"s3://{BUCKET}/locked", claimants=3) == ["holds", "refused", "refused"]
    assert s3.find("locked") == [], "the holder released its lock"


def test_a_gzipped_tsv_in_s3_is_converted_into_an_s3_output_once(s3: S3) -> None:
    source = f"s3://{BUCKET}/meta/cc12m.tsv.gz"
    s3.fs.pipe_file(source, gzip.compress(b"https://a.example/1.jpg\tone\nhttps://a.example/2.jpg\ttwo\n"))
    config = BuildConfig(preset="cc12m")
    config = config.with_columns(check_inputs([source], config))
    output = Output(f"s3://{BUCKET}/staged")
    staged = staged_parquet(source, output, config)
    assert staged.startswith(f"s3://{BUCKET}/staged/inputs/cc12m-") and input_rows([staged]) == {staged: 2}
    assert staged_parquet(source, output, config) == staged and len(s3.find("staged/inputs")) == 1
    with output.fs.open(staged, "rb") as f:
        assert read_parquet(f)["caption"].to_pylist() == ["one", "two"]



def test_an_input_the_store_keeps_refusing_gives_one_error_line(s3: S3, built: Built, server: ImageServer) -> None:
    """The input's first reads (the driver's checks and plan) go through, then the store throttles every
    read of it past its retries: a fetch task cannot read its unit's rows. One line names the input, the
    rows and the store's reason; no traceback, no temporary object, no stats.json."""
    faults = Faults(refuse_reads="/in/", refuse_reads_after=3)  # of 7 reads of the input in a whole build
    proxy = faulty_proxy(s3.endpoint, faults)
    try:
        result = build_through(proxy, server, built, f"s3://{BUCKET}/input-refused", AWS_MAX_ATTEMPTS="2")
    finally:
        proxy.shutdown()
    assert result.returncode == 1, result.stderr[-3000:]
    assert faults.injected["read_refused"] >= 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"error: input s3://{BUCKET}/in/part-00000\.parquet: rows \d+-\d+ cannot be read: .*Please reduce your "
        r"request rate\.; finished units are kept: rerun the same command to go on", lines[0]), lines
    objects = s3.find("input-refused")
    assert not [n for n in objects if ".tmp-" in n] and "stats.json" not in objects
