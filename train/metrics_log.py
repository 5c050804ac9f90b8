"""Metrics of a run: JSON lines (LOG_DIR/metrics.jsonl), TensorBoard (LOG_DIR/tensorboard/) and a
progress bar with images/s and losses. Only rank 0 writes; the values are already averaged over ranks.
A resumed run appends, so steps between the last checkpoint and a kill appear twice: later lines win.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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


class MetricsLog:
    def __init__(self, cfg: PretrainConfig, rank: int, start_step: int, world_size: int):
        self.enabled = rank == 0
        self.images_per_step = cfg.batch_size * world_size
        self.last_step, self.last_time = start_step, time.perf_counter()
        if not self.enabled:
            return
        folder = log_folder(cfg)
        folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(folder / "metrics.jsonl", "a")
        self.tensorboard = SummaryWriter(str(folder / "tensorboard"))
        self.bar = tqdm(total=cfg.steps, initial=start_step, disable=not cfg.progress, unit="step", dynamic_ncols=True)

    def write(self, step: int, lr: float, logit_scale: float, values: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        speed = (step - self.last_step) * self.images_per_step / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        record = {"step": step, "lr": lr, "logit_scale": logit_scale, "images_per_s": speed, **values}
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            for name, value in record.items():
                if name != "step":
                    self.tensorboard.add_scalar(f"train/{name}", value, step)
            losses = {k: f"{values[k]:.3f}" for k in ("loss", "contrastive", "mim") if k in values}
            self.bar.set_postfix(img_s=f"{speed:.1f}", **losses, refresh=False)
            self.bar.update(step - self.bar.n)
        return record

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
            self.bar.close()
