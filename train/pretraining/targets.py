"""What the MIM branch predicts at masked patches: `pixel` (the offline default) or `dalle` (the paper's).

- pixel: MAE's target, each patch's pixels normalised by the patch's own mean and variance; loss is
  the mean squared error. Needs no weights.
- dalle: the DALL-E dVAE encoder's code of each patch, from the same crop resized to 8 px per
  patch (112 px for a 224 crop; resized from the 224 px crop with antialiased bicubic, where BEiT
  resizes the original crop region with Lanczos: a small difference, chosen so the loader makes
  one crop only); loss is cross-entropy over its 8192 codes. The encoder is a file
  the user supplies: a TorchScript file, or the pickled module of the `dall_e` package
  (`encoder.pkl`, which needs that package installed to unpickle).
"""

from __future__ import annotations

import io
from typing import Protocol

import fsspec
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

DALLE_PATCH = 8  # the dVAE encoder downsamples by 8: one code per 8 x 8 pixels
DALLE_EPS = 0.1  # dall_e.utils.map_pixels' logit-Laplace epsilon
DALLE_VOCAB = 8192


class Targets(Protocol):
    vocab: int  # width of lm_head's output

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Targets of every patch of CLIP-normalised images (B, 3, H, W): (B, N, ...)."""

    def patch_loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of every patch, (B, N), from predictions (B, N, vocab) and targets (B, N, ...)."""

    def to(self, device: torch.device) -> "Targets": ...


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised images back to [0, 1]."""
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return images * std + mean


class PixelTargets:
    def __init__(self, patch_size: int):
        self.patch_size = patch_size
        self.vocab = 3 * patch_size * patch_size

    def to(self, device: torch.device) -> "PixelTargets":
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(images.float(), self.patch_size, stride=self.patch_size).transpose(1, 2)  # (B, N, 3*p*p)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        return (patches - mean) / (var + 1e-6).sqrt()

    def patch_loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (predictions.float() - targets).square().mean(-1)


class DalleTargets:
    def __init__(self, encoder: torch.nn.Module, patch_size: int):
        self.encoder = encoder.eval()
        for param in encoder.parameters():  # not requires_grad_(): ScriptModules lack it
            param.requires_grad_(False)
        self.patch_size = patch_size
        self.vocab = DALLE_VOCAB

    @classmethod
    def from_file(cls, path: str, patch_size: int) -> "DalleTargets":
        if not path:
            raise ValueError("mim_target 'dalle' needs the DALL-E dVAE encoder file: set dalle_encoder "
                             "(encoder.pkl of the dall_e package, or a TorchScript file), or use mim_target 'pixel'")
        try:
            with fsspec.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ValueError(f"DALL-E encoder file {path} does not exist") from None
        try:  # torch.load also opens TorchScript archives (it hands them to torch.jit.load)
            encoder = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except ModuleNotFoundError as err:
            raise ValueError(f"DALL-E encoder {path} needs the '{err.name}' package to unpickle (pip install DALL-E)") from None
        except Exception as err:  # torch raises several types for a file that is no model
            raise ValueError(f"DALL-E encoder {path} cannot be read: {str(err).splitlines()[0]}") from None
        if not isinstance(encoder, torch.nn.Module):
            raise ValueError(f"DALL-E encoder {path} holds a {type(encoder).__name__}, not a torch module")
        return cls(encoder, patch_size)

    def to(self, device: torch.device) -> "DalleTargets":
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """dVAE codes (B, N) of the same crop, resized so that each model patch becomes one code."""
        size = [side // self.patch_size * DALLE_PATCH for side in images.shape[-2:]]
        small = F.interpolate(unnormalize(images.float()), size=size, mode="bicubic", antialias=True).clamp(0, 1)
        logits = self.encoder((1 - 2 * DALLE_EPS) * small + DALLE_EPS)  # dall_e.utils.map_pixels
        if logits.shape[1] != DALLE_VOCAB:
            raise ValueError(f"the DALL-E encoder gave {logits.shape[1]} channels, not {DALLE_VOCAB} code logits")
        return logits.argmax(1).flatten(1)

    def patch_loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(predictions.float().transpose(1, 2), targets, reduction="none")


def make_targets(kind: str, patch_size: int, dalle_encoder: str = "") -> PixelTargets | DalleTargets:
    if kind == "pixel":
        return PixelTargets(patch_size)
    if kind == "dalle":
        return DalleTargets.from_file(dalle_encoder, patch_size)
    raise ValueError(f"unknown mim_target '{kind}': use pixel or dalle")
