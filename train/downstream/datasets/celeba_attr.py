"""CelebA face attributes (40 binary attributes) read from its official release.

On disk (``root`` = the folder holding CelebA's files)::

    img_align_celeba/{000001..202599}.jpg    aligned and cropped faces, 178 x 218
    list_attr_celeba.txt                     line 1: the image count; line 2: the 40 attribute names;
                                             then "000001.jpg  -1  1 ..." (-1 / 1, runs of spaces)
    list_eval_partition.txt                  "000001.jpg 0": 0 train (162,770), 1 val (19,867), 2 test (19,962)

Items carry the image as given (the transforms stretch it to the network's square input, as the
aligned crops are meant to be used) and ``attributes``, float32 (40,) of 0 / 1.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .common import DatasetError, FaceDataset, read_lines, read_rgb, require_dir, require_files

PARTITIONS = {"train": "0", "val": "1", "test": "2"}
# line 2 of list_attr_celeba.txt (the reader takes the file's own names; these are for the fixtures)
ATTRIBUTES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
              "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
              "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
              "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
              "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
NUM_ATTRIBUTES = len(ATTRIBUTES)


def read_attributes(path: str) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """list_attr_celeba.txt (and LFWA's file in the same format) -> (names, {image file: 0/1 values})."""
    lines = [(number, line.split()) for number, line in read_lines(path) if line.strip()]
    if len(lines) < 2:
        raise DatasetError(f"{path}: expected the image count and the attribute names on lines 1 and 2")
    (count_line, count), (names_line, names) = lines[0], lines[1]
    if len(count) != 1 or not count[0].isdigit():
        raise DatasetError(f"{path}:{count_line}: expected the image count, got {' '.join(count)[:80]!r}")
    if len(names) != NUM_ATTRIBUTES:
        raise DatasetError(f"{path}:{names_line}: expected {NUM_ATTRIBUTES} attribute names, got {len(names)}")
    values: dict[str, np.ndarray] = {}
    for number, fields in lines[2:]:
        if len(fields) != NUM_ATTRIBUTES + 1 or any(v not in ("1", "-1") for v in fields[1:]):
            raise DatasetError(f"{path}:{number}: expected an image file and {NUM_ATTRIBUTES} values of 1 or -1, "
                               f"got {' '.join(fields)[:120]!r}")
        values[fields[0]] = (np.array(fields[1:]) == "1").astype(np.float32)
    if len(values) != int(count[0]):
        raise DatasetError(f"{path}: line 1 says {count[0]} images, the file lists {len(values)}")
    return tuple(names), values


class CelebAAttributes(FaceDataset):
    """CelebA's official split; items: image (218, 178, 3), attributes (40,), path."""

    name = "CelebA"
    task = "attributes"
    splits = ("train", "val", "test")

    def __init__(self, root: str, split: str) -> None:
        super().__init__(root, split)
        image_dir = require_dir(os.path.join(self.root, "img_align_celeba"), "CelebA image folder")
        self.attribute_names, values = read_attributes(os.path.join(self.root, "list_attr_celeba.txt"))
        partition = os.path.join(self.root, "list_eval_partition.txt")
        files = []
        for number, line in read_lines(partition):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DatasetError(f"{partition}:{number}: expected 'FILE 0|1|2', got {line.strip()[:80]!r}")
            if fields[1] == PARTITIONS[split]:
                if fields[0] not in values:
                    raise DatasetError(f"{partition}:{number}: {fields[0]} has no attributes in list_attr_celeba.txt")
                files.append(fields[0])
        if not files:
            raise DatasetError(f"{partition}: no image of the {split} split (partition {PARTITIONS[split]})")
        self.samples = [(os.path.join(image_dir, name), values[name]) for name in files]
        require_files((path for path, _ in self.samples), "CelebA image")

    def _load(self, sample: tuple[str, np.ndarray]) -> dict[str, Any]:
        path, attributes = sample
        return {"image": read_rgb(path), "attributes": attributes.copy(), "path": path}
