"""`python -m train.retrieval`: image->text and text->image recall@K on held-out pairs of our own data.

    python -m pipeline.subset --data out/laion_face --holdout 0.01 --output out/held_out
    python -m train.retrieval --checkpoint out/pretrain/checkpoints/last.pt --data out/held_out --output out/retrieval

The pairs are the first `--samples` of the held-out shards in their stored order (NEW/keys.txt's),
so every model is measured on the same ones; each image is resized on its shorter side and
centre-cropped to the model's input (CLIP's evaluation transform), each caption tokenized as in
training. A query's correct answers are its own pair and every pair with the identical caption
(train.pretraining.heldout says why). Recall@K is the share of queries with a correct answer among
the K most similar. `train.pretrain --holdout NEW` measures the same every `--eval-every` steps, on
samples it never trains on, as a health metric.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from pipeline.storage import save_json
from train.model import FaRL
from train.pretraining.heldout import evaluate, load_pairs


def retrieval(checkpoint: str, data: str, samples: int = 1000, batch_size: int = 256) -> dict:
    model = FaRL.from_checkpoint(checkpoint, with_mim=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vision, text = model.config["model"]["vision_cfg"], model.config["model"]["text_cfg"]
    pairs = load_pairs(data, samples, vision["image_size"], text["context_length"])
    metrics = evaluate(model.to(device), pairs, device, batch_size)
    return {"checkpoint": checkpoint, "data": data, "pairs": len(pairs.captions),
            "distinct_captions": len(set(pairs.captions)), **metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Image<->text retrieval recall@1/5/10 on held-out pairs of a build.")
    parser.add_argument("--checkpoint", required=True, help="ours, an official FaRL file or any OpenAI-CLIP-layout file")
    parser.add_argument("--data", required=True, help="held-out shards: a `pipeline.subset --holdout` output, "
                                                      "or any shard pattern train.pretrain takes")
    parser.add_argument("--samples", type=int, default=1000, help="pairs to rank among (the first of the shards)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--output", default="", help="folder for retrieval.json; default: print only")
    args = parser.parse_args(argv)
    try:
        if args.samples < 2:
            raise ValueError("--samples must be at least 2")
        result = retrieval(args.checkpoint, args.data, args.samples, args.batch_size)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if args.output:
        save_json(args.output, "retrieval.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
