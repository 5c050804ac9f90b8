"""Downstream metrics of FaRL's protocol: face-alignment NME with CED/AUC/FR, face-parsing F1, and
face-attribute accuracies.

Formulas and 0-based point indices follow /work/shared/reference/farl.md ("Downstream protocol",
sections "Face parsing" and "Face alignment"), which collects them from the official FaRL code:

- NME per sample = mean over points of ||pred - gt|| / d, in original image coordinates, with d
  taken from the ground truth: inter-ocular, inter-pupil (by K: 68 = 300W, 98 = WFLW, 19 = AFLW-19),
  `box` = sqrt(w * h) or `diag` = sqrt(w^2 + h^2) of the ground-truth box. The reported NME is the
  mean of the per-sample values.
- CED(x) = fraction of samples with NME <= x on the grid 0..T (step 1e-4); AUC = Simpson integral of
  CED over [0, T] / T; FR = 1 - CED(T), the fraction with NME > T. Both are fractions, not percent.
- Parsing F1: one confusion matrix over the whole test set; per class F1 = 2*TP / (predicted + actual);
  mean F1 over every class but 0 (background). A class that never occurs and is never predicted has
  F1 = 0/0, which is nan here and left out of the mean (the mean is nan if no class is left).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import simpson

# K -> normalize -> (points averaged into the first eye, points averaged into the second eye).
_EYE_POINTS: dict[int, dict[str, tuple[list[int], list[int]]]] = {
    68: {"inter_ocular": ([36], [45]), "inter_pupil": (list(range(36, 42)), list(range(42, 48)))},
    98: {"inter_ocular": ([60], [72]), "inter_pupil": ([96], [97])},
    19: {"inter_ocular": ([6], [11]), "inter_pupil": ([7], [10])},
}
_NORMALIZERS = ("inter_ocular", "inter_pupil", "box", "diag")


def landmark_nme(pred: np.ndarray, gt: np.ndarray, normalize: str,
                 boxes: np.ndarray | None = None) -> np.ndarray:
    """Per-sample NMEs (N,) of (N, K, 2) pixel points; `boxes` (N, 4) x1, y1, x2, y2 for box and diag."""
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if gt.ndim != 3 or gt.shape[2] != 2 or pred.shape != gt.shape:
        raise ValueError(f"pred and gt must both be (N, K, 2), got {pred.shape} and {gt.shape}")
    if normalize not in _NORMALIZERS:
        raise ValueError(f"normalize must be one of {_NORMALIZERS}, got {normalize!r}")
    if normalize in ("box", "diag"):
        if boxes is None:
            raise ValueError(f"normalize={normalize!r} needs the ground-truth boxes (N, 4)")
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.shape != (len(gt), 4):
            raise ValueError(f"boxes must be ({len(gt)}, 4) x1, y1, x2, y2, got {boxes.shape}")
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        d = np.sqrt(w * h) if normalize == "box" else np.hypot(w, h)
    else:
        if gt.shape[1] not in _EYE_POINTS:
            raise ValueError(f"{normalize} is defined for K in {sorted(_EYE_POINTS)} points, got K={gt.shape[1]}")
        first, second = _EYE_POINTS[gt.shape[1]][normalize]
        d = np.linalg.norm(gt[:, first].mean(axis=1) - gt[:, second].mean(axis=1), axis=-1)
    if not np.all(d > 0):
        raise ValueError(f"the {normalize} distance must be positive, got {d[~(d > 0)][:5]} for some samples")
    return np.linalg.norm(pred - gt, axis=-1).mean(axis=1) / d


def auc_fr(nmes: np.ndarray, threshold: float, step: float = 1e-4) -> tuple[float, float]:
    """(AUC, FR) at `threshold` of per-sample NMEs, both as fractions: CED on 0..threshold, Simpson."""
    nmes = np.asarray(nmes, dtype=np.float64)
    if nmes.ndim != 1 or len(nmes) == 0 or np.isnan(nmes).any():
        raise ValueError(f"nmes must be a non-empty 1-D array without nan, got shape {nmes.shape}")
    if not 0 < step <= threshold:
        raise ValueError(f"need 0 < step <= threshold, got step={step}, threshold={threshold}")
    grid = np.linspace(0.0, threshold, round(threshold / step) + 1)  # the last point is exactly threshold
    ced = np.searchsorted(np.sort(nmes), grid, side="right") / len(nmes)  # fraction with NME <= x
    return float(simpson(ced, x=grid) / threshold), float(np.mean(nmes > threshold))


def parsing_f1(confusion: np.ndarray) -> tuple[np.ndarray, float]:
    """(per-class F1 (C,), mean F1 over classes 1..C-1 that are not nan) of a (C, C) confusion matrix.

    `confusion[i, j]` counts pixels of true class i predicted as j. 0/0 (a class absent from both
    the truth and the prediction) gives nan, which the mean leaves out; background (0) is never in it.
    """
    confusion = np.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1] or (confusion < 0).any():
        raise ValueError(f"confusion must be a square (C, C) matrix of counts >= 0, got shape {confusion.shape}")
    tp = np.diag(confusion).astype(np.float64)
    total = confusion.sum(axis=0) + confusion.sum(axis=1)  # predicted + actual
    with np.errstate(invalid="ignore"):
        f1 = 2 * tp / total
    kept = f1[1:][~np.isnan(f1[1:])]
    return f1, float(kept.mean()) if len(kept) else float("nan")


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class ConfusionAccumulator:
    """Sums a (C, C) confusion matrix (true class = row) over batches of class-id maps of any shape."""

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    @property
    def confusion(self) -> np.ndarray:
        return self._confusion.copy()

    def reset(self) -> None:
        self._confusion[:] = 0

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Count `pred` against `target` (same shape); pixels whose target is ignore_index are skipped.

        Two tensors are counted with torch.bincount on their device; anything else with np.bincount.
        """
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"pred and target must have the same shape, "
                             f"got {tuple(pred.shape)} and {tuple(target.shape)}")
        if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
            pred, target = pred.reshape(-1).long(), target.reshape(-1).to(pred.device).long()
            bincount = torch.bincount
        else:
            pred, target = (_to_numpy(x).reshape(-1).astype(np.int64) for x in (pred, target))
            bincount = np.bincount
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        c = self.num_classes
        if len(target) and (min(pred.min(), target.min()) < 0 or max(pred.max(), target.max()) >= c):
            raise ValueError(f"class ids must lie in [0, {c}) (apart from ignore_index={self.ignore_index})")
        counts = bincount(target * c + pred, minlength=c * c)
        self._confusion += _to_numpy(counts).reshape(c, c)

    def result(self) -> tuple[np.ndarray, float]:
        """(per-class F1, mean F1) of the confusion so far; see parsing_f1."""
        return parsing_f1(self._confusion)


