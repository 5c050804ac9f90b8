"""Stand-ins for what cannot exist here, each labelled FAKE where it is used."""

from __future__ import annotations

import torch
from torch import nn

from train.pretraining.targets import DALLE_VOCAB


class StandInEncoder(nn.Module):
    """FAKE dVAE encoder (same interface as dall_e's Encoder): one code per 8x8 cell, chosen by the
    cell's mean brightness, so tests can predict the codes."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(8)
        self.vocab = DALLE_VOCAB

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = self.pool(x.mean(1, keepdim=True))  # (B, 1, H/8, W/8), in [0.1, 0.9]
        codes = torch.arange(self.vocab, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return -(codes - (brightness - 0.1) / 0.8 * (self.vocab - 1)).abs()
