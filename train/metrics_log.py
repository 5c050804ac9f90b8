"""Metrics of a run: JSON lines (LOG_DIR/metrics.jsonl), TensorBoard (LOG_DIR/tensorboard/) and a
progress bar with images/s and losses. Only rank 0 reports; the values are already averaged over ranks.
A resumed run appends, so steps between the last checkpoint and a kill appear twice: later lines win.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import fsspec
from tensorboardX import SummaryWriter
from tqdm import tqdm

from train.pretrain_config import PretrainConfig


def log_folder(cfg: PretrainConfig) -> Path:
    if cfg.log_dir:
        return Path(cfg.log_dir)
    protocol = fsspec.core.url_to_fs(cfg.output)[0].protocol
    if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
        raise ValueError(f"output {cfg.output} is not local: set --log-dir to a local folder for the metrics")
    return Path(fsspec.core.strip_protocol(cfg.output))


class MetricsFiles:
    """LOG_DIR/metrics.jsonl and LOG_DIR/tensorboard/. A Ray run makes this an actor on the driver's
    node, so the metrics land on the machine the command ran on, wherever rank 0 is placed."""

    def __init__(self, folder: str):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(folder) / "metrics.jsonl", "a")
        self.tensorboard = SummaryWriter(str(Path(folder) / "tensorboard"))

    def write(self, record: dict[str, float]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, value in record.items():
            if name != "step":
                self.tensorboard.add_scalar(f"train/{name}", value, record["step"])

    def close(self) -> None:  # twice is fine: rank 0 closes at the end, the driver after a failure too
        self.jsonl.close()
        self.tensorboard.close()


class MetricsLog:
    """Rank 0's metrics: into `files` (a MetricsFiles actor on the driver's node, in a Ray run) or
    into a MetricsFiles of its own; and the progress bar."""

    def __init__(self, cfg: PretrainConfig, rank: int, start_step: int, world_size: int, files: Any = None):
        self.enabled = rank == 0
        self.images_per_step = cfg.batch_size * world_size
        self.last_step, self.last_time = start_step, time.perf_counter()
        if not self.enabled:
            return
        if files is None:
            own = MetricsFiles(str(log_folder(cfg)))
            self.write_files, self.close_files = own.write, own.close
        else:  # an actor runs one caller's calls in order, so close() returns after every write
            import ray
            self.write_files, self.close_files = files.write.remote, lambda: ray.get(files.close.remote())
        self.bar = tqdm(total=cfg.steps, initial=start_step, disable=not cfg.progress, unit="step", dynamic_ncols=True)

    def write(self, step: int, lr: float, logit_scale: float, values: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        speed = (step - self.last_step) * self.images_per_step / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        record = {"step": step, "lr": lr, "logit_scale": logit_scale, "images_per_s": speed, **values}
        if self.enabled:
            self.write_files(record)
            losses = {k: f"{values[k]:.3f}" for k in ("loss", "contrastive", "mim") if k in values}
            self.bar.set_postfix(img_s=f"{speed:.1f}", **losses, refresh=False)
            self.bar.update(step - self.bar.n)
        return record

    def close(self) -> None:
        if self.enabled:
            self.close_files()
            self.bar.close()