def attribute_metrics(predicted: np.ndarray, truth: np.ndarray, names: tuple[str, ...]) -> dict:
    """Binary attributes, (N, A) 0/1 arrays: mean accuracy over the attributes (the literature's
    number), per-attribute accuracy and balanced accuracy (mean of the recalls of 1 and of 0; an
    attribute with one class only in `truth` gets that class's recall), and what predicting each
    attribute's majority value of `truth` scores (~80 % on CelebA: the number to beat)."""
    predicted, truth = predicted.astype(bool), truth.astype(bool)
    accuracy = (predicted == truth).mean(0)
    recalls = []
    for wanted in (True, False):
        present = (truth == wanted).sum(0)
        hit = ((predicted == wanted) & (truth == wanted)).sum(0)
        recalls.append(np.where(present > 0, hit / np.maximum(present, 1), np.nan))
    balanced = np.nanmean(np.stack(recalls), axis=0)
    majority = np.maximum(truth.mean(0), 1 - truth.mean(0))
    return {"mean_accuracy": float(accuracy.mean()), "mean_balanced_accuracy": float(balanced.mean()),
            "majority_accuracy": float(majority.mean()),
            "accuracy": {name: float(a) for name, a in zip(names, accuracy)},
            "balanced_accuracy": {name: float(b) for name, b in zip(names, balanced)}}
