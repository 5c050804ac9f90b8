"""LaPa face parsing (11 labels, 106 landmarks) read from its official release.

On disk (``root`` = the unpacked ``LaPa`` folder)::

    {train,val,test}/images/{name}.jpg       18176 / 2000 / 2000 images, various sizes
    {train,val,test}/labels/{name}.png       label map, same size as the image, values 0..10
    {train,val,test}/landmarks/{name}.txt    first line "106", then 106 lines "x y"

Labels (LaPa's README): 0 background, 1 skin, 2 left eyebrow, 3 right eyebrow, 4 left eye,
5 right eye, 6 nose, 7 upper lip, 8 inner mouth, 9 lower lip, 10 hair.

Protocol (FaRL): faces are aligned with the ground-truth landmarks and tanh-warped to 512;
that is the transforms' job, so items carry the raw image, label map and the 106 landmarks
(used as given, pixel coordinates of the image; FaRL reads them unchanged).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .common import (DatasetError, FaceDataset, MissingFileError, parse_floats, read_index_map,
                     read_lines, read_rgb, require_dir)

LABELS: tuple[str, ...] = (
    "background", "skin", "left_eyebrow", "right_eyebrow", "left_eye", "right_eye", "nose",
    "upper_lip", "inner_mouth", "lower_lip", "hair")
NUM_POINTS = 106


def read_landmarks(path: str, num_points: int = NUM_POINTS) -> np.ndarray:
    """A LaPa landmark file: the count, then one "x y" line per point -> float32 (K, 2)."""
    lines = [(number, line.split()) for number, line in read_lines(path) if line.strip()]
    if not lines:
        raise DatasetError(f"{path}: empty landmark file")
    number, first = lines[0]
    if len(first) != 1 or first[0] != str(num_points):
        raise DatasetError(f"{path}:{number}: expected the point count '{num_points}', got {' '.join(first)!r}")
    rows = lines[1:]
    if len(rows) != num_points:
        raise DatasetError(f"{path}: expected {num_points} 'x y' lines after the count, found {len(rows)}")
    points = []
    for number, fields in rows:
        if len(fields) != 2:
            raise DatasetError(f"{path}:{number}: expected 'x y', got {' '.join(fields)!r}")
        points.append(parse_floats(fields, f"{path}:{number}"))
    return np.asarray(points, dtype=np.float32)


class LaPa(FaceDataset):
    """LaPa; items: image (H, W, 3), label (H, W) uint8 in :data:`LABELS`, landmarks (106, 2)."""

    name = "LaPa"
    task = "parsing"
    splits = ("train", "val", "test")
    labels = LABELS
    num_points = NUM_POINTS

    def __init__(self, root: str, split: str) -> None:
        super().__init__(root, split)
        base = require_dir(os.path.join(self.root, split), f"LaPa {split} folder")
        image_dir = require_dir(os.path.join(base, "images"), "LaPa image folder")
        label_dir = require_dir(os.path.join(base, "labels"), "LaPa label folder")
        landmark_dir = require_dir(os.path.join(base, "landmarks"), "LaPa landmark folder")
        names = sorted(n[:-4] for n in os.listdir(image_dir) if n.lower().endswith(".jpg"))
        if not names:
            raise DatasetError(f"no .jpg images in {image_dir}")
        labels, landmark_files = set(os.listdir(label_dir)), set(os.listdir(landmark_dir))
        for name in names:
            if f"{name}.png" not in labels:
                raise MissingFileError(f"missing LaPa label map: {os.path.join(label_dir, name + '.png')}")
            if f"{name}.txt" not in landmark_files:
                raise MissingFileError(f"missing LaPa landmarks: {os.path.join(landmark_dir, name + '.txt')}")
        self.samples = [
            (os.path.join(image_dir, f"{name}.jpg"), os.path.join(label_dir, f"{name}.png"),
             read_landmarks(os.path.join(landmark_dir, f"{name}.txt")))
            for name in names]

    def _load(self, sample: tuple[str, str, np.ndarray]) -> dict[str, Any]:
        image_path, label_path, landmarks = sample
        image, label = read_rgb(image_path), read_index_map(label_path)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"label map {label_path} is {label.shape[1]}x{label.shape[0]}, "
                               f"image {image_path} is {image.shape[1]}x{image.shape[0]}")
        if label.size and int(label.max()) >= len(LABELS):
            raise DatasetError(f"label map {label_path} has value {int(label.max())} > {len(LABELS) - 1}")
        return {"image": image, "label": label.astype(np.uint8), "landmarks": landmarks.copy(),
                "path": image_path}
