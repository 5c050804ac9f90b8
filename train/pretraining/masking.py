"""BEiT's blockwise mask generator, written for numpy's Generator API (numpy >= 2).

Blocks of at least `min_patches` patches with an aspect ratio in [min_aspect, 1/min_aspect] are
masked until `num_masked` patches are covered; each block gets up to 10 placement attempts, and a
block may only add patches that are not masked yet, so the total never exceeds `num_masked`
(it can fall short when no block fits: BEiT stops there too, and so does this).
"""

from __future__ import annotations

import math

import numpy as np


class BlockMaskGenerator:
    def __init__(self, grid: tuple[int, int] = (14, 14), num_masked: int = 75, min_patches: int = 16,
                 max_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = grid
        if not 0 < num_masked <= self.height * self.width:
            raise ValueError(f"num_masked must be in 1..{self.height * self.width} for a {grid} grid, got {num_masked}")
        if min_patches < 1 or min_patches > num_masked:
            raise ValueError(f"min_patches must be in 1..num_masked ({num_masked}), got {min_patches}")
        self.num_masked, self.min_patches = num_masked, min_patches
        self.max_patches = num_masked if max_patches is None else max_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
        """Mask one block of new patches, at most `max_new`; returns how many it masked."""
        for _ in range(10):
            area = rng.uniform(*sorted((self.min_patches, max_new)))  # BEiT's random.uniform takes either order
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = rng.integers(0, self.height - h + 1)
            left = rng.integers(0, self.width - w + 1)
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_new:
                block[:] = True
                return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """A (height, width) bool mask. The generator is the caller's: each data-loader worker
        seeds its own, so that workers and ranks draw different masks."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masked:
            max_new = min(self.num_masked - count, self.max_patches)
            added = self._add_block(mask, max_new, rng)
            if added == 0:
                break
            count += added
        return mask
