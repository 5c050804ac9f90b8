"""train/downstream/metrics.py against hand-computed values (the arithmetic is in the comments)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from train.downstream.metrics import ConfusionAccumulator, auc_fr, landmark_nme, parsing_f1


def random_gt(num_points: int, num_samples: int = 1, seed: int = 0) -> np.ndarray:
    """Random points, so that a normalizer read from the wrong indices would give another distance."""
    return np.random.default_rng(seed).uniform(0, 500, (num_samples, num_points, 2))


# ---------------------------------------------------------------- landmark_nme

def test_300w_inter_ocular():
    gt = random_gt(68)
    gt[0, 36], gt[0, 45] = (100, 200), (200, 200)  # outer eye corners 100 px apart
    pred = gt + (3, 4)  # every point off by sqrt(9 + 16) = 5 px
    assert landmark_nme(pred, gt, "inter_ocular") == pytest.approx([5 / 100])  # 0.05


def test_nme_is_the_mean_over_points():
    gt = random_gt(68)
    gt[0, 36], gt[0, 45] = (100, 200), (200, 200)  # d = 100
    pred = gt.copy()
    pred[0, 0, 1] += 68  # one point off by 68 px, the other 67 exact: mean error 68 / 68 = 1 px
    assert landmark_nme(pred, gt, "inter_ocular") == pytest.approx([1 / 100])


def test_300w_inter_pupil_per_sample():
    # Rings of six points whose offsets sum to zero: the pupils are the ring centres.
    ring = np.array([(-10, 0), (10, 0), (-5, -7), (5, 7), (0, 3), (0, -3)], dtype=float)
    gt = random_gt(68, num_samples=2)
    gt[0, 36:42] = (150, 200) + ring  # left pupil (150, 200)
    gt[0, 42:48] = (250, 200) + ring  # right pupil (250, 200): d = 100
    gt[1, 36:48] = 2 * gt[0, 36:48]  # pupils (300, 400) and (500, 400): d = 200
    pred = gt + (6, 8)  # error 10 px everywhere
    # 10 / 100 = 0.1 and 10 / 200 = 0.05. (Corners p36 = (140, 200), p45 = (255, 207) would give
    # d = sqrt(115^2 + 7^2) = 115.2, i.e. another value, for the first sample.)
    assert landmark_nme(pred, gt, "inter_pupil") == pytest.approx([0.1, 0.05])
    assert landmark_nme(pred, gt, "inter_ocular")[0] == pytest.approx(10 / math.hypot(115, 7))


def test_wflw_indices():
    gt = random_gt(98)
    gt[0, 60], gt[0, 72] = (100, 100), (160, 180)  # ||(60, 80)|| = 100
    gt[0, 96], gt[0, 97] = (130, 140), (130, 190)  # ||(0, 50)|| = 50
    pred = gt + (0, 5)  # error 5 px
    assert landmark_nme(pred, gt, "inter_ocular") == pytest.approx([5 / 100])  # 0.05
    assert landmark_nme(pred, gt, "inter_pupil") == pytest.approx([5 / 50])  # 0.1


def test_aflw19_indices():
    gt = random_gt(19)
    gt[0, 6], gt[0, 11] = (10, 10), (40, 50)  # ||(30, 40)|| = 50
    gt[0, 7], gt[0, 10] = (20, 20), (44, 27)  # ||(24, 7)|| = 25
    pred = gt + (3, 4)  # error 5 px
    assert landmark_nme(pred, gt, "inter_ocular") == pytest.approx([5 / 50])  # 0.1
    assert landmark_nme(pred, gt, "inter_pupil") == pytest.approx([5 / 25])  # 0.2


def test_box_and_diag():
    gt = random_gt(19)
    boxes = np.array([[10, 20, 40, 60]])  # w = 30, h = 40
    pred = gt + (3, 4)  # error 5 px
    assert landmark_nme(pred, gt, "box", boxes) == pytest.approx([5 / math.sqrt(30 * 40)])  # 5 / 34.64
    assert landmark_nme(pred, gt, "diag", boxes) == pytest.approx([5 / 50])  # sqrt(900 + 1600) = 50
    # box and diag do not depend on K
    assert landmark_nme(pred[:, :5], gt[:, :5], "diag", boxes) == pytest.approx([0.1])


@pytest.mark.parametrize("args, message", [
    ((random_gt(5), random_gt(5), "inter_ocular"), "K=5"),
    ((random_gt(68), random_gt(68), "inter_pupil_x"), "normalize must be one of"),
    ((random_gt(68), random_gt(98), "inter_ocular"), "pred and gt must both be"),
    ((np.zeros((1, 68, 3)), np.zeros((1, 68, 3)), "inter_ocular"), "pred and gt must both be"),
    ((np.zeros((68, 2)), np.zeros((68, 2)), "inter_ocular"), "pred and gt must both be"),
    ((random_gt(19), random_gt(19), "box"), "needs the ground-truth boxes"),
    ((random_gt(19), random_gt(19), "diag", np.zeros((2, 4))), r"boxes must be \(1, 4\)"),
    ((random_gt(19), random_gt(19), "box", np.array([[10, 10, 10, 50]])), "must be positive"),
    ((np.zeros((1, 68, 2)), np.zeros((1, 68, 2)), "inter_ocular"), "must be positive"),
])
def test_nme_errors(args, message):
    with pytest.raises(ValueError, match=message):
        landmark_nme(*args)


# ---------------------------------------------------------------- auc_fr

def test_auc_fr_step_function():
    # CED = 1/3 on [0, 0.05), 2/3 on [0.05, 0.1]; 0.2 > 0.1 fails.
    # AUC = (1/3 * 0.05 + 2/3 * 0.05) / 0.1 = 0.5; Simpson on the 1e-4 grid is off by at most
    # about one step at the jump: 4/3 * 1e-4 * 1/3 / 0.1 = 4.4e-4.
    auc, fr = auc_fr(np.array([0.0, 0.05, 0.2]), 0.1)
    assert fr == pytest.approx(1 / 3)
    assert auc == pytest.approx(0.5, abs=5e-4)


def test_auc_fr_is_simpson():
    # Grid 0, 0.05, 0.1 with CED 0, 1, 1: Simpson = 0.05 / 3 * (0 + 4 * 1 + 1) = 0.08333, / 0.1 = 0.8333.
    # (The trapezoid rule would give (0.025 + 0.05) / 0.1 = 0.75.)
    auc, fr = auc_fr([0.04], 0.1, step=0.05)
    assert auc == pytest.approx(5 / 6)
    assert fr == 0


def test_auc_fr_extremes():
    auc, fr = auc_fr(np.zeros(10), 0.07)  # CED = 1 everywhere: Simpson of a constant is exact
    assert auc == pytest.approx(1.0, abs=1e-12) and fr == 0
    auc, fr = auc_fr([0.5, 0.2], 0.1)  # CED = 0 everywhere
    assert auc == 0 and fr == 1


def test_auc_fr_threshold_is_on_the_grid():
    # 0.07 / 1e-4 = 700.0000000000001 in floats; the grid still ends exactly at 0.07, where an NME of
    # exactly 0.07 counts as success (NME <= T): FR 0, and CED is 1 only at the last grid point.
    auc, fr = auc_fr([0.07], 0.07)
    assert fr == 0
    assert 0 < auc < 1e-3


@pytest.mark.parametrize("nmes, threshold, step", [
    ([], 0.1, 1e-4), ([[0.1]], 0.1, 1e-4), ([0.1, float("nan")], 0.1, 1e-4),
    ([0.1], 0.1, 0.2), ([0.1], 0.0, 1e-4), ([0.1], 0.1, 0.0),
])
def test_auc_fr_errors(nmes, threshold, step):
    with pytest.raises(ValueError):
        auc_fr(nmes, threshold, step)


# ---------------------------------------------------------------- parsing_f1

def test_parsing_f1_by_hand():
    confusion = np.array([[50, 3, 2],
                          [4, 20, 6],
                          [1, 5, 9]])
    # actual (row sums) 55, 30, 15; predicted (column sums) 55, 28, 17
    # F1: 100 / 110, 40 / 58, 18 / 32; mean over classes 1 and 2 only: (40/58 + 18/32) / 2 = 0.62608
    per_class, mean = parsing_f1(confusion)
    assert per_class == pytest.approx([100 / 110, 40 / 58, 18 / 32])
    assert mean == pytest.approx((40 / 58 + 18 / 32) / 2)


def test_parsing_f1_absent_classes():
    confusion = np.array([[10, 0, 0, 0],
                          [0, 6, 2, 0],
                          [0, 2, 0, 0],
                          [0, 0, 0, 0]])
    # class 1: 12 / (8 + 8) = 0.75; class 2 occurs but is never right: 0 / (2 + 2) = 0, counted;
    # class 3 never occurs nor is predicted: 0/0 = nan, left out. Mean = (0.75 + 0) / 2 = 0.375.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_class, mean = parsing_f1(confusion)
        assert per_class[:3] == pytest.approx([1.0, 0.75, 0.0]) and np.isnan(per_class[3])
        assert mean == pytest.approx(0.375)
        assert math.isnan(parsing_f1(np.array([[5, 0], [0, 0]]))[1])  # only background: nan, no warning


@pytest.mark.parametrize("confusion", [np.zeros((2, 3)), np.zeros(4), np.array([[1, -1], [0, 1]])])
def test_parsing_f1_errors(confusion):
    with pytest.raises(ValueError, match="square"):
        parsing_f1(confusion)


# ---------------------------------------------------------------- ConfusionAccumulator

def test_accumulator_by_hand():
    acc = ConfusionAccumulator(3)
    acc.update(np.array([[0, 1], [1, 2]]), np.array([[0, 1], [2, 2]]))  # (pred, target)
    # (target, pred) pairs: (0, 0), (1, 1), (2, 1), (2, 2)
    assert acc.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert acc.confusion.dtype == np.int64


def random_batch(seed: int, shape=(2, 8, 9), num_classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_classes, shape), rng.integers(0, num_classes, shape)


def test_accumulator_batches_equal_one_confusion():
    (p1, t1), (p2, t2) = random_batch(1), random_batch(2)
    acc = ConfusionAccumulator(5)
    acc.update(p1, t1)
    acc.update(p2, t2)
    expected = np.zeros((5, 5), dtype=np.int64)
    np.add.at(expected, (np.concatenate([t1, t2]).ravel(), np.concatenate([p1, p2]).ravel()), 1)
    assert (acc.confusion == expected).all() and expected.sum() == 2 * p1.size
    per_class, mean = acc.result()
    expected_f1, expected_mean = parsing_f1(expected)
    assert per_class == pytest.approx(expected_f1) and mean == pytest.approx(expected_mean)


def test_accumulator_torch_numpy_and_mixed_agree():
    pred, target = random_batch(3)
    counts = []
    for p, t in [(pred, target), (torch.from_numpy(pred), torch.from_numpy(target)),
                 (torch.from_numpy(pred).to(torch.uint8), target.astype(np.uint8))]:
        acc = ConfusionAccumulator(5)
        acc.update(p, t)
        counts.append(acc.confusion)
    assert all((c == counts[0]).all() for c in counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accumulator_cuda():
    pred, target = random_batch(4)
    cpu, cuda = ConfusionAccumulator(5), ConfusionAccumulator(5)
    cpu.update(pred, target)
    cuda.update(torch.from_numpy(pred).cuda(), torch.from_numpy(target).cuda())
    assert (cpu.confusion == cuda.confusion).all()


@pytest.mark.parametrize("to_input", [np.asarray, torch.as_tensor])
def test_accumulator_ignore_index(to_input):
    acc = ConfusionAccumulator(3, ignore_index=255)
    pred = to_input(np.array([[0, 7], [2, 1]]))  # 7 sits on an ignored pixel: no range error
    target = to_input(np.array([[0, 255], [2, 255]]))
    acc.update(pred, target)
    assert acc.confusion.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]  # only (0, 0) and (2, 2)


def test_accumulator_reset_and_copy():
    acc = ConfusionAccumulator(5)
    acc.update(*random_batch(5))
    acc.confusion[:] = 0  # the property is a copy
    assert acc.confusion.sum() == 2 * 8 * 9
    acc.reset()
    assert acc.confusion.sum() == 0


@pytest.mark.parametrize("pred, target, message", [
    (np.zeros((2, 3), int), np.zeros((3, 2), int), "same shape"),
    (np.full((2, 2), 3), np.zeros((2, 2), int), r"\[0, 3\)"),
    (np.zeros((2, 2), int), np.full((2, 2), -1), r"\[0, 3\)"),
])
def test_accumulator_errors(pred, target, message):
    with pytest.raises(ValueError, match=message):
        ConfusionAccumulator(3).update(pred, target)
