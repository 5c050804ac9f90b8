"""WFLW (98 landmarks) read from its official annotation lists.

On disk (``root`` = the folder holding both official archives, unpacked)::

    WFLW_images/{event folder}/{name}.jpg
    WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_{train,test}.txt

Each annotation line holds 207 whitespace-separated fields::

    x0 y0 ... x97 y97                     196 numbers, the 98 points (0-based pixels)
    x_min y_min x_max y_max               the face rectangle
    pose expression illumination make-up occlusion blur     six 0/1 flags
    image path                            relative to WFLW_images/

7500 train and 2500 test faces (several faces can share an image). Test subsets: "full" and
one per attribute flag ("pose", "expression", "illumination", "makeup", "occlusion", "blur";
HRNet's csv names the first "largepose").

Box (FaRL / HRNet): center/scale from the 98 landmarks' bounding box (center = its middle,
scale = max(w, h) / 200, as HRNet's face_landmarks_wflw_*.csv that FaRL reads), box =
center +- 100 * scale * ``box_enlarge`` (FaRL: 1; HRNet's loader: 1.25). The annotated
rectangle is returned as ``"rect"``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .common import (DatasetError, FaceDataset, MissingFileError, box_from_center_scale,
                     center_scale_from_points, parse_floats, read_lines, read_rgb, require_dir,
                     require_files)

NUM_POINTS = 98
ATTRIBUTES: tuple[str, ...] = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
FIELDS = 2 * NUM_POINTS + 4 + len(ATTRIBUTES) + 1
ANNOTATION_DIR = os.path.join("WFLW_annotations", "list_98pt_rect_attr_train_test")


def read_annotations(path: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """Parse a ``list_98pt_rect_attr_*.txt`` -> [(points (98, 2), rect (4,), attrs (6,), rel path)]."""
    records = []
    for number, line in read_lines(path):
        if not line.strip():
            continue
        fields = line.split(maxsplit=FIELDS - 1)
        where = f"{path}:{number}"
        if len(fields) != FIELDS:
            raise DatasetError(f"{where}: expected {FIELDS} fields (196 coordinates, 4 box, "
                               f"6 attributes, image path), got {len(fields)}")
        numbers = parse_floats(fields[: 2 * NUM_POINTS + 4], where)
        flags = fields[2 * NUM_POINTS + 4: FIELDS - 1]
        if any(flag not in ("0", "1") for flag in flags):
            raise DatasetError(f"{where}: attribute flags must be 0 or 1, got {' '.join(flags)!r}")
        image = fields[-1].strip()
        if os.path.isabs(image) or ".." in image.split("/"):
            raise DatasetError(f"{where}: image path must be relative to WFLW_images/, got {image!r}")
        records.append((np.asarray(numbers[: 2 * NUM_POINTS], np.float32).reshape(NUM_POINTS, 2),
                        np.asarray(numbers[2 * NUM_POINTS:], np.float32),
                        np.asarray([int(flag) for flag in flags], np.uint8), image))
    if not records:
        raise DatasetError(f"{path}: no annotation lines")
    return records


class WFLW(FaceDataset):
    """WFLW; items: image, landmarks (98, 2), box, center, scale, rect (4,), attributes (6,)."""

    name = "WFLW"
    task = "alignment"
    splits = ("train", "test")
    num_points = NUM_POINTS
    attributes = ATTRIBUTES
    box_enlarge: float = 1.0

    def __init__(self, root: str, split: str) -> None:
        super().__init__(root, split)
        image_dir = require_dir(os.path.join(self.root, "WFLW_images"), "WFLW image folder")
        path = os.path.join(self.root, ANNOTATION_DIR, f"list_98pt_rect_attr_{split}.txt")
        if not os.path.isfile(path):
            raise MissingFileError(f"missing WFLW annotation file: {path}")
        self.samples = [(os.path.join(image_dir, rel), points, rect, attrs)
                        for points, rect, attrs, rel in read_annotations(path)]
        require_files([s[0] for s in self.samples], f"WFLW image (listed in {path})")

    def subsets(self) -> dict[str, np.ndarray]:
        """train: {"full"}; test: "full" plus one subset per attribute flag."""
        result = super().subsets()
        if self.split == "test":
            flags = np.stack([s[3] for s in self.samples])
            for column, attribute in enumerate(ATTRIBUTES):
                result[attribute] = np.flatnonzero(flags[:, column]).astype(np.int64)
        return result

    def _load(self, sample: tuple[str, np.ndarray, np.ndarray, np.ndarray]) -> dict[str, Any]:
        image_path, landmarks, rect, attrs = sample
        center, scale = center_scale_from_points(landmarks)
        return {"image": read_rgb(image_path), "landmarks": landmarks.copy(),
                "box": box_from_center_scale(center, scale, self.box_enlarge),
                "center": center, "scale": np.float32(scale), "rect": rect.copy(),
                "attributes": attrs.copy(), "path": image_path}
