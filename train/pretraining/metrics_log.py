"""Metrics of a run: JSON lines (LOG_DIR/metrics.jsonl), TensorBoard (LOG_DIR/tensorboard/) and a
progress bar with images/s and losses. Only rank 0 reports; the values are already averaged over ranks.
A run that starts at step S (a rerun after a kill, or Ray Train's restart after a worker failure, both
from the checkpoint of step S) drops what the log holds of later steps: they are trained again, and
the log keeps the values of the steps whose weights it goes on from, each step once, as an unbroken run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import fsspec
from tensorboardX import SummaryWriter
from tqdm import tqdm

from train.pretraining.pretrain_config import PretrainConfig

log = logging.getLogger("train")


def log_folder(cfg: PretrainConfig) -> Path:
    if cfg.log_dir:
        return Path(cfg.log_dir)
    protocol = fsspec.core.url_to_fs(cfg.output)[0].protocol
    if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
        raise ValueError(f"output {cfg.output} is not local: set --log-dir to a local folder for the metrics")
    return Path(fsspec.core.strip_protocol(cfg.output))


class MetricsFiles:
    """LOG_DIR/metrics.jsonl and LOG_DIR/tensorboard/. A Ray run makes this an actor on the driver's
    node, so the metrics land on the machine the command ran on, wherever rank 0 is placed, and
    outlive the worker groups Ray Train restarts: it counts their starts (`attempt`)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.attempt = 0
        self.jsonl: Any = None
        self.tensorboard: SummaryWriter | None = None

    def start(self, step: int) -> int:
        """Rank 0 begins at `step`: records of later steps are dropped, from TensorBoard's view too
        (purge_step), since they are trained again. Returns which start of this command it is (1, 2, ...)."""
        self.close()
        self.attempt += 1
        keep_until(self.folder / "metrics.jsonl", step)
        self.jsonl = open(self.folder / "metrics.jsonl", "a")
        self.tensorboard = SummaryWriter(str(self.folder / "tensorboard"), purge_step=step + 1,
                                         filename_suffix=f".{self.attempt}")  # its name has whole seconds only
        return self.attempt

    def write(self, record: dict[str, float], attempt: int) -> None:
        if attempt != self.attempt:  # sent by a failed group's rank 0 and delivered after the new one started
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, value in record.items():
            if name != "step":
                self.tensorboard.add_scalar(f"train/{name}", value, record["step"])

    def close(self) -> None:  # twice is fine: rank 0 closes at the end, the driver after a failure too
        for handle in (self.jsonl, self.tensorboard):
            if handle is not None:
                handle.close()
        self.jsonl = self.tensorboard = None


def keep_until(path: Path, step: int) -> None:
    """Rewrite `path` without the records after `step` (and without a line a kill cut short)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if record_step(line) is not None and record_step(line) <= step]
    if len(kept) == len(lines):
        return
    log.info("%s: %d records after step %d dropped, as the run trains those steps again", path, len(lines) - len(kept), step)
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)


def record_step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """Rank 0's metrics: into `files` (a MetricsFiles actor on the driver's node, in a Ray run) or
    into a MetricsFiles of its own; and the progress bar."""

    def __init__(self, cfg: PretrainConfig, rank: int, start_step: int, world_size: int, files: Any = None):
        self.enabled = rank == 0
        self.images_per_step = cfg.batch_size * world_size
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.attempt = 1
        if not self.enabled:
            return
        self.files = files if files is not None else MetricsFiles(str(log_folder(cfg)))
        self.pending: Any = None  # the last write sent to the actor
        self.attempt = self.call("start", start_step)
        self.bar = tqdm(total=cfg.steps, initial=start_step, disable=not cfg.progress, unit="step", dynamic_ncols=True)

    def call(self, method: str, *args: Any) -> Any:
        """`method` of the MetricsFiles, here or in the actor; an actor runs one caller's calls in order,
        so whatever returns from it returns after every write before it."""
        if isinstance(self.files, MetricsFiles):
            return getattr(self.files, method)(*args)
        import ray
        return ray.get(getattr(self.files, method).remote(*args))

    def write(self, step: int, lr: float, logit_scale: float, values: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        speed = (step - self.last_step) * self.images_per_step / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        record = {"step": step, "lr": lr, "logit_scale": logit_scale, "images_per_s": speed, **values}
        if self.enabled:
            if isinstance(self.files, MetricsFiles):
                self.files.write(record, self.attempt)
            else:  # not waited for: the step goes on while the actor writes
                self.pending = self.files.write.remote(record, self.attempt)
            losses = {k: f"{values[k]:.3f}" for k in ("loss", "contrastive", "mim") if k in values}
            self.bar.set_postfix(img_s=f"{speed:.1f}", **losses, refresh=False)
            self.bar.update(step - self.bar.n)
        return record

    def flush(self) -> None:
        """Return once the records sent are written. Called before a checkpoint: a group that fails
        after it goes on from its step, and would never write a record of that step that was lost."""
        if self.enabled and self.pending is not None:
            import ray
            ray.get(self.pending)

    def close(self) -> None:
        if self.enabled:
            self.call("close")
            self.bar.close()
