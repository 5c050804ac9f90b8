"""Training checkpoints in OUTPUT/checkpoints/, local or fsspec, and initialisation from weight files.

Every N steps: `step_00001000.pt` (the model in the official FaRL layout, loadable on its own),
then `step_00001000.state.pt` (optimizer state and the data stream's position), then `latest.json` naming both. Each file appears
atomically (pipeline.storage), and latest.json is written last, so a kill at any moment leaves the
previous checkpoint in force; rerunning the same command resumes from it.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.storage import Output
from train.model import MIM_KEYS, FaRL, load_state_dict

log = logging.getLogger("train")
KEEP = 2  # checkpoints kept before the latest: older ones are deleted as new ones land
LATEST = "checkpoints/latest.json"  # names the last complete checkpoint's files


@dataclass
class Resumed:
    step: int
    path: str
    state_dict: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    data: dict[str, Any] | None  # where the data stream stood (train.pretraining.engine.DataPosition); None in older files


class Checkpoints:
    def __init__(self, output: str, writer: bool = True):
        self.output = Output(output)
        if writer:  # what a kill left half-written (gigabytes for ViT-B and its optimizer state)
            self.output.remove_temporaries(("checkpoints",))

    def save(self, step: int, model: FaRL, optimizer: torch.optim.Optimizer, data: dict[str, Any] | None = None) -> str:
        name = f"step_{step:08d}"
        folder = self.output.path("checkpoints")
        self.output.makedirs(folder)
        model_bytes = model.checkpoint_bytes(step=step)
        state = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "data": data}, state)
        self.output.write_atomic(f"{folder}/{name}.pt", lambda f: f.write(model_bytes))
        self.output.write_atomic(f"{folder}/{name}.state.pt", lambda f: f.write(state.getvalue()))
        self.output.write_json(LATEST, {"step": step, "model": f"{name}.pt", "state": f"{name}.state.pt"})
        self._prune(step)
        return f"{folder}/{name}.pt"

    def _prune(self, step: int) -> None:
        """Keep the checkpoint just written and the KEEP before it; files of later steps (an earlier
        run's, beyond a restart) are left alone."""
        older = [n for n in self.output.list("checkpoints", ".pt") if not n.endswith(".state.pt")
                 and int(n.removeprefix("step_").removesuffix(".pt")) < step]
        for name in older[:-KEEP] if KEEP else older:
            for path in (name, name.replace(".pt", ".state.pt")):
                full = self.output.path("checkpoints", path)
                if self.output.fs.exists(full):
                    self.output.fs.rm(full)

    def _url(self, name: str) -> str:
        return f"{self.output.url.rstrip('/')}/checkpoints/{name}"

    def latest_model(self) -> str | None:
        """URL of the last complete checkpoint's model file; None before the first."""
        pointer = self.output.read_json(LATEST)
        return None if pointer is None else self._url(pointer["model"])

    def latest(self) -> Resumed | None:
        pointer = self.output.read_json(LATEST)  # read once: model and state of one step
        if pointer is None:
            return None
        url = self._url(pointer["model"])
        state_dict, _ = load_state_dict(url)
        with self.output.fs.open(self.output.path("checkpoints", pointer["state"]), "rb") as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        return Resumed(step=pointer["step"], path=url, state_dict=state_dict, optimizer=state["optimizer"],
                       data=state.get("data"))


def init_weights(model: FaRL, path: str) -> None:
    """Load the weights `path` shares with `model`: all of CLIP's must be there; MIM weights are taken
    when present and the same shape (a file trained with another MIM target keeps the new head)."""
    state_dict, _ = load_state_dict(path)
    own = model.clip.state_dict()
    usable, skipped = {}, []
    for key, value in state_dict.items():
        if key not in own or (MIM_KEYS.match(key) and own[key].numel() != value.numel()):
            skipped.append(key)
            continue
        if MIM_KEYS.match(key):
            value = value.reshape(own[key].shape)
        elif own[key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model wants {tuple(own[key].shape)} "
                             "(is --model the architecture of this file?)")
        usable[key] = value
    missing = [k for k in own if k not in usable and not MIM_KEYS.match(k)]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} weights of the model, e.g. {missing[0]}")
    model.clip.load_state_dict(usable, strict=False)
    log.info("initialised from %s (%d tensors; %d not used: %s)", path, len(usable), len(skipped), skipped[:3])
