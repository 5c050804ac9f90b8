"""The builder and the pre-training on a Ray cluster of several nodes (ray.cluster_utils.Cluster:
real raylets on one machine), joined with --address as on a real cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from demo.data import make_demo_images
from demo.server import ImageServer
from outputs import ROOT, check_consistent, laion_parquet

CLUSTER_BUILD = textwrap.dedent("""
    import sys
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=2, wait=False)  # its own wait gives up after 30 s: too short on a loaded box
    cluster.wait_for_nodes(timeout=120)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    from pipeline.build_laion_face import main
    code = main(sys.argv[1:] + ["--address", cluster.address])
    ray.shutdown()
    cluster.shutdown()
    sys.exit(code)
""")

# Two nodes of one CPU each and one CPU per training worker: the two ranks can only run on different nodes.
CLUSTER_PRETRAIN = textwrap.dedent("""
    import sys
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, wait=False)
    cluster.wait_for_nodes(timeout=120)
    from train.pretrain import main
    code = main(sys.argv[1:] + ["--address", cluster.address, "--workers", "2", "--cpus-per-worker", "1"])
    ray.shutdown()
    cluster.shutdown()
    sys.exit(code)
""")


@pytest.mark.timeout(600)
def test_build_on_a_two_node_cluster(tmp_path: Path) -> None:
    with ImageServer() as server:
        urls = []
        for i, image in enumerate(make_demo_images(seed=2)[:24]):
            server.add(f"/m/{i}", image.data, image.content_type)
            urls.append(server.url(f"/m/{i}"))
        parquet = laion_parquet(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        result = subprocess.run(
            [sys.executable, "-c", CLUSTER_BUILD, "--input", str(parquet), "--output", str(out),
             "--allow-host", f"127.0.0.1:{server.port}", "--shard-size", "4", "--no-progress"],
            cwd=ROOT, capture_output=True, text=True, timeout=540)  # under the test's own: its stderr is kept
    assert result.returncode == 0, result.stderr[-3000:]
    status, metadata, _ = check_consistent(out, len(urls))
    assert metadata.num_rows > 0 and set(status["status"].to_pylist()) <= {
        "ok", "no_face", "face_rejected", "duplicate_image", "near_duplicate"}


@pytest.mark.timeout(300)
def test_pretrain_on_a_two_node_cluster(built_output: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", CLUSTER_PRETRAIN, "--config", str(ROOT / "configs" / "pretrain_tiny.yaml"),
         "--data", str(built_output), "--output", str(out), "--steps", "6", "--log-every", "3",
         "--checkpoint-every", "6", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6] and all(r["skipped_samples"] == 0 for r in records)
    # near chance level after 3 steps (ln 16 = 2.8 for the global batch); the gather itself: tests/test_losses.py
    assert 2.0 < records[0]["contrastive"] < 3.5
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 6
