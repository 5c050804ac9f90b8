"""AFLW-19 (19 landmarks; Zhu et al., CVPR 2016) read from ``AFLWinfo_release.mat``.

On disk (``root`` as in FaRL's data guide)::

    AFLWinfo_release.mat      MATLAB v5 file (scipy.io.loadmat) with, for N = 24386 faces:
        data      N x 38   x1..x19 then y1..y19
        mask_new  N x 19   1 = visible, 0 = not
        bbox      N x 4    face box as x1 x2 y1 y2 (left right top bottom)
        ra        1 x N    a permutation of 1..N (1-based); its first 20000 are train, the rest test
        nameList  N x 1    cell array of image paths relative to data/flickr/
    data/flickr/{0,2,3}/image*.jpg     the original AFLW images

Protocol (FaRL's ``AFLW_19``, same as SAN/HRNet): train = ra[:20000], test = ra[20000:]
(4386), both in ``ra`` order; test subsets "full" and "frontal" (the test faces with all 19
points visible, 1314 of them); crop box = the given ``bbox``, returned as (x1, y1, x2, y2).

Coordinates: used exactly as stored, like FaRL, SAN and HRNet's AFLW lists (none of them
shifts them), so NME is comparable with published numbers; ``COORD_OFFSET`` is subtracted
from points and box alike if a 1-based convention is ever wanted.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .common import DatasetError, FaceDataset, MissingFileError, read_rgb, require_files

NUM_POINTS = 19
NUM_TRAIN = 20000
COORD_OFFSET = 0.0
MAT_NAME = "AFLWinfo_release.mat"
IMAGE_DIR = os.path.join("data", "flickr")
_FIELDS = ("data", "mask_new", "bbox", "ra", "nameList")


def read_info(path: str) -> dict[str, Any]:
    """Load and check the .mat -> points (N, 19, 2), visible (N, 19), box (N, 4), order (N,), names."""
    import scipy.io  # a dependency only of this loader

    if not os.path.isfile(path):
        raise MissingFileError(f"missing AFLW-19 annotation file: {path}")
    try:
        info = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises ValueError, TypeError, NotImplementedError (v7.3), ...
        raise DatasetError(f"cannot read {path} as a MATLAB v5 .mat file: {exc}") from None
    absent = [key for key in _FIELDS if key not in info]
    if absent:
        raise DatasetError(f"{path}: missing variable(s) {', '.join(absent)}")
    try:
        data, mask = np.asarray(info["data"], np.float64), np.asarray(info["mask_new"], np.float64)
        bbox, ra = np.asarray(info["bbox"], np.float64), np.asarray(info["ra"], np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: non-numeric data/mask_new/bbox/ra: {exc}") from None
    n = data.shape[0] if data.ndim == 2 else -1
    expected = {"data": (data, (n, 2 * NUM_POINTS)), "mask_new": (mask, (n, NUM_POINTS)), "bbox": (bbox, (n, 4))}
    for key, (array, shape) in expected.items():
        if n <= 0 or array.shape != shape:
            raise DatasetError(f"{path}: {key} has shape {array.shape}, expected N x {shape[1]} with N = {n}")
    for key, array in (("data", data), ("bbox", bbox), ("mask_new", mask)):
        if not np.isfinite(array).all():
            raise DatasetError(f"{path}: {key} holds non-finite values (row {np.flatnonzero(~np.isfinite(array).all(1))[0] + 1})")
    if not np.isin(mask, (0, 1)).all():
        raise DatasetError(f"{path}: mask_new must hold only 0 and 1")
    if ra.shape != (n,) or not np.array_equal(np.sort(ra), np.arange(1, n + 1)):
        raise DatasetError(f"{path}: ra must be a permutation of 1..{n} (1-based), got {ra.size} values")
    raw_names = np.ravel(info["nameList"])
    if raw_names.size != n:
        raise DatasetError(f"{path}: nameList has {raw_names.size} entries, expected {n}")
    names = []
    for row, entry in enumerate(raw_names, 1):
        value = np.ravel(entry)
        if value.size != 1 or not isinstance(value[0], str) or not value[0]:
            raise DatasetError(f"{path}: nameList entry {row} is not an image path string: {entry!r}")
        names.append(value[0])
    points = np.stack([data[:, :NUM_POINTS], data[:, NUM_POINTS:]], axis=-1) - COORD_OFFSET
    boxes = bbox[:, [0, 2, 1, 3]] - COORD_OFFSET  # x1 x2 y1 y2 -> x1 y1 x2 y2
    return {"points": points.astype(np.float32), "visible": mask != 0, "boxes": boxes.astype(np.float32),
            "order": ra.astype(np.int64) - 1, "names": names}


class AFLW19(FaceDataset):
    """AFLW-19; items: image, landmarks (19, 2), visible (19,) bool, box (the given bbox)."""

    name = "AFLW-19"
    task = "alignment"
    path_field = 1
    splits = ("train", "test")
    num_points = NUM_POINTS

    def __init__(self, root: str, split: str, *, num_train: int = NUM_TRAIN) -> None:
        """``num_train`` is the protocol's 20000; other values are for toy data only."""
        super().__init__(root, split)
        info = read_info(os.path.join(self.root, MAT_NAME))
        order = info["order"]
        if not 0 < num_train < len(order):
            raise DatasetError(f"{os.path.join(self.root, MAT_NAME)}: {len(order)} faces, "
                               f"but the protocol takes the first {num_train} of ra for training")
        rows = order[:num_train] if split == "train" else order[num_train:]
        image_dir = os.path.join(self.root, IMAGE_DIR)
        self.samples = [(int(r), os.path.join(image_dir, info["names"][r]), info["points"][r],
                         info["visible"][r], info["boxes"][r]) for r in rows]
        require_files([s[1] for s in self.samples], f"AFLW image (listed in {MAT_NAME})")

    def subsets(self) -> dict[str, np.ndarray]:
        """train: {"full"}; test: {"full", "frontal" (all 19 points visible)}."""
        result = super().subsets()
        if self.split == "test":
            frontal = [i for i, s in enumerate(self.samples) if s[3].all()]
            result["frontal"] = np.asarray(frontal, dtype=np.int64)
        return result

    def _load(self, sample: tuple[int, str, np.ndarray, np.ndarray, np.ndarray]) -> dict[str, Any]:
        row, image_path, points, visible, box = sample
        return {"image": read_rgb(image_path), "landmarks": points.copy(), "visible": visible.copy(),
                "box": box.copy(), "path": image_path, "mat_row": row}
