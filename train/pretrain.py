"""`python -m train.pretrain`: FaRL pre-training (contrastive + MIM) on the builder's shards.

    python -m train.pretrain --config configs/pretrain_tiny.yaml --data out/demo --output out/pretrain-tiny
    python -m train.pretrain --config configs/pretrain_vitb16.yaml --data s3://bucket/laion-face/shards \\
        --output s3://bucket/farl --log-dir logs/farl --workers 32 --gpu --address auto

Without --workers the loop runs in this process (debugging); with --workers N it runs in N Ray
Train workers (DDP: gloo on CPUs, nccl on GPUs). Rerunning the same command after a kill resumes
from the last checkpoint in OUTPUT/checkpoints/; when a Ray worker or its node dies, Ray Train
starts the group again (up to --max-failures times) and it resumes the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import torch

from pipeline.config import ConfigError, load_config
from train.pretraining.data import expand_shards
from train.pretraining.engine import Worker, build_model, build_targets, train
from train.pretraining.masking import BlockMaskGenerator
from train.pretraining.metrics_log import MetricsFiles, log_folder
from train.model import model_config
from train.pretraining.pretrain_config import PretrainConfig
from train.pretraining.heldout import held_out_keys

log = logging.getLogger("train")


def check_inputs(cfg: PretrainConfig) -> None:
    """Fail before anything is written: the shards (and held-out ones) exist, metrics have a local folder, the masks fit
    the model's grid; for Ray runs also the init file and the MIM target load, before any worker
    starts (a one-process run loads them once, in `train`, before it writes anything)."""
    expand_shards(cfg.data)
    if cfg.holdout:
        held_out_keys(cfg.holdout)
        expand_shards(cfg.holdout)
    log_folder(cfg)
    vision = model_config(cfg.model)["vision_cfg"]
    if cfg.mim:
        grid = (vision["image_size"] // vision["patch_size"],) * 2
        BlockMaskGenerator(grid, cfg.mask_patches, cfg.mask_min_patches, min_aspect=cfg.mask_min_aspect)
    if cfg.workers:
        build_model(cfg, build_targets(cfg))


def ray_worker(config: dict) -> None:
    """One Ray Train worker: Ray has set up torch.distributed; prepare_model moves and wraps in DDP."""
    import ray.train
    import ray.train.torch

    setup_logging()
    context = ray.train.get_context()
    worker = Worker(rank=context.get_world_rank(), world_size=context.get_world_size(),
                    device=ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model,
                    metrics_files=config["metrics_files"])
    train(PretrainConfig(**config["cfg"]), worker)


def absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """Local paths made absolute: Ray workers run in folders of their own."""
    def fix(value: str) -> str:
        return value if not value or "://" in value else os.path.abspath(value)
    return dataclasses.replace(cfg, data=fix(cfg.data), output=fix(cfg.output), log_dir=fix(cfg.log_dir),
                               init=fix(cfg.init), dalle_encoder=fix(cfg.dalle_encoder),
                               holdout=fix(cfg.holdout))


def run_on_ray(cfg: PretrainConfig) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=cfg.address or None, logging_level=logging.WARNING)
    cfg = absolute_paths(cfg)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    metrics_files = ray.remote(MetricsFiles).options(num_cpus=0, scheduling_strategy=here).remote(str(log_folder(cfg)))
    trainer = TorchTrainer(
        ray_worker, train_loop_config={"cfg": dataclasses.asdict(cfg), "metrics_files": metrics_files},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})}),
        # A restarted group calls ray_worker again with the same config: `train` resumes from OUTPUT's
        # latest checkpoint (Ray Train's own checkpoints are not used), the actor keeps the metrics.
        run_config=RunConfig(name="farl-pretrain", failure_config=FailureConfig(max_failures=cfg.max_failures)))
    try:
        trainer.fit()
    except TrainingFailedError as err:  # the workers' tracebacks are in the log above; one line here
        raise RuntimeError(f"training failed in a Ray worker: {str(err).strip().splitlines()[-1]}") from None
    finally:
        try:
            ray.get(metrics_files.close.remote())
        except ray.exceptions.RayActorError:  # gone with its node: what it wrote stays, and the error above counts
            pass


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # quiet libraries (open_clip logs at INFO)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg = load_config(PretrainConfig, argv, "FaRL pre-training: image-text contrastive + masked image modeling.")
        check_inputs(cfg)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if cfg.workers:
            run_on_ray(cfg)
        else:
            train(cfg, Worker(device=torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    except ValueError as err:  # a bad init file or DALL-E encoder, found when train builds the model
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log.info("done: %d steps, checkpoints in %s/checkpoints", cfg.steps, cfg.output.rstrip("/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
