"""CelebAMask-HQ face parsing (19 labels) read from its official release.

On disk (``root`` = the unzipped ``CelebAMask-HQ`` folder, as FaRL's data guide has it)::

    CelebA-HQ-img/{idx}.jpg                          30000 images, 1024x1024, idx 0..29999
    CelebAMask-HQ-mask-anno/{idx // 2000}/{idx:05d}_{part}.png
                                                     one binary 512x512 mask per part present
    CelebA-HQ-to-CelebA-mapping.txt                  header "idx orig_idx orig_file",
                                                     then rows like "0 119613 119614.jpg"
    list_eval_partition.txt                          CelebA's own split file, rows "000001.jpg 0"
                                                     (0 train, 1 val, 2 test); also found at
                                                     Eval/list_eval_partition.txt as CelebA ships it

Protocol (FaRL's ``CelebAMaskHQ`` dataset, label_type "all"):

- split: an HQ image takes the split of its CelebA original (24183 / 2993 / 2824 images);
- label map: the masks' size (512x512) while the image stays 1024x1024; resizing the image to
  512 belongs to the transforms;
- merge: the part masks are painted in :data:`PART_FILES` order, value = position + 1, where
  ``mask > 0``; a later part overwrites an earlier one, so small parts win over skin and the
  accessories (glasses, hat, earring, necklace) win over everything;
- CelebAMask-HQ's ``l_``/``r_`` are the image's left/right, i.e. the person's right/left, so
  ``l_ear`` is label 4 "right_ear" (FaRL names it ``rr``), ``l_brow`` 6, ``l_eye`` 8.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from .common import (DatasetError, FaceDataset, MissingFileError, read_index_map, read_lines, read_rgb,
                     require_dir, require_files)

LABELS: tuple[str, ...] = (
    "background", "neck", "face", "cloth", "right_ear", "left_ear", "right_brow", "left_brow",
    "right_eye", "left_eye", "nose", "inner_mouth", "lower_lip", "upper_lip", "hair",
    "glasses", "hat", "earring", "necklace")
# Mask file suffix of label i + 1, in painting order.
PART_FILES: tuple[str, ...] = (
    "neck", "skin", "cloth", "l_ear", "r_ear", "l_brow", "r_brow", "l_eye", "r_eye", "nose",
    "mouth", "l_lip", "u_lip", "hair", "eye_g", "hat", "ear_r", "neck_l")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
IMAGES_PER_MASK_FOLDER = 2000
_MASK_NAME = re.compile(r"^(\d+)_([a-z_]+)\.png$")


def read_mapping(path: str) -> dict[int, str]:
    """``CelebA-HQ-to-CelebA-mapping.txt`` -> {HQ idx: CelebA file name}."""
    mapping: dict[int, str] = {}
    for number, line in read_lines(path):
        fields = line.split()
        if not fields or (number == 1 and fields[0] == "idx"):
            continue
        if len(fields) != 3 or not fields[0].isdigit() or not fields[1].isdigit():
            raise DatasetError(f"{path}:{number}: expected 'idx orig_idx orig_file', got {line.strip()!r}")
        if int(fields[0]) in mapping:
            raise DatasetError(f"{path}:{number}: HQ index {fields[0]} listed twice")
        mapping[int(fields[0])] = fields[2]
    if not mapping:
        raise DatasetError(f"{path}: no mapping rows")
    return mapping


def read_partition(path: str) -> dict[str, int]:
    """CelebA's ``list_eval_partition.txt`` -> {CelebA file name: 0 | 1 | 2}."""
    partition: dict[str, int] = {}
    for number, line in read_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DatasetError(f"{path}:{number}: expected '<file> 0|1|2', got {line.strip()!r}")
        partition[fields[0]] = int(fields[1])
    return partition


