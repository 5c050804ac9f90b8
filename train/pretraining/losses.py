"""FaRL's objective: CLIP's image-text contrastive loss plus the MIM loss, each with a weight.

The contrastive part is open_clip's ClipLoss with `local_loss` and `gather_with_grad`: each rank
scores its own rows against the features of every rank, gathered with their gradient. The mean of
the ranks' losses is the loss of the whole global batch, and DDP's mean of the ranks' gradients is
its gradient (tests/test_losses.py checks both against one process). The MIM loss is the mean
over the masked patches of the global batch too: each rank divides its sum by the global count
(one all-reduce of a scalar) times the world size, since DDP then averages over ranks; BEiT's
masks do not all cover the same number of patches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from torch import nn

from train.pretraining.targets import Targets


class FaRLLoss(nn.Module):
    def __init__(self, targets: Targets | None, contrastive_weight: float = 1.0, mim_weight: float = 1.0,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.targets, self.world_size = targets, world_size
        self.contrastive_weight, self.mim_weight = contrastive_weight, mim_weight
        # cache_labels=False: the cache is a dict that torch.compile guards on, so filling it on step 1
        # recompiled the loss on step 2 (5 s on 2 CPUs); the labels are one arange, folded into the graph
        self.clip_loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=False,
                                  rank=rank, world_size=world_size)

    def forward(self, outputs: dict[str, torch.Tensor | None], images: torch.Tensor,
                mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """{'loss', 'contrastive', 'mim'} for the model's outputs on `images` with `mask`."""
        contrastive = self.clip_loss(outputs["image_features"].float(), outputs["text_features"].float(),
                                     outputs["logit_scale"].float())
        losses = {"contrastive": contrastive, "loss": self.contrastive_weight * contrastive}
        if mask is not None and self.targets is not None:
            with torch.autocast(images.device.type, enabled=False):  # DALL-E codes in fp32, as BEiT computes them
                targets = self.targets(images.float())
            losses["mim"] = self.masked_mean(self.targets.patch_loss(outputs["mim_logits"], targets), mask)
            losses["loss"] = losses["loss"] + self.mim_weight * losses["mim"]
        return losses

    def masked_mean(self, per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over the global batch's masked patches, with a weighted sum instead of a boolean
        index (which would sync with the host every step)."""
        weights = mask.to(per_patch.dtype)
        count = weights.sum().detach()
        if self.world_size > 1:
            dist.all_reduce(count)
            count = count / self.world_size  # DDP averages the ranks' losses
        return (per_patch * weights).sum() / count.clamp_min(1e-9)  # no masked patch: a loss of 0
