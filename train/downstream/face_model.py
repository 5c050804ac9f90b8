"""FaRL's downstream model: the ViT backbone at 448 px, a feature pyramid and a UPerNet head, for
face parsing (per-pixel class logits) or face alignment (one heatmap per landmark); for face
attributes, the last block's tokens pooled into one linear layer (AttributeHead).

As in farl.md: images warped to 512 come in (here as floats in [0, 1]), are resized to 448 and
normalised inside; the ViT's 14x14 position embedding is resized bicubically to 28x28 (open_clip's
resize_pos_embed); patch tokens after blocks 3, 5, 7 and 11 feed the pyramid. Parsing logits are
resized back to the input size; alignment heatmaps are 128x128, and points come from them by a
soft-argmax over their sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, resize_pos_embed
from torch import nn

from train.model import MIM_KEYS, load_state_dict, model_config
from train.downstream.upernet import UPerHead, ViTPyramid

FEATURE_BLOCKS = (3, 5, 7, 11)


class ViTBackbone(nn.Module):
    """open_clip's ViT image tower returning the patch tokens of chosen blocks as (B, width, g, g) maps."""

    def __init__(self, model: dict, image_size: int = 448, blocks: tuple[int, ...] = FEATURE_BLOCKS,
                 tokens: bool = False):
        """`tokens`: return each block's (B, 1 + g * g, width) tokens, class token first, not patch maps."""
        super().__init__()
        self.tokens = tokens
        model = {**model, "vision_cfg": {**model["vision_cfg"], "image_size": image_size}}
        self.visual = CLIP(**model).visual  # the text tower is built and dropped: open_clip has no public vision-only builder
        self.blocks = blocks
        if max(blocks) >= len(self.visual.transformer.resblocks):
            raise ValueError(f"feature blocks {blocks} need {max(blocks) + 1} blocks; the model has "
                             f"{len(self.visual.transformer.resblocks)}")
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        return self.visual.conv1.out_channels

    def load_openai(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load the `visual.*` weights of an OpenAI-layout state dict (MIM keys dropped, as FaRL's code
        does), with the position embedding resized to this backbone's grid."""
        state_dict = {k: v for k, v in state_dict.items() if k.startswith("visual.") and not MIM_KEYS.match(k)}
        resize_pos_embed(state_dict, self)  # reads self.visual.grid_size
        missing, unexpected = self.visual.load_state_dict({k[len("visual."):]: v for k, v in state_dict.items()}, strict=False)
        if missing or unexpected:
            raise ValueError(f"{source} is not this backbone's layout: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        visual = self.visual
        x = visual.conv1((images - self.mean) / self.std)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = visual.ln_pre(x + visual.positional_embedding.to(x.dtype))
        features = {}
        for index, block in enumerate(visual.transformer.resblocks[:max(self.blocks) + 1]):
            x = block(x)
            if index in self.blocks:
                features[index] = x if self.tokens else x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return [features[b] for b in self.blocks]


class AttributeHead(nn.Module):
    """facer's head for FaRL's attributes (farl.md): the class token, the mean and the max of the patch
    tokens, each layer-normalised, mixed by softmax-learned weights, then one linear layer."""

    def __init__(self, width: int, outputs: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))
        self.mix = nn.Parameter(torch.zeros(3))
        self.linear = nn.Linear(width, outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]
        pooled = (tokens[:, 0], patches.mean(1), patches.amax(1))
        weights = self.mix.softmax(0)
        return self.linear(sum(w * norm(x) for w, norm, x in zip(weights, self.norms, pooled)))


class FaceModel(nn.Module):
    """`task` "parsing": logits (B, outputs, H, W) at the input's size; "alignment": heatmap logits
    (B, outputs, heatmap_size, heatmap_size); "attributes": logits (B, outputs) from the last block."""

    def __init__(self, task: str, outputs: int, model: dict, input_size: int = 448, channels: int = 768,
                 blocks: tuple[int, ...] = FEATURE_BLOCKS, heatmap_size: int = 128, frozen_backbone: bool = False):
        super().__init__()
        if task not in ("parsing", "alignment", "attributes"):
            raise ValueError(f"unknown task '{task}': parsing, alignment or attributes")
        self.config = {"task": task, "outputs": outputs, "model": model, "input_size": input_size,
                       "channels": channels, "blocks": list(blocks), "heatmap_size": heatmap_size,
                       "frozen_backbone": frozen_backbone}  # saved with checkpoints
        self.task, self.input_size, self.heatmap_size = task, input_size, heatmap_size
        if task == "attributes":
            last = model["vision_cfg"]["layers"] - 1
            self.backbone = ViTBackbone(model, input_size, (last,), tokens=True)
            self.pyramid = nn.Identity()  # nothing between the tokens and the head
            self.head = AttributeHead(self.backbone.width, outputs)
        else:
            self.backbone = ViTBackbone(model, input_size, tuple(blocks))
            self.pyramid = ViTPyramid(self.backbone.width)
            self.head = UPerHead(self.backbone.width, channels, outputs)
        self.frozen_backbone = frozen_backbone  # a linear probe: only the head learns
        self.backbone.requires_grad_(not frozen_backbone)

    @classmethod
    def create(cls, task: str, outputs: int, init: str = "", model: str = "ViT-B-16-quickgelu", **kwargs) -> "FaceModel":
        """From `init` (ours, official FaRL, any OpenAI-CLIP-layout ViT file; its shapes give the
        architecture) or, when `init` is empty, randomly initialised `model`."""
        if not init:
            return cls(task, outputs, model_config(model), **kwargs)
        state_dict, config = load_state_dict(init)
        face_model = cls(task, outputs, config["model"], **kwargs)
        face_model.backbone.load_openai(state_dict, init)
        return face_model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        x = F.interpolate(images, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)  # as FaRL: no antialias
        if self.task == "attributes":
            return self.head(self.backbone(x)[0])
        out = self.head(self.pyramid(self.backbone(x)))
        target = size if self.task == "parsing" else (self.heatmap_size,) * 2
        return F.interpolate(out, size=target, mode="bilinear", align_corners=False)

    def param_groups(self, backbone_lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        head = [p for m in (self.pyramid, self.head) for p in m.parameters()]
        groups = [{"params": head, "lr": head_lr, "weight_decay": weight_decay}]
        if not self.frozen_backbone:
            groups.insert(0, {"params": list(self.backbone.parameters()), "lr": backbone_lr, "weight_decay": weight_decay})
        return groups


def heatmap_points(heatmap_logits: torch.Tensor) -> torch.Tensor:
    """Soft-argmax of sigmoid heatmaps: (B, K, h, w) -> (B, K, 2) x, y in [0, 1] of the crop
    (pixel centres at (i + 0.5) / size)."""
    prob = torch.sigmoid(heatmap_logits.float())
    prob = prob / prob.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    h, w = prob.shape[-2:]
    xs = (torch.arange(w, device=prob.device, dtype=prob.dtype) + 0.5) / w
    ys = (torch.arange(h, device=prob.device, dtype=prob.dtype) + 0.5) / h
    return torch.stack([(prob.sum(-2) * xs).sum(-1), (prob.sum(-1) * ys).sum(-1)], dim=-1)


def gaussian_heatmaps(points: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Targets for the heatmap BCE: (B, K, 2) points in [0, 1] -> (B, K, size, size), peak 1, `sigma`
    in heatmap pixels, zero beyond 4 sigma (FaRL's heatmap_radius 5 with its 'awing' kernel
    exp(-16 r^2 / (2 R^2)) is this with sigma = R / 4 = 1.25)."""
    centres = (torch.arange(size, device=points.device, dtype=points.dtype) + 0.5) / size
    dx = (centres.view(1, 1, 1, size) - points[..., 0, None, None]) * size
    dy = (centres.view(1, 1, size, 1) - points[..., 1, None, None]) * size
    squared = dx ** 2 + dy ** 2
    return torch.exp(-squared / (2 * sigma ** 2)) * (squared <= (4 * sigma) ** 2)


def alignment_loss(heatmap_logits: torch.Tensor, target_points: torch.Tensor, sigma: float = 1.25,
                   point_weight: float = 1.0, heatmap_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """farl.md: mean point-to-point distance in normalised crop coordinates plus BCE against
    Gaussian heatmaps, weights 1 and 1, as FaRL's trainer (its 'coord_l1_loss' is this distance)."""
    points = heatmap_points(heatmap_logits)
    point = (points - target_points).norm(dim=-1).mean()
    heatmap = F.binary_cross_entropy_with_logits(heatmap_logits.float(),
                                                 gaussian_heatmaps(target_points, heatmap_logits.shape[-1], sigma))
    return {"loss": point_weight * point + heatmap_weight * heatmap, "point": point, "heatmap": heatmap}


def parsing_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> dict[str, torch.Tensor]:
    loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index)
    return {"loss": loss}


def attribute_loss(logits: torch.Tensor, attributes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Binary cross-entropy over every attribute (targets 0 / 1)."""
    return {"loss": F.binary_cross_entropy_with_logits(logits.float(), attributes.float())}
