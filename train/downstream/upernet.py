"""The dense head of FaRL's downstream models: a ViT feature pyramid and a UPerNet head.

As in FaRL's downstream code (farl.md): four ViT blocks' patch tokens, all at stride 16, become
a pyramid at strides 4, 8, 16 and 32 (two stride-2 deconvolutions, one, identity, a 2x2 max-pool),
then UPerNet (Xiao et al. 2018, as in mmsegmentation's UPerHead): a pyramid pooling module on
the coarsest level (pool scales 1, 2, 3, 6), a top-down path with lateral 1x1 convolutions, 3x3
convolutions per level, and all levels fused at stride 4. Written here: neither open_clip nor
timm ships one, and mmsegmentation would pull in mmcv for two small modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ViTPyramid(nn.Module):
    """Four stride-16 maps of width `width` -> strides 4, 8, 16, 32."""

    def __init__(self, width: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2), nn.BatchNorm2d(width), nn.GELU(),
                                 nn.ConvTranspose2d(width, width, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.down2 = nn.MaxPool2d(2)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(features[0]), self.up2(features[1]), features[2], self.down2(features[3])]


class UPerHead(nn.Module):
    """Pyramid (fine to coarse) -> (B, out_channels, H/4, W/4) logits at the finest level's size."""

    def __init__(self, in_channels: int, channels: int, out_channels: int, pool_scales: tuple[int, ...] = (1, 2, 3, 6),
                 dropout: float = 0.1, levels: int = 4):
        super().__init__()
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, channels, 1))
                                   for s in pool_scales)
        self.ppm_bottleneck = conv_bn_relu(in_channels + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(conv_bn_relu(in_channels, channels, 1) for _ in range(levels - 1))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(levels - 1))
        self.fuse = conv_bn_relu(levels * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def _ppm(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [F.interpolate(pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False) for pool in self.pools]
        return self.ppm_bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        laterals = [lateral(x) for lateral, x in zip(self.laterals, pyramid[:-1])] + [self._ppm(pyramid[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level gets the coarser one added
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="bilinear", align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                                                 for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))
