"""train/pretraining/masking.py: BEiT's blockwise masks: counts, block shapes, the generator's randomness."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from train.pretraining.masking import BlockMaskGenerator


def test_defaults_mask_75_of_196_in_blocks() -> None:
    generator, rng = BlockMaskGenerator(), np.random.default_rng(0)
    masks = [generator(rng) for _ in range(300)]
    counts = np.array([m.sum() for m in masks])
    assert masks[0].shape == (14, 14) and masks[0].dtype == bool
    assert counts.max() == 75  # never more than asked
    assert (counts == 75).mean() > 0.5 and counts.mean() > 72  # BEiT stops short when no block fits
    pieces = [ndimage.label(mask)[1] for mask in masks]  # blocks, not scattered patches:
    assert max(pieces) <= 8 and np.mean(pieces) < 4      # 75 random patches would make ~30 pieces
    assert not np.array_equal(masks[0], masks[1])


def block_shapes(generator: BlockMaskGenerator, n: int = 2000) -> list[tuple[int, int]]:
    """(h, w) of `n` single blocks, each drawn on an empty grid, checked to be one filled rectangle
    (through the private _add_block: a whole mask's blocks overlap and hide their shapes)."""
    rng, shapes = np.random.default_rng(0), []
    for _ in range(n):
        mask = np.zeros((generator.height, generator.width), dtype=bool)
        added = generator._add_block(mask, generator.num_masked, rng)
        rows, cols = np.nonzero(mask)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert added == h * w == mask.sum()
        shapes.append((h, w))
    return shapes


def test_block_size_and_aspect_bounds() -> None:
    """Each block has about min_patches or more, in an aspect range of [min_aspect, 1/min_aspect]: BEiT
    rounds the sides to whole patches, so 16 patches can come out as 2 x 6 and 0.3 as 1/4."""
    shapes = block_shapes(BlockMaskGenerator())
    areas, ratios = np.array([h * w for h, w in shapes]), np.array([h / w for h, w in shapes])
    assert areas.min() >= 12 and areas.max() <= 75
    assert ratios.min() >= 1 / 4 and ratios.max() <= 4
    assert (ratios > 2).mean() > 0.05 and (ratios < 1 / 2).mean() > 0.05  # tall and wide blocks both
    narrower = np.array([h / w for h, w in block_shapes(BlockMaskGenerator(min_aspect=0.5))])
    assert narrower.min() >= 0.4 and narrower.max() <= 2.5
    # one size and one aspect allowed: every mask is a single 6 x 6 square
    square = BlockMaskGenerator((14, 14), num_masked=36, min_patches=36, min_aspect=1.0)
    for seed in range(20):
        rows, cols = np.nonzero(square(np.random.default_rng(seed)))
        assert len(rows) == 36 and np.ptp(rows) == np.ptp(cols) == 5


def test_same_rng_same_masks_and_settings() -> None:
    generator = BlockMaskGenerator((8, 8), num_masked=24, min_patches=4, min_aspect=0.5)
    a = [generator(np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    counts = [generator(np.random.default_rng(s)).sum() for s in range(100)]
    assert max(counts) == 24 and np.mean(counts) > 22


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="num_masked"):
        BlockMaskGenerator((14, 14), num_masked=197)
    with pytest.raises(ValueError, match="min_patches"):
        BlockMaskGenerator((14, 14), num_masked=10, min_patches=16)