class CelebAMaskHQ(FaceDataset):
    """CelebAMask-HQ; items: image (1024, 1024, 3), label (512, 512) uint8 in :data:`LABELS`."""

    name = "CelebAMask-HQ"
    task = "parsing"
    path_field = 1
    splits = ("train", "val", "test")
    labels = LABELS

    def __init__(self, root: str, split: str) -> None:
        super().__init__(root, split)
        image_dir = require_dir(os.path.join(self.root, "CelebA-HQ-img"), "CelebAMask-HQ image folder")
        mask_dir = require_dir(os.path.join(self.root, "CelebAMask-HQ-mask-anno"), "CelebAMask-HQ mask folder")
        mapping_path = os.path.join(self.root, "CelebA-HQ-to-CelebA-mapping.txt")
        if not os.path.isfile(mapping_path):
            raise MissingFileError(f"missing CelebA-HQ mapping file: {mapping_path}")
        candidates = [os.path.join(self.root, "list_eval_partition.txt"),
                      os.path.join(self.root, "Eval", "list_eval_partition.txt")]
        partition_path = next((p for p in candidates if os.path.isfile(p)), None)
        if partition_path is None:
            raise MissingFileError(f"missing CelebA partition file: {candidates[0]} (or {candidates[1]})")

        mapping, partition = read_mapping(mapping_path), read_partition(partition_path)
        wanted = SPLIT_CODES[split]
        indices = []
        for idx, orig in sorted(mapping.items()):
            if orig not in partition:
                raise DatasetError(f"{partition_path}: no split for {orig} (HQ image {idx} in {mapping_path})")
            if partition[orig] == wanted:
                indices.append(idx)
        if not indices:
            raise DatasetError(f"CelebAMask-HQ: no images in split {split!r} ({partition_path})")
        images = [os.path.join(image_dir, f"{idx}.jpg") for idx in indices]
        require_files(images, "CelebA-HQ image")

        masks = self._index_masks(mask_dir, {idx // IMAGES_PER_MASK_FOLDER for idx in indices})
        for idx in indices:
            if idx not in masks:
                folder = os.path.join(mask_dir, str(idx // IMAGES_PER_MASK_FOLDER))
                raise MissingFileError(f"missing masks of image {idx}: no {idx:05d}_<part>.png in {folder}")
        self.samples = [(idx, path, masks[idx]) for idx, path in zip(indices, images)]

    @staticmethod
    def _index_masks(mask_dir: str, folders: set[int]) -> dict[int, dict[str, str]]:
        """{idx: {part: mask path}} from one listing per mask folder."""
        known = set(PART_FILES)
        masks: dict[int, dict[str, str]] = {}
        for folder in sorted(folders):
            path = os.path.join(mask_dir, str(folder))
            if not os.path.isdir(path):
                continue  # reported per image by the caller
            for name in os.listdir(path):
                match = _MASK_NAME.match(name)
                if match and match.group(2) in known:
                    idx = int(match.group(1))
                    if idx // IMAGES_PER_MASK_FOLDER == folder:
                        masks.setdefault(idx, {})[match.group(2)] = os.path.join(path, name)
        return masks

    def _load(self, sample: tuple[int, str, dict[str, str]]) -> dict[str, Any]:
        idx, image_path, parts = sample
        label: np.ndarray | None = None
        first = ""
        for value, part in enumerate(PART_FILES, 1):
            if part not in parts:
                continue
            mask = read_index_map(parts[part])
            if mask.ndim != 2:
                raise DatasetError(f"mask file {parts[part]} is not a single-channel image")
            if label is None:
                label, first = np.zeros(mask.shape, np.uint8), parts[part]
            elif mask.shape != label.shape:
                raise DatasetError(f"mask file {parts[part]} is {mask.shape[1]}x{mask.shape[0]}, "
                                   f"but {first} is {label.shape[1]}x{label.shape[0]}")
            label[mask > 0] = value
        assert label is not None  # every sample has at least one mask (checked in __init__)
        return {"image": read_rgb(image_path), "label": label, "path": image_path, "hq_index": idx}
