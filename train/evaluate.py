"""`python -m train.evaluate`: a fine-tuned checkpoint on a benchmark's test split, by FaRL's protocol.

    python -m train.evaluate --checkpoint out/finetune-lapa/best_val.pt --data data/LaPa --output out/eval-lapa --draw 8

Parsing: logits warped back onto the original label map's pixels (inverse tanh-warp), argmax,
one confusion matrix over the whole split, per-class and mean F1 (background left out).
Alignment: heatmap points unwarped to original pixels; NME per normalisation, AUC and FR at the
protocol's threshold, for every subset of the split (300W common/challenge/full, WFLW's
attribute subsets, AFLW-19 full/frontal). Attributes: a logit above 0 is "present"; mean accuracy
over the attributes, per-attribute accuracy and balanced accuracy, and the majority predictor's
accuracy beside them. `evaluate` is also what fine-tuning calls every epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.storage import save_json
from train.downstream.datasets import DatasetError, open_dataset
from train.downstream.data import WarpedSamples, collate
from train.downstream.draw import draw_prediction
from train.downstream.face_model import FaceModel, heatmap_points
from train.downstream.finetune_config import FinetuneConfig
from train.downstream.geometry import inverse_tanh_warp_grid, unwarp_points, warp_images
from train.downstream.metrics import ConfusionAccumulator, attribute_metrics, auc_fr, landmark_nme


@torch.no_grad()
def predict(model: FaceModel, batch: dict[str, Any], cfg: FinetuneConfig, device: torch.device) -> list[Any]:
    """Per sample, in original pixels: a label map (parsing) or (K, 2) landmarks (alignment); or the
    attributes predicted present (a bool per attribute)."""
    with cfg.autocast(device):
        output = model(batch["image"].to(device)).float()
    if cfg.task == "attributes":
        return list((output > 0).cpu())
    if cfg.task == "alignment":
        points = heatmap_points(output).cpu() * cfg.warp_size - 0.5  # [0, 1] -> warped-image pixels
        return list(unwarp_points(points, batch["matrix"], cfg.warp_factor, cfg.warp_size))
    labels = []
    for logits, matrix, original in zip(output, batch["label_matrix"], batch["original_label"]):
        grid = inverse_tanh_warp_grid(matrix[None].to(device), cfg.warp_factor, cfg.warp_size, tuple(original.shape))
        labels.append(warp_images(logits[None], grid)[0].argmax(0).cpu())
    return labels


def evaluate(model: FaceModel, samples: WarpedSamples, cfg: FinetuneConfig, device: torch.device,
             subsets: dict[str, np.ndarray] | None = None, draw_to: str = "", draw_count: int = 0) -> dict[str, Any]:
    """The protocol's metrics of `model` on `samples` (evaluation mode, not augmented)."""
    model.eval()
    loader = torch.utils.data.DataLoader(samples, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate,
                                         generator=torch.Generator())  # leaves training's random stream untouched
    labels = getattr(samples.dataset, "labels", ())
    confusion = ConfusionAccumulator(len(labels)) if cfg.task == "parsing" else None
    predicted, truth, boxes, drawn = [], [], [], 0
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not cfg.progress):
        for j, prediction in enumerate(predict(model, batch, cfg, device)):
            if confusion is not None:
                confusion.update(prediction, batch["original_label"][j])
            elif cfg.task == "attributes":
                predicted.append(prediction.numpy())
                truth.append(batch["attributes"][j].numpy())
            else:
                predicted.append(prediction.numpy())
                truth.append(batch["landmarks"][j].numpy())
                boxes.append(batch["box"][j].numpy())
            if drawn < draw_count and cfg.task != "attributes":  # nothing to draw on the face
                item = samples.dataset[int(batch["index"][j])]
                draw_prediction(item["image"], prediction.numpy(), Path(draw_to) / f"{drawn:03d}.png", cfg.task)
                drawn += 1
    if confusion is not None:
        per_class, mean = confusion.result()
        return {"f1_mean": float(mean), "f1": {name: float(f) for name, f in zip(labels, per_class)}}
    if cfg.task == "attributes":
        return attribute_metrics(np.stack(predicted), np.stack(truth), samples.dataset.attribute_names)
    return alignment_metrics(np.stack(predicted), np.stack(truth), np.stack(boxes), cfg, subsets)


def alignment_metrics(pred: np.ndarray, gt: np.ndarray, boxes: np.ndarray, cfg: FinetuneConfig,
                      subsets: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """{subset: {nme_NORM: mean NME, auc, fr}}: AUC and FR of the protocol's `auc` normalisation."""
    protocol = cfg.protocol["metrics"]
    results = {}
    for name, indices in (subsets or {"full": np.arange(len(pred))}).items():
        if len(indices) == 0:
            continue
        row: dict[str, float] = {}
        for normalize in protocol["normalize"]:
            nmes = landmark_nme(pred[indices], gt[indices], normalize, boxes[indices])
            row[f"nme_{normalize}"] = float(nmes.mean())
            if normalize == protocol["auc"]:
                row["auc"], row["fr"] = (float(v) for v in auc_fr(nmes, protocol["auc_threshold"]))
        results[name] = row
    return results


def score(cfg: FinetuneConfig, metrics: dict[str, Any]) -> float:
    """The number a benchmark ranks by, as higher-is-better: mean F1, mean accuracy, or minus the full set's NME."""
    if cfg.task == "parsing":
        return metrics["f1_mean"]
    if cfg.task == "attributes":
        return metrics["mean_accuracy"]
    return -metrics["full"][f"nme_{cfg.protocol['metrics']['normalize'][0]}"]


def load_finetuned(path: str, device: torch.device) -> tuple[FaceModel, FinetuneConfig]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # torch raises several types for what is no checkpoint; its advice (unsafe loading) is not ours
        raise ValueError(f"checkpoint {path} cannot be read as a torch file ({type(err).__name__})") from None
    try:
        model = FaceModel(**checkpoint["face_model"])
        model.load_state_dict(checkpoint["weights"])
        cfg = FinetuneConfig(**checkpoint["finetune_config"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{path} is not a fine-tuning checkpoint of train.finetune: {str(err).splitlines()[0]}") from None
    return model.to(device), cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a fine-tuned FaRL checkpoint by the benchmark's protocol.")
    parser.add_argument("--checkpoint", required=True, help="best_val.pt, best_test.pt or last.pt of train.finetune")
    parser.add_argument("--data", help="dataset root; default: the one the checkpoint was trained on")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", default="", help="folder for metrics.json (and drawings); default: print only")
    parser.add_argument("--draw", type=int, default=0, help="draw this many predictions as PNG into OUTPUT/draw")
    parser.add_argument("--batch-size", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, cfg = load_finetuned(args.checkpoint, device)
        cfg.data, cfg.batch_size = args.data or cfg.data, args.batch_size or cfg.batch_size
        dataset = open_dataset(cfg.dataset, cfg.data, args.split)
    except (ValueError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    draw_to = str(Path(args.output) / "draw") if args.output and args.draw else ""
    metrics = evaluate(model, WarpedSamples(dataset, cfg, train=False), cfg, device, dataset.subsets(),
                       draw_to, args.draw if draw_to else 0)
    result = {"dataset": cfg.dataset, "split": args.split, "checkpoint": args.checkpoint, **metrics}
    print(json.dumps(result, indent=2))
    if args.output:
        save_json(args.output, "metrics.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
