"""FaRL's objective: CLIP's image-text contrastive loss plus the MIM loss, each with a weight.

The contrastive part is open_clip's ClipLoss with `local_loss` and `gather_with_grad`: each rank
scores its own rows against the features of every rank, gathered with their gradient. The mean of
the ranks' losses is the loss of the whole global batch, and DDP's mean of the ranks' gradients is
its gradient (tests/test_losses.py checks both against one process). The MIM loss is each rank's
mean over its masked patches, averaged over ranks: the global mean whenever ranks mask equally
many patches (BEiT's masks cover 75 patches, a few less for about a third of the images).
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss
from torch import nn

from train.targets import Targets


class FaRLLoss(nn.Module):
    def __init__(self, targets: Targets | None, contrastive_weight: float = 1.0, mim_weight: float = 1.0,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.targets = targets
        self.contrastive_weight, self.mim_weight = contrastive_weight, mim_weight
        self.clip_loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
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
            losses["mim"] = self.targets.loss(outputs["mim_logits"], targets, mask)
            losses["loss"] = losses["loss"] + self.mim_weight * losses["mim"]
        return losses
