"""train/masking.py: BEiT's blockwise masks: counts, block shapes, the generator's randomness."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from train.masking import BlockMaskGenerator


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
