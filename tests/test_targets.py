"""train/pretraining/targets.py: MAE's normalised-pixel targets, and the DALL-E path with a stand-in encoder.

The real DALL-E dVAE encoder cannot be downloaded here; `standins.StandInEncoder` is a small TorchScript
module with the same interface (pixels mapped to [0.1, 0.9] in, 8192 code logits per 8x8 cell out),
labelled as the fake it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from numerics import EPS32
from standins import StandInEncoder
from train.pretraining.losses import FaRLLoss
from train.pretraining.targets import DALLE_VOCAB, DalleTargets, PixelTargets, make_targets, unnormalize


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def test_pixel_targets_are_per_patch_normalised() -> None:
    images = torch.randn(2, 3, 32, 32)
    targets = PixelTargets(16)(images)
    assert targets.shape == (2, 4, 3 * 16 * 16) and PixelTargets(16).vocab == 768
    assert torch.allclose(targets.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(targets.std(-1), torch.ones(2, 4), atol=1e-3)
    # patch order is the ViT's: row-major over the grid; patch 1 is the top-right 16x16 block
    top_right = images[0, :, :16, 16:].reshape(-1)
    assert torch.allclose(targets[0, 1], (top_right - top_right.mean()) / top_right.var().add(1e-6).sqrt(), atol=1e-5)
    # the loss is the MSE over masked patches only. Both sides sum the same 3 x 768 positive terms in
    # different orders (torch's blocked CPU sums: by ISA and threads); such a sum rounds to within about
    # log2(n) = 11 eps of the value, measured <= 1.6 eps; 100 eps is far below the > 10% that one patch
    # more or less in the mask makes (rel=1e-6, 8 eps, was too close to that rounding)
    predictions, mask = torch.randn(2, 4, 768), torch.tensor([[True, False, False, True], [False, False, True, False]])
    expected = torch.nn.functional.mse_loss(predictions[mask], targets[mask])
    assert FaRLLoss(None).masked_mean(PixelTargets(16).patch_loss(predictions, targets), mask).item() == \
        pytest.approx(expected.item(), rel=100 * EPS32)


@pytest.mark.filterwarnings("ignore:.torch.load. received a zip file:UserWarning")
def test_dalle_codes_from_the_same_crop_at_8px_per_patch(tmp_path: Path) -> None:
    path = tmp_path / "encoder.pt"
    torch.jit.script(StandInEncoder()).save(str(path))
    targets = make_targets("dalle", 16, str(path))
    assert targets.vocab == DALLE_VOCAB
    pixels = torch.zeros(1, 3, 224, 224)
    pixels[..., :16, :16] = 1.0  # patch 0 white, everything else black
    codes = targets(normalised(pixels))
    assert codes.shape == (1, 196) and codes.dtype == torch.int64
    grid = codes[0].view(14, 14)
    assert grid[0, 0] > 0.95 * DALLE_VOCAB  # bright (the bicubic resize blurs the block's edge a little)
    assert (grid[2:] == 0).all() and (grid[:, 2:] == 0).all()  # dark away from it
    assert torch.allclose(unnormalize(normalised(pixels)), pixels, atol=1e-6)
    predictions = torch.randn(1, 196, DALLE_VOCAB)
    mask = torch.zeros(1, 196, dtype=torch.bool)
    mask[0, :5] = True
    expected = torch.nn.functional.cross_entropy(predictions[0, :5], codes[0, :5])
    assert FaRLLoss(None).masked_mean(targets.patch_loss(predictions, codes), mask).item() == \
        pytest.approx(expected.item(), rel=100 * EPS32)  # 5 log-sum-exps of 8192 logits, summed in any order


def test_dalle_encoder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the DALL-E dVAE encoder file"):
        make_targets("dalle", 16, "")
    with pytest.raises(ValueError, match="does not exist"):
        make_targets("dalle", 16, str(tmp_path / "missing.pkl"))
    (tmp_path / "junk.pkl").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot be read"):
        make_targets("dalle", 16, str(tmp_path / "junk.pkl"))
    torch.save({"not": "a module"}, tmp_path / "dict.pkl")
    with pytest.raises(ValueError, match="not a torch module"):
        make_targets("dalle", 16, str(tmp_path / "dict.pkl"))
    narrow = nn.Conv2d(3, 10, 8, stride=8)  # a module of the wrong interface: 10 codes
    torch.save(narrow, tmp_path / "narrow.pkl")
    with pytest.raises(ValueError, match="not 8192 code logits"):
        DalleTargets.from_file(str(tmp_path / "narrow.pkl"), 16)(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown mim_target"):
        make_targets("hog", 16)
