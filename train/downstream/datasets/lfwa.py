"""LFWA face attributes: LFW's photos with the 40 CelebA attributes, as CelebA's authors released them.

On disk (``root`` = the folder holding LFWA's files)::

    lfw/NAME/NAME_0001.jpg        LFW's 250 x 250 photos (about 13,000 of them annotated)
    lfw_att_40.mat                name: the image paths below lfw/, written 'NAME\\NAME_0001.jpg';
                                  label: images x 40 of 0 / 1; AttrName: the 40 names (CelebA's)
    indices_train_test.mat        indices_img_train (6,263) and indices_img_test (the rest): 1-based
                                  rows of lfw_att_40.mat

The .mat files are MATLAB v7.3 (HDF5, read with h5py); a copy saved as an older MAT version is read
with scipy. LFWA has no validation split: fine-tuning holds one out of train (`--val-fraction`).
Items carry the whole photo (the transforms stretch it to the network's input) and ``attributes``,
float32 (40,) of 0 / 1.
"""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np
import scipy.io

from .celeba_attr import ATTRIBUTES, NUM_ATTRIBUTES
from .common import DatasetError, FaceDataset, read_rgb, require_dir, require_file, require_files

SPLIT_KEYS = {"train": "indices_img_train", "test": "indices_img_test"}


def _strings(file: h5py.File, refs: np.ndarray) -> list[str]:
    """A MATLAB cell array of char arrays (HDF5 object references to uint16 codes) as strings."""
    return ["".join(map(chr, np.asarray(file[ref]).ravel())) for ref in refs.ravel()]


def read_mat(path: str, names: tuple[str, ...]) -> dict[str, Any]:
    """Variables `names` of a MAT file (v7.3 or older): numbers as float arrays in MATLAB's orientation,
    cell arrays of text as lists of str. DatasetError naming the file when it is unreadable or lacks one."""
    require_file(path, "LFWA annotation file")
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                found = {}
                for name in (n for n in names if n in f):
                    data = np.asarray(f[name])
                    # MATLAB writes column-major: HDF5 holds the transpose
                    found[name] = _strings(f, data) if data.dtype == h5py.ref_dtype else data.T.astype(np.float64)
                return found
        data = scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError, KeyError, IndexError, scipy.io.matlab.MatReadError) as err:
        raise DatasetError(f"{path}: cannot be read as a MAT file ({err})") from None
    found = {}
    for name in (n for n in names if n in data):
        value = data[name]
        found[name] = ([str(np.asarray(cell).ravel()[0]) for cell in value.ravel()] if value.dtype == object
                       else value.astype(np.float64))
    return found


def read_labels(path: str) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """lfw_att_40.mat -> (attribute names, image paths with '/', labels float32 (images, 40) of 0 / 1)."""
    data = read_mat(path, ("name", "label", "AttrName"))
    for key in ("name", "label"):
        if key not in data:
            raise DatasetError(f"{path}: no '{key}' variable (expected name, label and AttrName)")
    files, labels = data["name"], data["label"]
    if isinstance(labels, list) or labels.ndim != 2 or NUM_ATTRIBUTES not in labels.shape:
        raise DatasetError(f"{path}: 'label' should be images x {NUM_ATTRIBUTES}, got {np.shape(labels)}")
    if labels.shape[1] != NUM_ATTRIBUTES:
        labels = labels.T
    if labels.shape[0] != len(files):
        raise DatasetError(f"{path}: 'label' has {labels.shape[0]} rows for {len(files)} image names")
    if not np.isin(labels, (0, 1)).all():
        raise DatasetError(f"{path}: 'label' should hold 0 and 1 only, found {np.setdiff1d(labels, (0, 1))[:3].tolist()}")
    names = tuple(data.get("AttrName") or ATTRIBUTES)
    if len(names) != NUM_ATTRIBUTES:
        raise DatasetError(f"{path}: 'AttrName' has {len(names)} names, expected {NUM_ATTRIBUTES}")
    return names, [f.replace("\\", "/") for f in files], labels.astype(np.float32)


def read_split(path: str, split: str, count: int) -> np.ndarray:
    """0-based rows of lfw_att_40.mat in `split`, from indices_train_test.mat's 1-based ones."""
    key = SPLIT_KEYS[split]
    data = read_mat(path, (key,))
    if key not in data or isinstance(data[key], list):
        raise DatasetError(f"{path}: no numeric '{key}' variable")
    indices = data[key].ravel()
    if not len(indices) or (indices != np.round(indices)).any() or indices.min() < 1 or indices.max() > count:
        raise DatasetError(f"{path}: '{key}' should be 1-based rows of the {count} annotated images")
    return indices.astype(np.int64) - 1


class LFWAttributes(FaceDataset):
    """LFWA's official train / test split; items: image (250, 250, 3), attributes (40,), path."""

    name = "LFWA"
    task = "attributes"
    splits = ("train", "test")

    def __init__(self, root: str, split: str) -> None:
        super().__init__(root, split)
        image_dir = require_dir(os.path.join(self.root, "lfw"), "LFWA image folder")
        self.attribute_names, files, labels = read_labels(os.path.join(self.root, "lfw_att_40.mat"))
        rows = read_split(os.path.join(self.root, "indices_train_test.mat"), split, len(files))
        self.samples = [(os.path.join(image_dir, files[row]), labels[row]) for row in rows]
        require_files((path for path, _ in self.samples), "LFWA image")

    def _load(self, sample: tuple[str, np.ndarray]) -> dict[str, Any]:
        path, attributes = sample
        return {"image": read_rgb(path), "attributes": attributes.copy(), "path": path}
