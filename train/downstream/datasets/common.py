"""Shared pieces of the downstream face datasets (``train/downstream/datasets/``).

Conventions every loader follows:

- annotations are parsed and checked in ``__init__``; images and label maps are decoded
  lazily (PIL) in ``__getitem__``;
- ``"image"`` is uint8 (H, W, 3) RGB at the file's own size (no resizing, no cropping:
  that belongs to the transforms); ``"path"`` is the image file;
- landmarks are float32 (K, 2), (x, y) in 0-based pixel coordinates of that image;
  ``"box"`` is float32 (x1, y1, x2, y2) per the dataset's protocol;
- every problem with the files raises :class:`DatasetError` (a ``ValueError``) whose message
  names the file, and the line for text annotations; a file or folder that does not exist
  raises :class:`MissingFileError`, which is also a ``FileNotFoundError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image


class DatasetError(ValueError):
    """A dataset file is malformed (or missing); the message names the file and line."""


class MissingFileError(DatasetError, FileNotFoundError):
    """A file or folder the dataset needs does not exist."""


def require_dir(path: str, what: str = "folder") -> str:
    """Return ``path`` if it is a directory, else raise :class:`MissingFileError`."""
    if not os.path.isdir(path):
        raise MissingFileError(f"missing {what}: {path}")
    return path


def require_file(path: str, what: str = "file") -> str:
    """Return ``path`` if it is a file, else raise :class:`MissingFileError`."""
    if not os.path.isfile(path):
        raise MissingFileError(f"missing {what}: {path}")
    return path


def find_missing(paths: Iterable[str]) -> list[str]:
    """The paths that do not exist; each parent folder is listed once (fast for 10^4 files)."""
    listings: dict[str, set[str]] = {}
    missing = []
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder or "."))
            except OSError:
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append(path)
    return missing


def require_files(paths: Iterable[str], what: str) -> None:
    """Raise :class:`MissingFileError` naming the first missing path (and how many are missing)."""
    missing = find_missing(paths)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingFileError(f"missing {what}: {missing[0]}{more}")


def read_lines(path: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of a text annotation file; undecodable bytes name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return list(enumerate(f, 1))
    except FileNotFoundError:
        raise MissingFileError(f"missing annotation file: {path}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a text file ({exc})") from None


def _open(path: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise MissingFileError(f"missing image file: {path}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot decode image file {path}: {exc}") from None


def read_rgb(path: str) -> np.ndarray:
    """Decode an image file to uint8 (H, W, 3) RGB."""
    with _open(path) as image:
        return np.array(image.convert("RGB"), dtype=np.uint8)


def read_index_map(path: str) -> np.ndarray:
    """Decode a label/mask PNG to its raw per-pixel values (H, W).

    Palette images give their indices (not luminance); an RGB(A) file gives its first channel,
    which is how label maps saved with three equal channels are read by the reference code.
    """
    with _open(path) as image:
        if image.mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
            array = np.array(image)
        else:
            array = np.array(image.convert("RGB"))[..., 0]
    return array


def parse_floats(tokens: Sequence[str], where: str) -> list[float]:
    """Parse numbers; ``where`` ("file:line") goes into the error message."""
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        raise DatasetError(f"{where}: expected numbers, got {' '.join(tokens)[:120]!r}") from None
    if not all(np.isfinite(values)):
        raise DatasetError(f"{where}: non-finite number in {' '.join(tokens)[:120]!r}")
    return values


def center_scale_from_points(points: np.ndarray) -> tuple[np.ndarray, float]:
    """HRNet-style center and scale of a landmark set.

    center = the middle of the points' bounding box; scale = max(width, height) / 200, so that
    the square center +- 100 * scale just contains the points.
    """
    low, high = points.min(axis=0), points.max(axis=0)
    center = ((low + high) / 2).astype(np.float32)
    return center, float((high - low).max() / 200.0)


def box_from_center_scale(center: np.ndarray, scale: float, enlarge: float = 1.0) -> np.ndarray:
    """Crop box (x1, y1, x2, y2) = center +- 100 * scale * enlarge (FaRL: enlarge 1)."""
    half = 100.0 * scale * enlarge
    cx, cy = float(center[0]), float(center[1])
    return np.array([cx - half, cy - half, cx + half, cy + half], dtype=np.float32)


class FaceDataset:
    """Base of the loaders: split check, indexing, default subsets.

    Subclasses set ``task``, ``splits`` and ``self.samples`` (one entry per sample, in order)
    and implement ``_load(sample) -> dict``.
    """

    name: ClassVar[str] = ""
    task: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    path_field: ClassVar[int] = 0  # where a sample entry keeps its image path

    def __init__(self, root: str, split: str) -> None:
        if split not in self.splits:
            raise DatasetError(f"{self.name}: unknown split {split!r}; expected one of {self.splits}")
        self.root = os.fspath(root)
        self.split = split
        require_dir(self.root, f"{self.name} root folder")
        self.samples: list[Any] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"{self.name} {self.split}: index {index} out of range ({n} samples)")
        return self._load(self.samples[index])

    def _load(self, sample: Any) -> dict[str, Any]:
        raise NotImplementedError

    def image_path(self, index: int) -> str:
        """The image file of a sample, without reading it (several faces can share one image)."""
        return self.samples[index][self.path_field]

    def subsets(self) -> dict[str, np.ndarray]:
        """Indices of the evaluation subsets of this split (default: only ``"full"``)."""
        return {"full": np.arange(len(self), dtype=np.int64)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, n={len(self)})"
