"""Held-out image-text pairs of our own data and the image<->text recall@K on them: what
`train.pretrain --holdout` logs as its health metric and `train.retrieval` reports.

A query's correct answers are its own pair and every pair with the identical caption: web captions
repeat ("portrait of a young woman", a stock photo's title), and a model cannot tell such pairs
apart from the text. Images are resized on their shorter side and centre-cropped to the model's
input (CLIP's evaluation transform), captions tokenized as in training.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import fsspec
import open_clip
import torch
import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from train.model import FaRL
from train.pretraining.data import iter_samples

log = logging.getLogger(__name__)
KS = (1, 5, 10)


@dataclass
class HeldOutPairs:
    images: torch.Tensor  # uint8 (N, 3, S, S), resized and centre-cropped
    tokens: torch.Tensor  # int64 (N, context length)
    captions: list[str]


def held_out_keys(holdout: str) -> frozenset[str]:
    """The keys of a `pipeline.subset --holdout` output (its keys.txt), which training must not draw."""
    path = holdout.rstrip("/") + "/keys.txt"
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            return frozenset(line.strip() for line in f if line.strip())
    except FileNotFoundError:
        raise ValueError(f"--holdout {holdout} has no keys.txt: give a `pipeline.subset` output") from None


def load_pairs(data: str, count: int, image_size: int, context_length: int) -> HeldOutPairs:
    """The first `count` readable image-caption pairs of the shards of `data`; ValueError with fewer than 2."""
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu", context_length=context_length)
    images, captions = [], []
    for sample in iter_samples(data):
        try:
            caption = sample["txt"].decode("utf-8")
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                image = TF.resize(im.convert("RGB"), image_size, interpolation=TF.InterpolationMode.BICUBIC)
        except (KeyError, OSError, UnicodeDecodeError) as err:  # as training does: skip, and say so
            log.warning("retrieval: skipped sample %s: %r", sample.get("__key__"), err)
            continue
        images.append(TF.pil_to_tensor(TF.center_crop(image, image_size)))
        captions.append(caption)
        if len(captions) == count:
            break
    if len(captions) < 2:
        raise ValueError(f"{data} holds {len(captions)} readable image-caption pair(s): retrieval needs at least 2")
    return HeldOutPairs(torch.stack(images), tokenizer(captions), captions)


@torch.no_grad()
def embed(model: FaRL, pairs: HeldOutPairs, device: torch.device, batch_size: int = 256,
          autocast: torch.autocast | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings (N, dim) each, in float32 on the CPU."""
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
    autocast = autocast or torch.autocast(device.type, enabled=False)
    image_features, text_features = [], []
    for start in range(0, len(pairs.captions), batch_size):
        images = pairs.images[start:start + batch_size].to(device).float() / 255
        with autocast:
            image_features.append(model.encode_image((images - mean) / std, normalize=True).float().cpu())
            text_features.append(model.encode_text(pairs.tokens[start:start + batch_size].to(device),
                                                   normalize=True).float().cpu())
    return torch.cat(image_features), torch.cat(text_features)


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, captions: list[str],
                ks: tuple[int, ...] = KS) -> dict[str, float]:
    """i2t_rK and t2i_rK for each K, and mean_recall over all of them; pairs with identical captions
    answer each other's queries (see the module's docstring)."""
    caption_ids = {caption: number for number, caption in enumerate(dict.fromkeys(captions))}
    labels = torch.tensor([caption_ids[caption] for caption in captions])
    correct = labels[:, None] == labels[None, :]  # symmetric: the same table serves both directions
    similarity = image_features @ text_features.T
    result = {}
    for direction, scores in (("i2t", similarity), ("t2i", similarity.T)):
        ranked = scores.topk(min(max(ks), len(captions)), dim=1).indices
        hits = correct.gather(1, ranked)
        for k in ks:
            result[f"{direction}_r{k}"] = hits[:, :k].any(dim=1).float().mean().item()
    result["mean_recall"] = sum(result.values()) / len(result)
    return result


def evaluate(model: FaRL, pairs: HeldOutPairs, device: torch.device, batch_size: int = 256,
             autocast: torch.autocast | None = None) -> dict[str, float]:
    """Recall@K of `model` on `pairs`, in eval mode; the model's train/eval mode is restored after."""
    training = model.training
    model.eval()
    try:
        return recall_at_k(*embed(model, pairs, device, batch_size, autocast), pairs.captions)
    finally:
        model.train(training)
