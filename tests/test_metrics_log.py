"""train.pretraining.metrics_log: rank 0's metrics through a MetricsFiles actor, as a Ray run sends them to the
driver's node; the one-process path is covered by tests/test_pretrain.py's runs."""

from __future__ import annotations

import json
from pathlib import Path

from train.pretraining.metrics_log import MetricsFiles, MetricsLog
from train.pretraining.pretrain_config import PretrainConfig


def test_rank_zero_writes_through_an_actor_in_order(ray_address: str, tmp_path: Path) -> None:
    import ray

    folder = tmp_path / "logs"
    files = ray.remote(MetricsFiles).options(num_cpus=0).remote(str(folder))
    cfg = PretrainConfig(data="unused", output=str(tmp_path / "out"), steps=60, progress=False)
    ranks = [MetricsLog(cfg, rank, start_step=0, world_size=2, files=files) for rank in (0, 1)]
    for step in range(1, 61):
        for log in ranks:
            log.write(step, 0.1, 10.0, {"loss": 1.0 / step})
    for log in ranks:
        log.close()  # rank 0's returns once the actor has run every write before it
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 61))  # rank 0's only, in order
    assert records[-1]["loss"] == 1.0 / 60 and records[-1]["images_per_s"] > 0
    assert any(p.name.startswith("events.out.tfevents") for p in (folder / "tensorboard").iterdir())
    assert not (tmp_path / "out").exists()  # nothing in the output folder: the actor's folder is the log
