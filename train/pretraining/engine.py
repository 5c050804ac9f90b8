"""The pre-training loop, the same in one process and in each Ray Train worker: one screen to read.

Per step: a batch (images, tokens, block masks), one forward of the clean and masked copies,
the contrastive and MIM losses, AdamW, the logit scale clamped at log(100). Around it:
resume from OUTPUT/checkpoints/latest.json, checkpoints every `checkpoint_every` steps, metrics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from open_clip_train.scheduler import cosine_lr
from torch import nn

from train.pretraining.checkpoints import Checkpoints, Resumed, init_weights
from train.pretraining.data import LoaderConfig, make_loader
from train.pretraining.losses import FaRLLoss
from train.pretraining.masking import BlockMaskGenerator
from train.pretraining.metrics_log import MetricsLog
from train.model import FaRL, model_config
from train.pretraining.pretrain_config import PretrainConfig
from train.pretraining.heldout import evaluate, held_out_keys, load_pairs
from train.pretraining.targets import Targets, make_targets

log = logging.getLogger("train")
MAX_LOGIT_SCALE = math.log(100)


@dataclass
class Worker:
    """Where this copy of the loop runs: rank, world size, device, how to wrap the model (DDP), and
    where rank 0's metrics go (train.pretraining.metrics_log.MetricsFiles, an actor in Ray runs; None: LOG_DIR here)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    wrap: Callable[[nn.Module], nn.Module] = lambda model: model
    metrics_files: Any = None


def build_model(cfg: PretrainConfig, targets: Targets | None, with_init: bool = True) -> FaRL:
    """The run's model: random, or from `cfg.init`; with a MIM head as wide as the targets need.
    A resumed run passes with_init=False: its checkpoint replaces every weight anyway."""
    mim = {"depth": cfg.mim_depth, "vocab": targets.vocab} if targets is not None else None
    model = FaRL(model_config(cfg.model), mim)
    if cfg.init and with_init:
        init_weights(model, cfg.init)
    return model


