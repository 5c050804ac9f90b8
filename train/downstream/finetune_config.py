"""Every setting of `python -m train.finetune`, and the per-dataset protocol of FaRL's downstream code
(and of this project's for face attributes, which FaRL's code does not have).

A dataset's protocol (task, outputs, how a sample is warped, epochs, learning rates, metrics)
fills the settings a user leaves empty; configs/finetune_DATASET.yaml spell them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import ConfigError, option

# farl.md, "Downstream protocol". warp: how a sample becomes the 512x512 network input. metrics:
# NMEs by these normalisations (the first ranks epochs), AUC and FR of the `auc` one at the threshold.
PROTOCOLS: dict[str, dict] = {
    "celebamask_hq": {"task": "parsing", "warp": "resize", "warp_factor": 0.0, "epochs": 300, "head_lr": 1e-3,
                      "metrics": {}},
    "lapa": {"task": "parsing", "warp": "five_points", "warp_factor": 0.8, "epochs": 300, "head_lr": 1e-3,
             "metrics": {}},
    "300w": {"task": "alignment", "warp": "box", "warp_factor": 0.0, "epochs": 250, "head_lr": 1e-2,
             "metrics": {"normalize": ["inter_ocular", "inter_pupil"], "auc": "inter_ocular", "auc_threshold": 0.08}},
    "wflw": {"task": "alignment", "warp": "box", "warp_factor": 0.0, "epochs": 150, "head_lr": 1e-2,
             "metrics": {"normalize": ["inter_ocular"], "auc": "inter_ocular", "auc_threshold": 0.1}},
    "aflw19": {"task": "alignment", "warp": "box", "warp_factor": 0.0, "epochs": 150, "head_lr": 1e-2,
               "metrics": {"normalize": ["diag", "box"], "auc": "box", "auc_threshold": 0.07}},
    # no official protocol (farl.md): CelebA's aligned crops stretched to the input, as facer's FaRL
    # attribute model takes them at 224 px; epochs and learning rate are this project's choice
    "celeba_attr": {"task": "attributes", "warp": "resize", "warp_factor": 0.0, "epochs": 10, "head_lr": 1e-3,
                    "metrics": {}},
    # LFW's whole 250 px photos stretched to the input, as CelebA's crops; 6,263 training images, so more epochs
    "lfwa": {"task": "attributes", "warp": "resize", "warp_factor": 0.0, "epochs": 30, "head_lr": 1e-3,
             "metrics": {}},
}


@dataclass
class FinetuneConfig:
    task: str = option("", "parsing, alignment or attributes (must match the dataset)",
                       choices=("", "parsing", "alignment", "attributes"))
    dataset: str = option("", "which benchmark", choices=("",) + tuple(PROTOCOLS))
    data: str = option("", "the dataset's root folder, in its official layout")
    init: str = option("", "backbone weights: ours, an official FaRL file, any OpenAI-CLIP-layout ViT-B/16; empty = random")
    model: str = option("ViT-B-16-quickgelu", "architecture when init is empty")
    output: str = option("out/finetune", "checkpoints, metrics.jsonl, report.json")
    epochs: int = option(0, "training epochs; 0 = the protocol's (300 parsing; 250 300W; 150 WFLW, AFLW-19)")
    max_steps_per_epoch: int = option(0, "cap on steps per epoch (for smoke tests); 0 = the whole training split")
    batch_size: int = option(5, "images per step (the protocol: 5 per GPU on 8 GPUs)")
    backbone_lr: float = option(1e-4, "learning rate of the ViT")
    head_lr: float = option(0.0, "learning rate of the pyramid and UPerNet head; 0 = the protocol's (1e-3 parsing, 1e-2 alignment)")
    weight_decay: float = option(1e-5, "AdamW weight decay")
    lr_drop_epoch: int = option(200, "learning rates x0.1 from this epoch on")
    ema_decay: float = option(0.999, "EMA of the weights; the EMA model is what is evaluated")
    warp_size: int = option(512, "samples are warped to this size")
    input_size: int = option(448, "the network resizes its input to this (position embedding resized to match)")
    head_channels: int = option(768, "UPerNet width")
    feature_blocks: list[int] = option([3, 5, 7, 11], "ViT blocks (0-based) whose tokens feed the pyramid")
    warp_factor: float = option(-1.0, "tanh-warping strength; -1 = the protocol's (0.8 LaPa, 0 otherwise)")
    heatmap_size: int = option(128, "alignment heatmap side")
    heatmap_sigma: float = option(1.25, "Gaussian heatmap target sigma in heatmap pixels (official: radius 5 = 4 sigma)")
    linear_probe: bool = option(False, "train the head only, the backbone frozen as initialised (attributes: the "
                                       "literature's linear probe; any task)")
    augment: bool = option(True, "the protocol's random affine, gray, gamma, blur (+ occlusion, noise for alignment)")
    val_fraction: float = option(0.05, "share of the training split held out for validation when the dataset has no val "
                                       "split; 0 = none: train on all of it, as the paper did (best-epoch number only)")
    train_fraction: float = option(1.0, "low-data regime: share of the training photos trained on, a seeded subset "
                                        "(faces of one photo together; validation and test are never cut)")
    train_count: int = option(0, "low-data regime: this many training photos instead of a fraction; 0 = by fraction")
    train_subset: str = option("", "a file of training photos (one per line, as OUTPUT/train_subset.txt lists them) "
                                   "to train on, instead of drawing a subset")
    subset_seed: int = option(0, "seed of the subset's draw: one seed gives every init the same photos, and a "
                                 "smaller fraction a subset of a larger one")
    max_epoch_scale: float = option(10.0, "a cut training split trains epochs x min(1 / share of photos kept, this) "
                                          "(lr_drop_epoch likewise): as many steps as the full run down to 1 / this, "
                                          "then capped; 1 = the epochs as given")
    eval_every: int = option(1, "evaluate val and test every this many epochs")
    precision: str = option("fp32", "bf16: bf16 autocast on a GPU, for speed (the protocol has no AMP); CPU runs "
                                    "are fp32 either way", choices=("fp32", "bf16"))
    workers: int = option(2, "DataLoader worker processes")
    seed: int = option(0, "random seed (also picks the held-out validation images)")
    progress: bool = option(True, "progress bars")

    @property
    def protocol(self) -> dict:
        return PROTOCOLS[self.dataset]

    def autocast(self, device: torch.device) -> torch.autocast:
        """Where the model runs (training and evaluation): bf16 autocast on a GPU with precision bf16."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and self.precision == "bf16")

    def validate(self) -> None:
        if not self.dataset or not self.data:
            raise ConfigError("--dataset and --data are required")
        if self.task and self.task != self.protocol["task"]:
            raise ConfigError(f"dataset {self.dataset} is for {self.protocol['task']}, not {self.task}")
        self.task = self.protocol["task"]
        if not 0 < self.train_fraction <= 1 or self.train_count < 0 or self.max_epoch_scale < 1:
            raise ConfigError("train_fraction must be in (0, 1], train_count >= 0 and max_epoch_scale >= 1")
        if self.train_subset and (self.train_fraction < 1 or self.train_count):
            raise ConfigError("give --train-subset, or --train-fraction / --train-count, not both")
        self.head_lr = self.head_lr or self.protocol["head_lr"]
        if self.warp_factor < 0:
            self.warp_factor = self.protocol["warp_factor"]
        if len(self.feature_blocks) != 4:
            raise ConfigError("feature_blocks must name 4 blocks")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction must be in [0, 1)")
