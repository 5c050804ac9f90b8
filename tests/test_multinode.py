"""The builder on a Ray cluster of several nodes (ray.cluster_utils.Cluster: real raylets on one
machine), joined with --address as on a real cluster. Pre-training on a cluster, its two ranks on two
nodes, is tests/test_pretrain_node_loss.py's (which also loses one of them)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from demo.data import make_demo_images
from demo.server import ImageServer
from outputs import ROOT, assert_same_output, check_consistent, laion_parquet
from pipeline.build import build
from pipeline.build_config import BuildConfig
from pipeline.config import load_config

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


# A build on a head and two worker nodes that loses a worker node as a spot reclaim does: its
# worker processes and raylet SIGKILLed at once. The moment is made certain rather than left to
# timing: every worker process of the job pauses in the function the first argument names
# (worker_process_setup_hook), the first call on a worker node leaves its node's id in
# SIGNALS/calls, and that node is killed while the call sleeps. To pause in the dedupe, its removal
# plan is applied on the workers whatever the build's size (below dedupe.LOCAL_ROWS rows it is
# applied in the driver); the decisions before it stay in the driver, as nothing of theirs is left
# on a node once the plan is written.
# argv: MODULE.FUNCTION SIGNALS BUILD_ARGS...; the NODE_LOSS line of stdout says what was killed when.
NODE_LOSS_BUILD = textwrap.dedent("""
    import importlib
    import json
    import os
    import signal
    import sys
    import threading
    import time
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster

    target, signals, build_args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    out = Path(build_args[build_args.index("--output") + 1])
    PAUSE_S = 3.0  # the kill lands in well under a second (or the call says "late")

    # No CPU on the head: every task runs on a worker node, so one that pauses there can be killed.
    # A dead node is noticed after 4 missed health checks a second apart, not Ray's 5 of 3 s: the
    # outcome is the same, 10 s sooner.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": {
        "health_check_period_ms": 1000, "health_check_failure_threshold": 4}})
    workers = [cluster.add_node(num_cpus=2, wait=False) for _ in range(2)]
    cluster.wait_for_nodes(timeout=120)
    head = cluster.head_node.node_id
    (signals / "pids").mkdir(parents=True)
    (signals / "calls").mkdir()


    def pause_on_worker_nodes() -> None:
        node = ray.get_runtime_context().get_node_id()
        (signals / "pids" / f"{node}-{os.getpid()}").touch()
        module_name, name = target.rsplit(".", 1)
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def paused(*args, **kwargs):
            if node != head and not (signals / "killed").exists():
                (signals / "calls" / node).touch()
                time.sleep(PAUSE_S)
                if (signals / "killed").exists() and json.loads((signals / "killed").read_text())["node"] == node:
                    (signals / "late").touch()  # the kill came after the pause: it did not interrupt this call
            return original(*args, **kwargs)

        setattr(module, name, paused)


    def kill_the_first_node_called() -> None:
        while not (calls := list((signals / "calls").iterdir())):
            time.sleep(0.05)
        victim = next(node for node in workers if node.node_id == calls[0].name)
        committed = len(list(out.glob("status/*.parquet")))
        (signals / "killing").write_text(json.dumps({"node": victim.node_id, "units_committed": committed}))
        (signals / "killing").rename(signals / "killed")  # whole: paused calls read it
        for pid_file in (signals / "pids").glob(f"{victim.node_id}-*"):
            try:
                os.kill(int(pid_file.name.rsplit("-", 1)[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        cluster.remove_node(victim, allow_graceful=False)


    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False,
             runtime_env={"worker_process_setup_hook": pause_on_worker_nodes})
    from pipeline import dedupe
    from pipeline.build_laion_face import main

    if target.startswith("pipeline.dedupe."):
        apply_in_the_driver, local_rows = dedupe.apply_removal_plan, dedupe.LOCAL_ROWS

        def apply_removal_plan(*args, **kwargs):
            dedupe.LOCAL_ROWS = 0  # the plan goes to the workers
            try:
                return apply_in_the_driver(*args, **kwargs)
            finally:
                dedupe.LOCAL_ROWS = local_rows

        dedupe.apply_removal_plan = apply_removal_plan
    killer = threading.Thread(target=kill_the_first_node_called, daemon=True)
    killer.start()
    code = main(build_args + ["--address", cluster.address])
    killed = json.loads((signals / "killed").read_text()) if (signals / "killed").exists() else None
    killer.join(timeout=60)  # a build may finish before remove_node has returned,
    deadline = time.time() + 30  # and Ray's view of the nodes lags a removal by a moment
    while (alive := sum(node["Alive"] for node in ray.nodes())) > 2 and time.time() < deadline:
        time.sleep(0.5)
    print("NODE_LOSS", json.dumps({"killed": killed, "late": (signals / "late").exists(), "alive_nodes": alive}))
    ray.shutdown()
    cluster.shutdown()
    sys.exit(code)
""")
NODE_LOSS_UNITS = 12


def jpeg(data: bytes, quality: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def node_loss_case(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], Path]]:
    """The arguments of a build that both dedupes have work in, and its output built here without
    interruption. A slow web (each image a second behind its headers) keeps units in flight."""
    tmp = tmp_path_factory.mktemp("node_loss")
    with ImageServer(stall_seconds=1.0) as server:
        images = make_demo_images(seed=2)[:18]  # t1.jpg, its scaled and grey copies: near-duplicates
        for i, image in enumerate(images):
            server.add(f"/m/{i}", image.data, image.content_type)
        server.add("/m/astronaut-q60", jpeg(images[6].data, 60))
        server.add("/m/tom-q80", jpeg(images[1].data, 80))
        sources = [f"/m/{i}" for i in range(18)] + [f"/m/{i}&copy" for i in (0, 6, 13)]  # the same bytes
        sources += ["/m/astronaut-q60", "/m/tom-q80", "/m/17&copy"]
        urls = [server.url(f"/fault/stall?src={source}") for source in sources]
        assert len(urls) == 2 * NODE_LOSS_UNITS
        args = ["--input", str(laion_parquet(tmp / "in.parquet", urls)), "--shard-size", "2",
                "--allow-host", f"127.0.0.1:{server.port}", "--no-progress"]
        reference = tmp / "reference"
        build(load_config(BuildConfig, args + ["--output", str(reference)], ""))
        yield args, reference


@pytest.mark.timeout(240)
@pytest.mark.parametrize("pause_in", ["pipeline.write.write_tar", "pipeline.dedupe._rewrite_shard"],
                         ids=["killed-while-writing", "killed-in-the-dedupe"])
def test_a_build_that_loses_a_worker_node_finishes_as_if_uninterrupted(
        node_loss_case: tuple[list[str], Path], tmp_path: Path, pause_in: str) -> None:
    args, reference = node_loss_case
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", NODE_LOSS_BUILD, pause_in, str(tmp_path / "signals"),
                             *args, "--output", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("NODE_LOSS "))[10:])
    assert report["killed"] is not None and not report["late"] and report["alive_nodes"] == 2, report
    if pause_in.endswith("write_tar"):  # a worker node went down while units were still to come
        assert report["killed"]["units_committed"] < NODE_LOSS_UNITS
    else:  # ... or once they had all been written, during the dedupe
        assert report["killed"]["units_committed"] == NODE_LOSS_UNITS
    status, _, _ = check_consistent(out, 2 * NODE_LOSS_UNITS)
    assert {"duplicate_image", "near_duplicate"} <= set(status["status"].to_pylist())
    assert not (out / "plan" / "removals").exists(), "every removal the dedupe decided is applied"
    assert_same_output(out, reference)
