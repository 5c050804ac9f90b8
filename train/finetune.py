"""`python -m train.finetune`: fine-tune a FaRL backbone on a parsing or alignment benchmark, by the
protocol of FaRL's downstream code (farl.md), and report both numbers people quote.

    python -m train.finetune --config configs/finetune_lapa.yaml --data data/LaPa \\
        --init FaRL-Base-Patch16-LAIONFace20M-ep16.pth --output out/finetune-lapa

Every `eval_every` epochs the EMA model is evaluated on the validation split and on the test
split (metrics.jsonl; each epoch's line also has its training speed, images_per_s, timed after the
epoch's first step, which waits for the loader; on a GPU the peak memory so far, peak_memory_gib;
on evaluated epochs eval_s, the seconds evaluation took). `--precision bf16` trains and evaluates
under bf16 autocast on a GPU (FaRL's protocol has no AMP: fp32 is the default).
report.json gives the best test number over all evaluated epochs (how the paper reports) and the
test number of the epoch chosen on validation (the honest one).
Validation: LaPa's and CelebAMask-HQ's own val splits; 300W, WFLW and AFLW-19 have none, so a
fixed, seeded `val_fraction` of their training split is held out (and not trained on);
`--val-fraction 0` trains on all of it, as the paper did, and reports the best-epoch number only.
Rerunning the same command after a kill resumes from OUTPUT/last.pt (random state included, so the
run goes on as if never stopped; a rerun may change only where the data and output are and how
long the run goes on); last.pt, best_val.pt and best_test.pt all hold the EMA weights that
`python -m train.evaluate` reads.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import asdict, replace
from typing import Any

import fsspec
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from pipeline.config import ConfigError, load_config
from pipeline.storage import Output
from train.downstream.datasets import DatasetError, open_dataset
from train.downstream.data import WarpedSamples, collate, listed_indices, subset_indices, train_val_indices
from train.evaluate import evaluate, score
from train.downstream.face_model import FaceModel, alignment_loss, attribute_loss, parsing_loss
from train.downstream.finetune_config import FinetuneConfig


# what a rerun into the same output may change: where the data and output are, how long the run
# goes on, how often it is evaluated, and how it runs; anything else would mix two runs in one
RESUMABLE_CHANGES = {"data", "output", "epochs", "eval_every", "max_steps_per_epoch", "workers", "progress"}


def make_splits(cfg: FinetuneConfig) -> tuple[WarpedSamples, WarpedSamples | None, WarpedSamples, float]:
    """(train, validation or None, test, the share of the training photos kept by the low-data cut)."""
    train = open_dataset(cfg.dataset, cfg.data, "train")
    test = WarpedSamples(open_dataset(cfg.dataset, cfg.data, "test"), cfg, train=False)
    paths = [photo_id(train.image_path(i), cfg.data) for i in range(len(train))]
    if "val" in train.splits:
        indices, val = list(range(len(train))), WarpedSamples(open_dataset(cfg.dataset, cfg.data, "val"), cfg, False)
    elif cfg.val_fraction == 0:
        indices, val = list(range(len(train))), None
    else:
        indices, held = train_val_indices(paths, cfg.val_fraction, cfg.seed)
        val = WarpedSamples(train, cfg, False, held)
    if cfg.train_subset:
        with fsspec.open(cfg.train_subset, "rt") as f:
            listed = [line.strip() for line in f if line.strip()]
        cut = listed_indices(paths, indices, listed, cfg.train_subset)
    elif cfg.train_fraction < 1 or cfg.train_count:
        cut = subset_indices(paths, indices, cfg.train_fraction, cfg.train_count, cfg.subset_seed)
    else:
        cut = indices
    if len(cut) < 2:  # a batch of one cannot train the heads' batch norm
        raise ValueError(f"{len(cut)} training sample(s) left after the validation hold-out and the low-data cut: "
                         "training needs at least 2 (raise --train-fraction or --train-count)")
    share = len({paths[i] for i in cut}) / len({paths[i] for i in indices})
    return WarpedSamples(train, cfg, True, cut), val, test, share


def schedule_for(cfg: FinetuneConfig, share: float) -> FinetuneConfig:
    """The epochs (--epochs, else the protocol's) scaled up for a cut training split so that it gets as
    many steps as the full one, down to 1 / max_epoch_scale of the photos (finetune_config)."""
    scale = min(1 / share, cfg.max_epoch_scale)
    epochs = cfg.epochs or cfg.protocol["epochs"]
    if scale == 1:
        return replace(cfg, epochs=epochs)
    return replace(cfg, epochs=round(epochs * scale), lr_drop_epoch=round(cfg.lr_drop_epoch * scale))


def photo_id(path: str, root: str) -> str:
    """A training photo as the subset files name it: its path below the dataset's root, so that a list
    made on one machine selects the same photos from a copy of the dataset anywhere else."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


def training_photos(samples: WarpedSamples, root: str) -> list[str]:
    """What OUTPUT/train_subset.txt lists: the photos trained on, each once, sorted."""
    return sorted({photo_id(samples.dataset.image_path(i), root) for i in samples.indices})


def outputs_of(samples: WarpedSamples) -> int:
    dataset = samples.dataset
    if dataset.task == "attributes":
        return len(dataset.attribute_names)
    return len(dataset.labels) if dataset.task == "parsing" else dataset.num_points


def task_loss(model: FaceModel, batch: dict[str, Any], cfg: FinetuneConfig, device: torch.device) -> dict[str, torch.Tensor]:
    with cfg.autocast(device):
        output = model(batch["image"].to(device))  # the losses take the logits in fp32
    if cfg.task == "parsing":
        return parsing_loss(output, batch["label"].to(device))
    if cfg.task == "attributes":
        return attribute_loss(output, batch["attributes"].to(device))
    return alignment_loss(output, batch["points"].to(device), cfg.heatmap_sigma)


def save(output: Output, name: str, value: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    output.write_atomic(output.path(name), lambda f: f.write(buffer.getvalue()))


def summarize(cfg: FinetuneConfig, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Best-epoch test (the paper's way) and, with a validation split, the test of the epoch chosen on it."""
    best_test = max(history, key=lambda h: score(cfg, h["test"]))
    report = {"dataset": cfg.dataset, "task": cfg.task, "init": cfg.init, "epochs": cfg.epochs,
              "train_fraction": cfg.train_fraction, "train_count": cfg.train_count, "train_subset": cfg.train_subset,
              "best_epoch_test": {"epoch": best_test["epoch"], "test": best_test["test"]}}
    if all("val" in h for h in history):
        best_val = max(history, key=lambda h: score(cfg, h["val"]))
        report["val_chosen_test"] = {"epoch": best_val["epoch"], "val": best_val["val"], "test": best_val["test"]}
    return report


def check_resumable(cfg: FinetuneConfig, saved: dict[str, Any], path: str) -> None:
    changed = [f"{key} {saved[key]!r} -> {value!r}" for key, value in asdict(cfg).items()
               if key in saved and key not in RESUMABLE_CHANGES and saved[key] != value]
    if changed:
        raise ValueError(f"{path} is from a run with other settings ({'; '.join(changed)}): rerun with that run's "
                         "settings to resume it, or give a new --output")


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    train_set, val_set, test_set, share = make_splits(cfg)
    cfg = schedule_for(cfg, share)
    model = FaceModel.create(cfg.task, outputs_of(train_set), cfg.init, cfg.model, input_size=cfg.input_size,
                             channels=cfg.head_channels, blocks=tuple(cfg.feature_blocks),
                             heatmap_size=cfg.heatmap_size, frozen_backbone=cfg.linear_probe).to(device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.backbone_lr, cfg.head_lr, cfg.weight_decay), betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [cfg.lr_drop_epoch], gamma=0.1)
    output = Output(cfg.output)
    output.makedirs(output.root)
    if share < 1:  # the low-data cut, for --train-subset to reuse and for the record
        listed = "".join(f"{photo}\n" for photo in training_photos(train_set, cfg.data)).encode()
        output.write_atomic(output.path("train_subset.txt"), lambda f: f.write(listed))
    start, records = 0, []
    if output.fs.exists(output.path("last.pt")):
        with output.fs.open(output.path("last.pt"), "rb") as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
        check_resumable(cfg, state["finetune_config"], f"{cfg.output}/last.pt")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])  # shuffling and augmentation go on as if never stopped
        if torch.cuda.is_available() and "cuda_rng" in state:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start, records = state["epoch"], state["records"]
        print(f"resuming from epoch {start} ({cfg.output}/last.pt)", file=sys.stderr)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=len(train_set) > cfg.batch_size, num_workers=cfg.workers,
                                         collate_fn=collate)
    subsets = test_set.dataset.subsets()
    for epoch in range(start, cfg.epochs):
        model.train()
        steps = min(len(loader), cfg.max_steps_per_epoch or len(loader))
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        losses, first_done = [], 0.0
        for step, batch in zip(range(steps), loader):
            loss = task_loss(model, batch, cfg, device)
            optimizer.zero_grad(set_to_none=True)
            loss["loss"].backward()
            optimizer.step()
            ema.update_parameters(model)
            losses.append(loss["loss"].item())  # waits for the step, so the clock below times finished steps
            if step == 0:
                first_done = time.perf_counter()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
        trained = time.perf_counter()
        bar.close()
        schedule.step()
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": sum(losses) / len(losses), "lr": schedule.get_last_lr()}
        if steps > 1:  # every batch is full then (drop_last); the first step waits for the loader's start-up
            record["images_per_s"] = (steps - 1) * cfg.batch_size / (trained - first_done)
        if device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        # what evaluate and a later fine-tuning read: the EMA weights with their architecture and settings
        checkpoint = {"face_model": model.config, "finetune_config": asdict(cfg), "weights": ema.module.state_dict(),
                      "epoch": epoch + 1}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            if val_set is not None:
                record["val"] = evaluate(ema.module, val_set, cfg, device)
            record["test"] = evaluate(ema.module, test_set, cfg, device, subsets)
            record["eval_s"] = time.perf_counter() - trained
            history = [r for r in records if "test" in r] + [record]
            if val_set is not None and record is max(history, key=lambda h: score(cfg, h["val"])):
                save(output, "best_val.pt", checkpoint)
            if record is max(history, key=lambda h: score(cfg, h["test"])):
                save(output, "best_test.pt", checkpoint)
            val = f"val {score(cfg, record['val']):.4f}, " if val_set is not None else ""
            print(f"epoch {epoch + 1}: loss {record['loss']:.4f}, {val}test {score(cfg, record['test']):.4f} "
                  "(higher is better)", file=sys.stderr)
        records.append(record)
        save(output, "last.pt", {**checkpoint, "model": model.state_dict(), "ema": ema.state_dict(),
                                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                 "records": records, "rng": torch.get_rng_state(),
                                 **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})})
        lines = "".join(json.dumps(r) + "\n" for r in records).encode()  # rewritten whole: no duplicates after a resume
        output.write_atomic(output.path("metrics.jsonl"), lambda f: f.write(lines))
    history = [r for r in records if "test" in r]
    report = summarize(cfg, history)
    output.write_json("report.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(FinetuneConfig, argv, "Fine-tune FaRL on face parsing or alignment by FaRL's protocol.")
        report = finetune(cfg)
    except (ConfigError, DatasetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
