"""`python -m train.zeroshot`: face attributes from FaRL's text tower, with no training.

    python -m train.zeroshot --checkpoint FaRL-Base-Patch16-LAIONFace20M-ep16.pth --data data/CelebA --output out/zeroshot
    python -m train.zeroshot --checkpoint ... --dataset lfwa --data data/LFWA

Each CelebA attribute is a pair of descriptions ("with eyeglasses" / "without eyeglasses"), each put
into a few templates ("a photo of a person with eyeglasses."); the normalised text embeddings of a
description's templates are averaged, and an image has the attribute when its embedding is closer
to the positive description than to the negative one. Images are the aligned crops stretched to the
model's input size, as the fine-tuned attribute models take them. Reports the same numbers as
fine-tuning (train.downstream.metrics.attribute_metrics: mean accuracy, balanced accuracy, the majority
predictor's accuracy), printed and written to OUTPUT/zeroshot.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from pipeline.storage import save_json
from train.downstream.datasets import DatasetError, open_dataset
from train.downstream.metrics import attribute_metrics
from train.model import FaRL

TEMPLATES = ("a photo of a person {}.", "a close-up photo of a face {}.", "a cropped photo of someone {}.")
# CelebA attribute -> (present, absent), each completing a template
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "5_o_Clock_Shadow": ("with a five o'clock shadow", "with a clean-shaven face"),
    "Arched_Eyebrows": ("with arched eyebrows", "with straight eyebrows"),
    "Attractive": ("who is attractive", "who is unattractive"),
    "Bags_Under_Eyes": ("with bags under the eyes", "without bags under the eyes"),
    "Bald": ("who is bald", "with a full head of hair"),
    "Bangs": ("with bangs", "without bangs"),
    "Big_Lips": ("with big lips", "with thin lips"),
    "Big_Nose": ("with a big nose", "with a small nose"),
    "Black_Hair": ("with black hair", "without black hair"),
    "Blond_Hair": ("with blond hair", "without blond hair"),
    "Blurry": ("that is blurry", "that is sharp"),
    "Brown_Hair": ("with brown hair", "without brown hair"),
    "Bushy_Eyebrows": ("with bushy eyebrows", "with thin eyebrows"),
    "Chubby": ("who is chubby", "who is slim"),
    "Double_Chin": ("with a double chin", "without a double chin"),
    "Eyeglasses": ("with eyeglasses", "without eyeglasses"),
    "Goatee": ("with a goatee", "without a goatee"),
    "Gray_Hair": ("with gray hair", "without gray hair"),
    "Heavy_Makeup": ("with heavy makeup", "without makeup"),
    "High_Cheekbones": ("with high cheekbones", "with low cheekbones"),
    "Male": ("who is a man", "who is a woman"),
    "Mouth_Slightly_Open": ("with the mouth slightly open", "with the mouth closed"),
    "Mustache": ("with a mustache", "without a mustache"),
    "Narrow_Eyes": ("with narrow eyes", "with wide open eyes"),
    "No_Beard": ("without a beard", "with a beard"),
    "Oval_Face": ("with an oval face", "with a round face"),
    "Pale_Skin": ("with pale skin", "with tanned skin"),
    "Pointy_Nose": ("with a pointy nose", "with a rounded nose"),
    "Receding_Hairline": ("with a receding hairline", "with a full hairline"),
    "Rosy_Cheeks": ("with rosy cheeks", "without rosy cheeks"),
    "Sideburns": ("with sideburns", "without sideburns"),
    "Smiling": ("who is smiling", "who is not smiling"),
    "Straight_Hair": ("with straight hair", "with curly hair"),
    "Wavy_Hair": ("with wavy hair", "with straight hair"),
    "Wearing_Earrings": ("wearing earrings", "without earrings"),
    "Wearing_Hat": ("wearing a hat", "without a hat"),
    "Wearing_Lipstick": ("wearing lipstick", "without lipstick"),
    "Wearing_Necklace": ("wearing a necklace", "without a necklace"),
    "Wearing_Necktie": ("wearing a necktie", "without a necktie"),
    "Young": ("who is young", "who is old"),
}


@torch.no_grad()
def description_embeddings(model: FaRL, names: tuple[str, ...]) -> torch.Tensor:
    """(attributes, 2, dim): the averaged, normalised text embedding of each attribute's present (0)
    and absent (1) description (DESCRIPTIONS' order) over TEMPLATES."""
    unknown = [name for name in names if name not in DESCRIPTIONS]
    if unknown:
        raise ValueError(f"no descriptions for attribute(s) {', '.join(unknown)}")
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu", context_length=model.config["model"]["text_cfg"]["context_length"])
    texts = [template.format(DESCRIPTIONS[name][side]) for name in names for side in (0, 1) for template in TEMPLATES]
    embedded = model.encode_text(tokenizer(texts), normalize=True).view(len(names), 2, len(TEMPLATES), -1).mean(2)
    return F.normalize(embedded, dim=-1)


@torch.no_grad()
def predict(model: FaRL, images: torch.Tensor, descriptions: torch.Tensor) -> np.ndarray:
    """(B, attributes) bool: closer to the present description than to the absent one."""
    size = model.clip.visual.image_size
    size = size if isinstance(size, int) else size[0]
    x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    features = model.encode_image((x - mean) / std, normalize=True)
    similarity = torch.einsum("bd,asd->bas", features, descriptions)
    return (similarity[..., 0] > similarity[..., 1]).numpy()


def zeroshot(checkpoint: str, data: str, split: str = "test", batch_size: int = 64,
             dataset_name: str = "celeba_attr") -> dict:
    model = FaRL.from_checkpoint(checkpoint, with_mim=False).eval()
    dataset = open_dataset(dataset_name, data, split)
    descriptions = description_embeddings(model, dataset.attribute_names)
    predicted, truth = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([torch.from_numpy(item["image"]).permute(2, 0, 1).float() / 255 for item in items])
        predicted.append(predict(model, images, descriptions))
        truth.append(np.stack([item["attributes"] for item in items]))
    metrics = attribute_metrics(np.concatenate(predicted), np.concatenate(truth), dataset.attribute_names)
    return {"checkpoint": checkpoint, "dataset": dataset_name, "data": data, "split": split, "images": len(dataset),
            **metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Zero-shot face attributes from the text tower (CelebA).")
    parser.add_argument("--checkpoint", required=True, help="ours, an official FaRL file or any OpenAI-CLIP-layout file")
    parser.add_argument("--data", required=True, help="the dataset's root, in its official layout")
    parser.add_argument("--dataset", default="celeba_attr", choices=("celeba_attr", "lfwa"),
                        help="CelebA or LFWA: the same 40 attributes")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", default="", help="folder for zeroshot.json; default: print only")
    args = parser.parse_args(argv)
    try:
        result = zeroshot(args.checkpoint, args.data, args.split, args.batch_size, args.dataset)
    except (ValueError, DatasetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if args.output:
        save_json(args.output, "zeroshot.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
