"""Every setting of `python -m train.pretrain`: defaults here, a YAML file on top, flags on top of that.

The paper publishes the model and the MIM recipe but not the optimisation settings; the defaults
below are CLIP's and BEiT's where FaRL is silent (see configs/pretrain_vitb16.yaml for the
reasoning). Batch size is per worker: the global batch is batch_size x workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError, option


@dataclass
class PretrainConfig:
    data: str = option("", "shards: a builder output folder, a glob, a brace pattern (out/shards/{00000..00009}.tar), "
                           "or any of these as an fsspec URL (s3://...)")
    output: str = option("out/pretrain", "checkpoints/, metrics.jsonl and tensorboard/ go here (local path or fsspec URL)")
    log_dir: str = option("", "local folder for metrics.jsonl and tensorboard/, on the machine that runs the command "
                              "(also with Ray workers elsewhere); empty = the output folder (must then be local)")
    steps: int = option(1000, "optimizer steps in all; a rerun after a kill resumes and stops here too")
    # model
    model: str = option("ViT-B-16-quickgelu", "FaRL-tiny or an open_clip model name; the paper's is ViT-B-16-quickgelu")
    init: str = option("", "start from this checkpoint: ours, an official FaRL file or any OpenAI-CLIP-layout ViT")
    mim: bool = option(True, "train the masked-image-modeling branch besides the contrastive loss")
    mim_target: str = option("pixel", "what masked patches predict", choices=("pixel", "dalle"))
    dalle_encoder: str = option("", "DALL-E dVAE encoder file (encoder.pkl or TorchScript) for mim_target dalle")
    mim_depth: int = option(1, "blocks of lm_transformer (not published; 1 is our guess)")
    mask_patches: int = option(75, "patches masked per image (BEiT, FaRL: 75 of 196)")
    mask_min_patches: int = option(16, "smallest masked block, in patches")
    mask_min_aspect: float = option(0.3, "block aspect ratio range is [this, 1/this]")
    contrastive_weight: float = option(1.0, "weight of the image-text contrastive loss")
    mim_weight: float = option(1.0, "weight of the MIM loss")
    # optimisation
    batch_size: int = option(64, "images per worker per step")
    lr: float = option(5e-4, "peak learning rate")
    warmup_steps: int = option(100, "linear warm-up steps before the cosine decay")
    weight_decay: float = option(0.2, "AdamW weight decay (none on norms, biases, embeddings, temperature)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    eps: float = option(1e-6, "AdamW epsilon")
    grad_clip_norm: float = option(0.0, "clip the gradient norm to this; 0 = off")
    precision: str = option("bf16", "bf16 autocast on a GPU (CPU runs are fp32 either way)", choices=("bf16", "fp32"))
    grad_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    compile: bool = option(False, "torch.compile the model")
    # data
    crop_scale_min: float = option(0.9, "RandomResizedCrop keeps at least this fraction of the image")
    face_crop_bias: float = option(0.0, "probability that a crop is chosen to contain a stored face box; 0 = off")
    loader_workers: int = option(4, "DataLoader worker processes per training worker")
    shuffle_buffer: int = option(1000, "samples in each loader worker's shuffle buffer")
    resampled: bool = option(True, "draw shards with replacement per rank (needed when shards < ranks x loader workers)")
    seed: int = option(0, "random seed")
    holdout: str = option("", "a `pipeline.subset --holdout` output: its samples are never trained on, and image<->text "
                              "retrieval recall on them is logged as heldout_* (see train.retrieval)")
    eval_every: int = option(1000, "with --holdout: measure the retrieval recall every this many steps (and at the end)")
    eval_samples: int = option(1000, "with --holdout: pairs to rank among (the first of its shards)")
    # running
    workers: int = option(0, "0 = one process without Ray (debugging); N = Ray Train with N workers (DDP)")
    gpu: bool = option(False, "each Ray worker takes a GPU (nccl); one-process runs use CUDA whenever present")
    cpus_per_worker: float = option(1.0, "CPUs Ray reserves per training worker")
    address: str = option("", "join this Ray cluster (host:port or 'auto'); empty = Ray's own choice: "
                              "RAY_ADDRESS, else a cluster `ray start` began on this machine, else a new local instance")
    max_failures: int = option(3, "Ray runs: times Ray Train restarts the workers from the last checkpoint after a "
                                  "worker or its node dies; 0 = the first failure ends the run (nodes the autoscaler "
                                  "drains as preempted are retried without limit, as Ray Train counts them apart)")
    checkpoint_every: int = option(1000, "write a checkpoint every this many steps (and at the end)")
    log_every: int = option(10, "write metrics every this many steps")
    progress: bool = option(True, "progress bar with images/s and losses")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("--data is required: the builder's output folder or a shard pattern")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be at least 1, got {getattr(self, name)}")
        if self.workers < 0 or self.loader_workers < 0 or self.max_failures < 0:
            raise ConfigError("workers, loader_workers and max_failures must not be negative")
        if self.workers > 1 and not self.resampled:
            raise ConfigError("--no-resampled with several workers gives ranks unequal batches, which DDP cannot "
                              "gather: keep resampled shards for distributed runs")
        if self.holdout and self.eval_samples < 2:
            raise ConfigError(f"eval_samples must be at least 2 (pairs to rank among), got {self.eval_samples}")
        if not 0 < self.crop_scale_min <= 1 or not 0 <= self.face_crop_bias <= 1:
            raise ConfigError("crop_scale_min must be in (0, 1] and face_crop_bias in [0, 1]")
