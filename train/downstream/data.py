"""Benchmark samples as network inputs, by FaRL's protocol (farl.md, "Downstream protocol").

Each sample gets a matrix from the original image to the warp_size x warp_size input:
- `resize` (CelebAMask-HQ): the whole image, stretched to the square;
- `five_points` (LaPa): a similarity onto the five-point template (landmarks 104, 105, 54, 84, 90);
- `box` (300W, WFLW, AFLW-19): the dataset's crop box, shrunk about the centre by the
  augmentation preset's scale_mu (0.8 for 300W and WFLW, at test time too, as FaRL does).
Training composes the protocol's random affine onto it and applies the photometric
augmentations; then the image (bilinear), the label map (nearest) and the landmarks follow the
same tanh-warp. Evaluation samples also carry what is needed to go back to the original image:
the matrix, the original label map, landmarks and box.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from train.downstream.augment import ALIGNMENT_300W_WFLW, ALIGNMENT_AFLW19, PARSING, Augment, AugmentConfig
from train.downstream.datasets.common import FaceDataset
from train.downstream.finetune_config import FinetuneConfig
from train.downstream.geometry import (LAPA_FIVE_POINTS, align_matrix, box_matrix, similarity_about_center, tanh_warp_grid,
                            warp_images, warp_points)

AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "celebamask_hq": PARSING, "lapa": PARSING, "300w": ALIGNMENT_300W_WFLW, "wflw": ALIGNMENT_300W_WFLW,
    "aflw19": ALIGNMENT_AFLW19, "celeba_attr": PARSING, "lfwa": PARSING,  # attributes: the parsing preset's mild affine and photometry
}


def label_to_image_matrix(label_shape: tuple[int, int], image_shape: tuple[int, int]) -> torch.Tensor:
    """Label-map pixels -> image pixels, for label maps stored at another size (CelebAMask-HQ's 512
    masks of 1024 images); identity when the sizes agree."""
    sy, sx = image_shape[0] / label_shape[0], image_shape[1] / label_shape[1]
    return torch.tensor([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]])


class WarpedSamples(torch.utils.data.Dataset):
    """A benchmark split (or some of its indices) as warped, optionally augmented, network inputs."""

    def __init__(self, dataset: FaceDataset, cfg: FinetuneConfig, train: bool, indices: Sequence[int] | None = None):
        self.dataset, self.cfg, self.train = dataset, cfg, train
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.preset = AUGMENT_PRESETS[cfg.dataset]
        self.augment = Augment(self.preset) if train and cfg.augment else None

    def __len__(self) -> int:
        return len(self.indices)

    def matrix(self, item: dict[str, Any]) -> torch.Tensor:
        """The protocol's matrix from the original image to the (unaugmented) warped input."""
        size, warp = self.cfg.warp_size, self.cfg.protocol["warp"]
        if warp == "resize":
            h, w = item["image"].shape[:2]
            return box_matrix(torch.tensor([[-0.5, -0.5, w - 0.5, h - 0.5]]), size, square=False)[0]
        if warp == "five_points":
            five = torch.from_numpy(np.asarray(item["landmarks"], dtype=np.float32)[list(LAPA_FIVE_POINTS)])
            return align_matrix(five[None], size)[0]
        crop = box_matrix(torch.from_numpy(np.asarray(item["box"], dtype=np.float32))[None], size)
        if self.augment:  # the random affine already centres its scale on scale_mu
            return crop[0]
        return (similarity_about_center(size, scale=self.preset.scale_mu) @ crop)[0]

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        item = self.dataset[index]
        size, factor = self.cfg.warp_size, self.cfg.warp_factor
        matrix = self.matrix(item)
        if self.augment:  # torch's global generator: seeded by the trainer, and per worker by the DataLoader
            matrix = self.augment.matrix(matrix, size)
        image = torch.from_numpy(item["image"]).permute(2, 0, 1).float().div(255)[None]
        grid = tanh_warp_grid(matrix[None], factor, size, tuple(image.shape[-2:]))
        warped = warp_images(image, grid)
        if self.augment:
            warped = self.augment.images(warped).clamp(0, 1)
        out: dict[str, Any] = {"image": warped[0], "matrix": matrix, "index": index}
        if "attributes" in item:
            out["attributes"] = torch.from_numpy(item["attributes"])
        if "label" in item:
            label = torch.from_numpy(np.ascontiguousarray(item["label"])).long()
            label_matrix = matrix @ label_to_image_matrix(tuple(label.shape), tuple(image.shape[-2:]))
            out["label_matrix"] = label_matrix
            if self.train:
                out["label"] = warp_images(label[None], tanh_warp_grid(label_matrix[None], factor, size,
                                                                       tuple(label.shape)), mode="nearest")[0]
            else:
                out["original_label"] = label
        if self.cfg.task == "alignment":
            landmarks = torch.from_numpy(np.asarray(item["landmarks"], dtype=np.float32))
            points = warp_points(landmarks[None], matrix[None], factor, size)[0]
            out["points"] = (points + 0.5) / size  # the heatmaps' [0, 1] frame (pixel centres at (i + 0.5) / size)
            if not self.train:
                out["landmarks"], out["box"] = landmarks, torch.as_tensor(np.asarray(item["box"], dtype=np.float32))
        return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack what has one size; keep per-sample lists of the rest (original label maps)."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        same = isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values)
        batch[key] = torch.stack(values) if same else (torch.tensor(values) if key == "index" else values)
    return batch


def train_val_indices(image_paths: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed, seeded share of the training images held out for validation; every face of a held-out
    image goes with it (WFLW and AFLW have several faces per photo), so no photo is on both sides."""
    images = sorted(set(image_paths))
    order = np.random.default_rng(seed).permutation(len(images))
    held_images = {images[i] for i in order[:max(1, round(len(images) * fraction))]}
    held = [i for i, path in enumerate(image_paths) if path in held_images]
    kept = [i for i, path in enumerate(image_paths) if path not in held_images]
    return kept, held


def subset_indices(image_paths: Sequence[str], indices: Sequence[int], fraction: float, count: int,
                   seed: int) -> list[int]:
    """The low-data regime: of the training `indices`, those of a seeded share of their photos
    (`count` photos when given, else `fraction` of them, at least one), every face of a photo kept
    together. The order is one seeded permutation of the photos, so with one seed a smaller subset
    lies inside every larger one, and the subset does not depend on the model being trained."""
    images = sorted({image_paths[i] for i in indices})
    order = np.random.default_rng(seed).permutation(len(images))
    keep = count if count else max(1, round(len(images) * fraction))
    kept_images = {images[i] for i in order[:keep]}
    return [i for i in indices if image_paths[i] in kept_images]


def listed_indices(image_paths: Sequence[str], indices: Sequence[int], listed: Sequence[str], source: str) -> list[int]:
    """The training `indices` whose photo is in `listed` (a --train-subset file); an unknown photo is an error."""
    available = {image_paths[i] for i in indices}
    unknown = [name for name in listed if name not in available]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} image(s) not in the training split, e.g. {unknown[0]!r}")
    wanted = set(listed)
    return [i for i in indices if image_paths[i] in wanted]
