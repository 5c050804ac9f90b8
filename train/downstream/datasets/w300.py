"""300W (68 landmarks), the common protocol, read from the iBUG .pts releases.

On disk (``root`` = the folder holding the unzipped lfpw/helen/afw/ibug archives)::

    lfpw/trainset/*.png + *.pts    811     helen/trainset/*.jpg + *.pts   2000
    lfpw/testset/*.png + *.pts     224     helen/testset/*.jpg + *.pts     330
    afw/*.jpg + *.pts              337     ibug/*.jpg + *.pts              135

Every image has a ``.pts`` file of the same stem (one face per pts file; the image is found
by extension .jpg/.png/.jpeg)::

    version: 1
    n_points:  68
    {
    x y        (68 lines)
    }

Splits: train = lfpw train + helen train + afw (3148); test = common (lfpw test + helen test,
554) followed by challenge (ibug, 135); ``subsets()`` of test gives "common", "challenge" and
"full" (all 689).

Coordinates: .pts points are 1-based (menpo's importer, the de-facto reference, subtracts 1),
so 1 is subtracted to get 0-based pixels.

Box (FaRL / HRNet): center = middle of the landmarks' bounding box, scale = max(w, h) / 200
(how HRNet's face_landmarks_300w_*.csv define center/scale, which FaRL reads), box = center
+- 100 * scale * ``box_enlarge``. FaRL crops center +- 100 * scale (enlarge 1); HRNet's own
loader multiplies scale by 1.25 - set ``box_enlarge = 1.25`` for that.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .common import (DatasetError, FaceDataset, MissingFileError, box_from_center_scale,
                     center_scale_from_points, parse_floats, read_lines, read_rgb, require_dir)

NUM_POINTS = 68
TRAIN_FOLDERS = ("lfpw/trainset", "helen/trainset", "afw")
COMMON_FOLDERS = ("lfpw/testset", "helen/testset")
CHALLENGE_FOLDERS = ("ibug",)
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
PTS_OFFSET = 1.0  # .pts coordinates are 1-based


def read_pts(path: str, num_points: int = NUM_POINTS) -> np.ndarray:
    """Parse a version-1 .pts file -> float32 (K, 2) as written (1-based)."""
    lines = read_lines(path)
    header: dict[str, str] = {}
    points: list[list[float]] = []
    state = "header"
    for number, raw in lines:
        line = raw.strip()
        if not line:
            continue
        if state == "header":
            if line == "{":
                state = "points"
            elif ":" in line:
                key, value = line.split(":", 1)
                header[key.strip()] = value.strip()
            else:
                raise DatasetError(f"{path}:{number}: expected 'key: value' or '{{', got {line!r}")
        elif state == "points":
            if line == "}":
                state = "done"
                continue
            fields = line.split()
            if len(fields) != 2:
                raise DatasetError(f"{path}:{number}: expected 'x y', got {line!r}")
            points.append(parse_floats(fields, f"{path}:{number}"))
        else:
            raise DatasetError(f"{path}:{number}: unexpected text after '}}': {line!r}")
    if state != "done":
        raise DatasetError(f"{path}: missing {'{' if state == 'header' else '}'} (truncated .pts file?)")
    declared = header.get("n_points")
    if declared is None or not declared.isdigit():
        raise DatasetError(f"{path}: missing or bad 'n_points:' header ({declared!r})")
    if int(declared) != len(points):
        raise DatasetError(f"{path}: n_points says {declared} but {len(points)} points are listed")
    if len(points) != num_points:
        raise DatasetError(f"{path}: expected {num_points} points, found {len(points)}")
    return np.asarray(points, dtype=np.float32)


def _scan(root: str, folder: str) -> list[tuple[str, np.ndarray]]:
    """(image path, 0-based landmarks) for every .pts file of one folder, sorted by name."""
    path = require_dir(os.path.join(root, folder), "300W folder")
    names = sorted(os.listdir(path))
    present = set(names)
    stems = [n[:-4] for n in names if n.endswith(".pts")]
    if not stems:
        raise DatasetError(f"no .pts files in {path}")
    samples = []
    for stem in stems:
        image = next((stem + ext for ext in IMAGE_EXTENSIONS if stem + ext in present), None)
        if image is None:
            raise MissingFileError(f"missing image for {os.path.join(path, stem + '.pts')} "
                                   f"(looked for {stem}.jpg/.png/.jpeg)")
        points = read_pts(os.path.join(path, stem + ".pts")) - PTS_OFFSET
        samples.append((os.path.join(path, image), points))
    return samples


class W300(FaceDataset):
    """300W; items: image, landmarks (68, 2), box, center (2,), scale."""

    name = "300W"
    task = "alignment"
    splits = ("train", "test")
    num_points = NUM_POINTS
    box_enlarge: float = 1.0

    def __init__(self, root: str, split: str) -> None:
        super().__init__(root, split)
        groups = {"train": TRAIN_FOLDERS} if split == "train" else {
            "common": COMMON_FOLDERS, "challenge": CHALLENGE_FOLDERS}
        self._subsets: dict[str, np.ndarray] = {}
        for subset, folders in groups.items():
            start = len(self.samples)
            for folder in folders:
                self.samples.extend(_scan(self.root, folder))
            self._subsets[subset] = np.arange(start, len(self.samples), dtype=np.int64)

    def subsets(self) -> dict[str, np.ndarray]:
        """train: {"full"}; test: {"common", "challenge", "full"}."""
        if self.split == "train":
            return super().subsets()
        return {**self._subsets, "full": np.arange(len(self), dtype=np.int64)}

    def _load(self, sample: tuple[str, np.ndarray]) -> dict[str, Any]:
        image_path, landmarks = sample
        center, scale = center_scale_from_points(landmarks)
        return {"image": read_rgb(image_path), "landmarks": landmarks.copy(),
                "box": box_from_center_scale(center, scale, self.box_enlarge),
                "center": center, "scale": np.float32(scale), "path": image_path}