def build_targets(cfg: PretrainConfig) -> Targets | None:
    if not cfg.mim:
        return None
    return make_targets(cfg.mim_target, model_config(cfg.model)["vision_cfg"]["patch_size"], cfg.dalle_encoder)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, embeddings, the mask token and the temperature."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embedding" in name or name.endswith(("mask_token", "logit_scale"))
        (no_decay if exempt else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@dataclass
class DataPosition:
    """Where the data stream stands after the batches trained on: the epoch, and the samples each
    loader worker has drawn in it (see train.pretraining.data.make_loader). Saved with every checkpoint, so a
    resumed one-pass run goes on with the epoch where it stopped, each sample seen once per epoch."""

    epoch: int = 0
    drawn: list[int] = field(default_factory=list)

    def advance(self, batch: dict[str, torch.Tensor]) -> None:
        worker, drawn = batch["position"].tolist()
        self.drawn += [0] * (worker + 1 - len(self.drawn))
        self.drawn[worker] = drawn


def batches(cfg: PretrainConfig, model: FaRL, position: DataPosition) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches from `position` on, which is kept up to date with each batch handed out:
    resampled loaders never end; one-pass loaders start the next epoch."""
    mask_fn = None
    if cfg.mim:
        mask_fn = BlockMaskGenerator(model.grid, cfg.mask_patches, cfg.mask_min_patches,
                                     min_aspect=cfg.mask_min_aspect)
    vision, text = model.config["model"]["vision_cfg"], model.config["model"]["text_cfg"]
    loader_config = LoaderConfig(
        batch_size=cfg.batch_size, image_size=vision["image_size"], crop_scale=(cfg.crop_scale_min, 1.0),
        face_crop_bias=cfg.face_crop_bias, workers=cfg.loader_workers, shuffle_buffer=cfg.shuffle_buffer,
        resampled=cfg.resampled, seed=cfg.seed, context_length=text["context_length"],
        exclude_keys=held_out_keys(cfg.holdout) if cfg.holdout else frozenset())
    while True:
        for batch in make_loader(cfg.data, loader_config, mask_fn, epoch=position.epoch, start=position.drawn):
            position.advance(batch)
            yield batch
        position.epoch, position.drawn = position.epoch + 1, []


def stream_settings(cfg: PretrainConfig) -> dict[str, object]:
    """What decides which samples each loader worker draws in an epoch."""
    return {"data": cfg.data, "resampled": cfg.resampled, "loader_workers": cfg.loader_workers,
            "shuffle_buffer": cfg.shuffle_buffer, "seed": cfg.seed,
            "holdout": cfg.holdout or None}  # None: as checkpoints from before --holdout have it


def start_position(cfg: PretrainConfig, resumed: Resumed | None) -> DataPosition:
    """A resampled stream has no place to go back to: a resumed run draws a freshly seeded one
    (epoch = its step). A resumed one-pass run goes on from the checkpoint's position."""
    if resumed is None:
        return DataPosition()
    if cfg.resampled:
        return DataPosition(epoch=resumed.step)
    saved = resumed.data or {}
    position = DataPosition(saved.get("epoch", 0), saved.get("drawn", []))
    changed = [f"{k} {saved.get(k)} -> {v}" for k, v in stream_settings(cfg).items() if saved.get(k) != v]
    if position.drawn and changed:
        log.warning("one-pass data: epoch %d starts again from its beginning, since the checkpoint's place in it "
                    "does not hold after a change of %s", position.epoch, ", ".join(changed))
        return DataPosition(position.epoch)
    log.info("one-pass data: epoch %d goes on after the %d samples already drawn", position.epoch, sum(position.drawn))
    return position


def make_optimizer(cfg: PretrainConfig, model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`; on a GPU torch's fused kernel, one launch for all 150 M weights of
    ViT-B/16 instead of a few hundred (docs/PERFORMANCE.md, "GPU: H200 pre-training and fine-tuning")."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=True if device.type == "cuda" else None)


def compiled(wrapped: nn.Module, loss_fn: FaRLLoss, mode: str | None = None,
             loss: bool = True) -> tuple[nn.Module, nn.Module]:
    """torch.compile of the model and, unless loss=False, of the loss: the MIM loss's pixel targets
    and masked mean are element-wise work over every patch, which compiles into a few fused kernels."""
    return torch.compile(wrapped, mode=mode), torch.compile(loss_fn, mode=mode) if loss else loss_fn


def train_step(model: FaRL, wrapped: nn.Module, loss_fn: FaRLLoss, optimizer: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], autocast: torch.autocast,
               grad_clip_norm: float = 0.0) -> dict[str, torch.Tensor]:
    """One optimizer step on (images, tokens, mask); `wrapped` is `model` as DDP or torch.compile wrap it."""
    images, tokens, mask = batch
    with autocast:
        losses = loss_fn(wrapped(images, tokens, mask), images, mask)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    with torch.no_grad():
        model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)  # CLIP's temperature cap, after every step
    return losses


def train(cfg: PretrainConfig, worker: Worker = Worker()) -> dict[str, float]:
    """Run (or resume) to `cfg.steps` optimizer steps; returns the last logged metrics."""
    torch.manual_seed(cfg.seed + worker.rank)
    if worker.device.type == "cuda":  # as open_clip's trainer: TF32 matmuls for what runs outside bf16 autocast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    checkpoints = Checkpoints(cfg.output, writer=worker.rank == 0)
    step, resumed = 0, checkpoints.latest()
    targets = build_targets(cfg)
    model = build_model(cfg, targets, with_init=resumed is None)
    if worker.world_size > 1:  # a rank that sees another checkpoint would run other steps and hang the rest
        seen = [None] * worker.world_size
        dist.all_gather_object(seen, resumed.step if resumed else 0)
        if len(set(seen)) > 1:
            raise RuntimeError(f"the ranks see different checkpoints in {cfg.output} (steps {seen}): "
                               "give an output every node shares (s3://, gs://, a shared file system)")
    if resumed:
        step = resumed.step
        model.clip.load_state_dict(resumed.state_dict)
        log.info("resuming from step %d (%s)", step, resumed.path)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing()
    model.to(worker.device)
    if targets is not None:
        targets.to(worker.device)
    optimizer = make_optimizer(cfg, model, worker.device)
    if resumed:
        optimizer.load_state_dict(resumed.optimizer)
        fused = optimizer.defaults["fused"]  # this device's kernel: a run may resume on another kind of machine
        for group, decay in zip(optimizer.param_groups, (0.0, cfg.weight_decay)):  # this run's settings, not the saved ones
            group.update(weight_decay=decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    wrapped = worker.wrap(model)
    loss_fn = FaRLLoss(targets, cfg.contrastive_weight, cfg.mim_weight, worker.rank, worker.world_size)
    if cfg.compile:
        wrapped, loss_fn = compiled(wrapped, loss_fn)
    set_lr = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, cfg.steps)
    autocast = torch.autocast(worker.device.type, dtype=torch.bfloat16,
                              enabled=worker.device.type == "cuda" and cfg.precision == "bf16")
    metrics_log = MetricsLog(cfg, worker.rank, start_step=step, world_size=worker.world_size,
                             files=worker.metrics_files)
    if metrics_log.attempt > 1:  # Ray Train started this group again (train.pretrain.run_on_ray)
        log.info("restarted after a worker failure (attempt %d, --max-failures %d): resuming from step %d",
                 metrics_log.attempt, cfg.max_failures, step)
    position = start_position(cfg, resumed)
    data = batches(cfg, model, position)
    held_out = held_out_retrieval(cfg, model, worker, autocast)
    last: dict[str, float] = {}
    skipped = 0  # samples this rank's loader skipped as corrupt
    wrapped.train()
    while step < cfg.steps:
        batch = next(data)
        images = batch["image"].to(worker.device, non_blocking=True)
        tokens = batch["text"].to(worker.device, non_blocking=True)
        mask = batch["mask"].to(worker.device, non_blocking=True) if cfg.mim else None
        lr = set_lr(step)
        losses = train_step(model, wrapped, loss_fn, optimizer, (images, tokens, mask), autocast, cfg.grad_clip_norm)
        step += 1
        skipped += int(batch["skipped"])
        evaluating = bool(cfg.holdout) and (step % cfg.eval_every == 0 or step == cfg.steps)
        if step % cfg.log_every == 0 or step == cfg.steps or evaluating:  # the same steps on every rank
            values = reduce(losses, skipped, worker)
            if not cfg.resampled:  # a one-pass run counts its passes over the data
                values["epoch"] = position.epoch
            if evaluating and held_out is not None:
                values.update(held_out())
            last = metrics_log.write(step, lr, model.clip.logit_scale.exp().item(), values)
        if worker.rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            metrics_log.flush()
            checkpoints.save(step, model, optimizer, data={**asdict(position), **stream_settings(cfg)})
    metrics_log.close()
    return last


def held_out_retrieval(cfg: PretrainConfig, model: FaRL, worker: Worker,
                       autocast: torch.autocast) -> Callable[[], dict[str, float]] | None:
    """Rank 0's health metric: recall@K on the --holdout pairs (loaded once), as heldout_* values.
    The other ranks do not wait for it beyond their next gradient all-reduce."""
    if not cfg.holdout or worker.rank != 0:
        return None
    vision, text = model.config["model"]["vision_cfg"], model.config["model"]["text_cfg"]
    pairs = load_pairs(cfg.holdout, cfg.eval_samples, vision["image_size"], text["context_length"])
    log.info("held out: %d image-text pairs from %s for the retrieval recall", len(pairs.captions), cfg.holdout)

    def measure() -> dict[str, float]:
        recall = evaluate(model, pairs, worker.device, cfg.batch_size, autocast)
        return {f"heldout_{name}": value for name, value in recall.items()}
    return measure


def reduce(losses: dict[str, torch.Tensor], skipped: int, worker: Worker) -> dict[str, float]:
    """Losses averaged and skipped samples summed over the ranks (every rank calls this at the same steps)."""
    names = sorted(losses)
    values = torch.stack([losses[n].detach().float().cpu() for n in names] + [torch.tensor(float(skipped))])
    if worker.world_size > 1:
        values = values.to(worker.device)
        dist.all_reduce(values)
        values[:-1] /= worker.world_size
    reduced = dict(zip(names, values[:-1].tolist()))
    reduced["skipped_samples"] = int(values[-1].item())
    return reduced

