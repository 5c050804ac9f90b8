"""`train.pretrain --workers 2` loses a node mid-training (ray.cluster_utils.Cluster: real raylets on
one machine): Ray Train starts the group again, it resumes from the last checkpoint and reaches the
requested step, the log says so, and metrics.jsonl holds each step once."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from outputs import ROOT

from train.model import FaRL

# A head without CPUs (the driver, the metrics actor and Ray Train's controller need none) and three
# nodes of one CPU each: with one CPU per training worker the two ranks run on different nodes, and
# the third is the spare a real cluster's autoscaler would bring up, so the restarted group has
# somewhere to run (ray.cluster_utils can add a node only from the main thread, which runs the
# trainer). Once the first checkpoint is written and a later step logged, rank 0's node is killed
# outright: its raylet and workers get SIGKILL, as in a spot reclaim.
CLUSTER_NODE_LOSS = textwrap.dedent("""
    import json
    import os
    import sys
    import threading
    import time
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster
    from ray.train.v2._internal.state.state_actor import get_state_actor

    os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"] = "1"  # which node rank 0 is on: Ray Train's state actor knows
    output = Path(sys.argv[sys.argv.index("--output") + 1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1, wait=False) for _ in range(3)]
    cluster.wait_for_nodes(timeout=120)

    def logged_steps() -> list[int]:
        path = output / "metrics.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []

    def rank_zero_node() -> str:
        attempts = ray.get(get_state_actor().get_train_run_attempts.remote())  # {run: {attempt: ...}}
        workers = [w for run in attempts.values() for attempt in run.values() for w in attempt.workers]
        return next(w.node_id for w in workers if w.world_rank == 0)

    def reclaim() -> None:
        latest = output / "checkpoints" / "latest.json"
        while not latest.exists() or max(logged_steps()) <= json.loads(latest.read_text())["step"]:
            time.sleep(0.05)
        victim = next(n for n in nodes if n.node_id == rank_zero_node())
        cluster.remove_node(victim, allow_graceful=False)
        (output / "before_the_node_died.jsonl").write_text((output / "metrics.jsonl").read_text())

    threading.Thread(target=reclaim, daemon=True).start()
    from train.pretrain import main
    code = main(sys.argv[1:] + ["--address", cluster.address, "--workers", "2", "--cpus-per-worker", "1"])
    ray.shutdown()
    cluster.shutdown()
    sys.exit(code)
""")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(420)
def test_training_survives_losing_a_node(built_output: Path, tmp_path: Path) -> None:
    out, steps = tmp_path / "run", 14
    result = subprocess.run(
        [sys.executable, "-c", CLUSTER_NODE_LOSS, "--config", str(ROOT / "configs" / "pretrain_tiny.yaml"),
         "--data", str(built_output), "--output", str(out), "--steps", str(steps), "--log-every", "1",
         "--checkpoint-every", "4", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)  # under the test's own: its stderr is kept
    assert result.returncode == 0, result.stderr[-3000:]
    before = records(out / "before_the_node_died.jsonl")
    restart = [line for line in result.stderr.splitlines() if "restarted after a worker failure" in line]
    assert len(restart) == 1, result.stderr[-3000:]
    assert "(attempt 2, --max-failures 3): resuming from step " in restart[0]
    resumed_at = int(restart[0].rsplit(" ", 1)[1])
    assert resumed_at % 4 == 0 and 4 <= resumed_at < before[-1]["step"]  # the first run's later steps are replayed
    after = records(out / "metrics.jsonl")
    assert [r["step"] for r in after] == list(range(1, steps + 1))
    assert after[:resumed_at] == before[:resumed_at]  # the steps the checkpoint holds, as first written
    replayed = {r["step"]: r["loss"] for r in before[resumed_at:]}
    assert all(after[step - 1]["loss"] != loss for step, loss in replayed.items())  # the replay's values, not the lost run's
    assert all(math.isfinite(r["loss"]) for r in after)
    assert sum(r["loss"] for r in after[-3:]) / 3 < after[0]["loss"]  # it went on learning after the restart
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == steps
    state = torch.load(out / "checkpoints" / f"step_{steps:08d}.state.pt", weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {float(steps)}  # AdamW went on from the checkpoint
    model = FaRL.from_checkpoint(str(out / "checkpoints" / f"step_{steps:08d}.pt"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
