"""Pre-training step speed: open_clip's own training step vs ours with MIM off vs ours with MIM on.

    python -m bench.train_speed --model FaRL-tiny --batch-size 32 --steps 20 [--device cuda] [--precision bf16] [--compile]
        [--compile-mode max-autotune-no-cudagraphs] [--adamw {own,fused,foreach}] [--eager-loss] [--profile DIR]

  (A) open_clip   open_clip_train.train.train_one_epoch itself, with the `args` fields it reads set
                  as open_clip's main sets them for one process, open_clip.model.CLIP(output_dict=True),
                  open_clip.loss.ClipLoss, AdamW grouped as main.py groups it, cosine_lr.
  (B) ours        train.pretraining.engine.train_step (the loop body of train.pretraining.engine.train) on FaRL without the
                  MIM branch: FaRLLoss (targets None), engine.param_groups, AdamW, cosine_lr.
  (C) ours + MIM  the same with the MIM branch, pixel targets and BEiT block masks.

All three start from the same weights, see the same in-memory batches (already on the device, so
data loading is measured for none of them) and use bf16 autocast only on CUDA, as engine.train
does (a CPU run is fp32 for all three). Each round times --steps steps of A, then B, then C (wall
clock, CUDA synchronised around each run), after --warmup steps each; medians over --rounds
rounds, and ratios from the times of the same round, since a shared machine drifts between rounds.
FLOPs: torch.utils.flop_counter.FlopCounterMode around one step of each (forward + backward;
matmuls, convolutions and attention, i.e. model FLOPs). MFU = FLOPs/step x steps/s / --peak-tflops.
--profile DIR writes, per contender, torch.profiler's operators by device time over a few steps
and how much of the wall time the device was busy: where a step below the MFU target spends it.
Results and analysis: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from open_clip_train.data import DataInfo
from open_clip_train.scheduler import cosine_lr
from open_clip_train.train import train_one_epoch
from torch.utils import flop_counter

from bench.machine_load import DISTURBED, cpu_jiffies
from train.pretraining import engine
from train.pretraining.losses import FaRLLoss
from train.pretraining.masking import BlockMaskGenerator
from train.model import MIM_KEYS, FaRL, model_config
from train.pretraining.pretrain_config import PretrainConfig
from train.pretraining.targets import PixelTargets

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
TARGETS = {"ours_over_open_clip": 0.95, "mim_over_no_mim": 2.1, "mfu": 0.40}
MASKS = {196: (75, 16), 64: (24, 4)}  # patches: (masked, smallest block); BEiT/FaRL's 75 of 196, scaled for 8 x 8
CFG = PretrainConfig()  # optimiser settings and MIM depth: the pre-training defaults, for all three

# FlopCounterMode has no formula for the CPU flash-attention kernel that SDPA picks on the CPU, so
# attention would be missing from CPU counts; its shapes are those of the CUDA kernels it counts.
flop_counter.flop_registry.setdefault(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                                      flop_counter.sdpa_flop)
flop_counter.flop_registry.setdefault(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
                                      flop_counter.sdpa_backward_flop)


def make_batches(model: FaRL, batch_size: int, count: int, masks: tuple[int, int], device: torch.device) -> list[Batch]:
    """`count` fixed batches: CLIP-normalised noise images, tokenized captions, BEiT masks (B, N)."""
    size = model.config["model"]["vision_cfg"]["image_size"]
    generator = torch.Generator().manual_seed(0)
    mask_fn = BlockMaskGenerator(model.grid, masks[0], masks[1], min_aspect=CFG.mask_min_aspect)
    rng = np.random.default_rng(0)
    out = []
    for b in range(count):
        images = torch.randn(batch_size, 3, size, size, generator=generator)
        # Text cost does not depend on the words (the tower always runs all 77 positions).
        tokens = open_clip.tokenize([f"a photo of person {b * batch_size + i} smiling" for i in range(batch_size)])
        mask = torch.from_numpy(np.stack([mask_fn(rng).reshape(-1) for _ in range(batch_size)]))
        out.append((images.to(device), tokens.to(device), mask.to(device)))
    return out


ADAMW = "own"  # --adamw: each trainer's own AdamW (open_clip: torch's default, multi-tensor; ours:
# engine.make_optimizer, fused on CUDA), or the fused / multi-tensor (foreach) kernel for all


def adamw(groups: list[dict], own_fused: bool = False) -> torch.optim.AdamW:
    fused = {"own": own_fused or None, "fused": True, "foreach": None}[ADAMW]
    return torch.optim.AdamW(groups, lr=CFG.lr, betas=(CFG.beta1, CFG.beta2), eps=CFG.eps, fused=fused)


COMPILE_LOSS = True  # --eager-loss: compile our model only, as engine.train did before


class FixedLoader:
    """What train_one_epoch reads of a DataLoader: iteration over (images, texts), num_batches, num_samples."""

    def __init__(self, batches: list[Batch], steps: int):
        self.batches, self.num_batches = batches, steps
        self.num_samples = steps * len(batches[0][0])

    def __iter__(self):
        return (self.batches[i % len(self.batches)][:2] for i in range(self.num_batches))


class OpenClipStep:
    """(A): `run(n)` is one call of open_clip's train_one_epoch over n fixed batches."""

    def __init__(self, state: dict[str, torch.Tensor], name: str, batches: list[Batch], device: torch.device,
                 precision: str, total_steps: int):
        self.model = CLIP(**model_config(name), output_dict=True)  # main's create_model sets output_dict
        self.model.load_state_dict(state)
        self.model.to(device)
        # open_clip's main: no weight decay where p.ndim < 2 or the name has bn, ln, bias or logit_scale.
        exempt = [p for n, p in self.model.named_parameters()
                  if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
        ids = {id(p) for p in exempt}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        self.optimizer = adamw([{"params": exempt, "weight_decay": 0.0},
                                {"params": rest, "weight_decay": CFG.weight_decay}])
        self.scheduler = cosine_lr(self.optimizer, CFG.lr, CFG.warmup_steps, total_steps)
        self.loss = ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
        # "amp_bf16" is open_clip's name for bf16 autocast over fp32 weights, what engine.train does on CUDA.
        self.args = SimpleNamespace(
            device=str(device), precision="amp_bf16" if precision == "bf16" and device.type == "cuda" else "fp32",
            distill=False, accum_freq=1, skip_scheduler=False, horovod=False, grad_clip_norm=None,
            world_size=1, batch_size=len(batches[0][0]), wandb=False, log_every_n_steps=100,
            # rank 1: is_master() gates only the logging, whose .item() syncs and log lines our timed loop
            # does not have either; rank is read for nothing else in train_one_epoch.
            rank=1, local_rank=1)
        self.batches, self.epoch, self.wrapped = batches, 0, self.model

    def compile(self, mode: str | None = None) -> None:
        self.wrapped = torch.compile(self.model, mode=mode)  # open_clip's main with --torchcompile

    def run(self, steps: int) -> None:
        # train_one_epoch's scheduler step is epoch x batches + i: off after calls of other lengths, which
        # changes the learning rate's value, not the work.
        data = {"train": DataInfo(FixedLoader(self.batches, steps))}
        train_one_epoch(self.wrapped, data, self.loss, self.epoch, self.optimizer, None, self.scheduler, None, self.args)
        self.epoch += 1


class OurStep:
    """(B) and (C): engine.train's loop body (set the learning rate, train_step) over fixed batches."""

    def __init__(self, state: dict[str, torch.Tensor], name: str, mim: bool, batches: list[Batch],
                 device: torch.device, precision: str, total_steps: int):
        model_cfg = model_config(name)
        patch = model_cfg["vision_cfg"]["patch_size"]
        self.targets = PixelTargets(patch) if mim else None
        self.model = FaRL(model_cfg, {"depth": CFG.mim_depth, "vocab": PixelTargets(patch).vocab} if mim else None)
        missing, unexpected = self.model.clip.load_state_dict(state, strict=False)
        assert not unexpected and all(MIM_KEYS.match(k) for k in missing), (missing, unexpected)
        self.model.to(device)
        self.optimizer = adamw(engine.param_groups(self.model, CFG.weight_decay), own_fused=device.type == "cuda")
        self.set_lr = cosine_lr(self.optimizer, CFG.lr, CFG.warmup_steps, total_steps)
        self.loss_fn = FaRLLoss(self.targets, CFG.contrastive_weight, CFG.mim_weight)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=device.type == "cuda" and precision == "bf16")
        self.batches, self.mim, self.step, self.wrapped = batches, mim, 0, self.model
        self.model.train()

    def compile(self, mode: str | None = None) -> None:
        self.wrapped, self.loss_fn = engine.compiled(self.model, self.loss_fn, mode, loss=COMPILE_LOSS)  # as engine.train

    def run(self, steps: int) -> None:
        for _ in range(steps):
            images, tokens, mask = self.batches[self.step % len(self.batches)]
            self.set_lr(self.step)
            engine.train_step(self.model, self.wrapped, self.loss_fn, self.optimizer,
                              (images, tokens, mask if self.mim else None), self.autocast, CFG.grad_clip_norm)
            self.step += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_seconds() -> float:
    """CPU-seconds all CPUs of the machine have been busy since boot."""
    return cpu_jiffies()[0] / os.sysconf("SC_CLK_TCK")


def watched(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds of fn(), share of the machine's CPU time that other processes took meanwhile)."""
    busy, own, start = busy_seconds(), time.process_time(), time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, max(0.0, busy_seconds() - busy - (time.process_time() - own)) / (seconds * (os.cpu_count() or 1))


def measure(run: Callable[[int], None], steps: int, device: torch.device, retries: int,
            idle_wait: float) -> tuple[float, float]:
    """(seconds, others' share) of `steps` steps. The dev box is shared (test suites, Ray), and two busy
    torch threads on 2 cores slow down many-fold next to any other job: each attempt waits (up to
    idle_wait) for idle CPUs, one disturbed by others is repeated, and the least disturbed is kept."""
    best = (math.inf, math.inf)
    for _ in range(retries + 1):
        deadline = time.monotonic() + idle_wait
        while time.monotonic() < deadline and watched(lambda: time.sleep(1.0))[1] > DISTURBED:
            pass
        attempt = watched(lambda: (sync(device), run(steps), sync(device)))
        best = min(best, attempt, key=lambda t: t[1])
        if attempt[1] <= DISTURBED:
            break
    return best


def step_flops(run: Callable[[int], None]) -> int:
    with flop_counter.FlopCounterMode(display=False) as counter:
        run(1)
    return counter.get_total_flops()


def profile(run: Callable[[int], None], steps: int, device: torch.device, path: str) -> str:
    """Profile `steps` steps; writes the operators by self device time to path, returns a one-line summary."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        run(steps)
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    # kernels only: a CPU operator's self device time repeats that of the kernels it launched
    busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(events.table(sort_by=sort, row_limit=50, max_name_column_width=90))
    # with the profiler's overhead on the host, the device share is a lower bound
    return (f"{steps} steps in {wall:.3f} s under the profiler; device busy {busy:.3f} s ({busy / wall:.0%})"
            if device.type == "cuda" else f"{steps} steps in {wall:.3f} s under the profiler")


def machine(device: torch.device) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return (f"{where}; torch {torch.__version__}, open_clip {open_clip.__version__}, Python {platform.python_version()}; "
            f"commit {commit or '?'}")


def report(args: argparse.Namespace, names: dict[str, str], times: dict[str, list[float]],
           others: dict[str, list[float]], flops: dict[str, int], peak: float) -> None:
    print(f"\n{args.model}, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds after {args.warmup} warm-up; "
          f"{args.device}, {'bf16 autocast' if args.device.startswith('cuda') and args.precision == 'bf16' else 'fp32'}"
          f"{', torch.compile' if args.compile else ''}{f' ({args.compile_mode})' if args.compile_mode else ''}"
          f", AdamW: {args.adamw}{', our loss eager' if args.eager_loss else ''}")
    print(f"{machine(torch.device(args.device))}\n")
    print("| step | s/step (median) | min - max | **images/s** | GFLOP/step | TFLOP/s | MFU | others' CPU share (max) |")
    print("|---|---|---|---|---|---|---|---|")
    for key, values in times.items():
        tflops = flops[key] / statistics.median(values) / 1e12
        print(f"| ({key}) {names[key]} | {statistics.median(values):.4f} | {min(values):.4f} - {max(values):.4f} | "
              f"**{args.batch_size / statistics.median(values):.1f}** | {flops[key] / 1e9:.1f} | {tflops:.3f} | "
              f"{f'{tflops / peak:.1%}' if peak else '-'} | {max(others[key]):.0%} |")
    print()
    # Ratios per round (runs next to each other in time), then their median.
    checks = [("A", "B", "ours / open_clip throughput", TARGETS["ours_over_open_clip"], ">="),
              ("C", "B", "MIM-on / MIM-off step time", TARGETS["mim_over_no_mim"], "<=")]
    for num, den, label, target, op in checks:
        if num in times and den in times:
            values = [n / d for n, d in zip(times[num], times[den])]
            median = statistics.median(values)
            met = median >= target if op == ">=" else median <= target
            print(f"{label}: median {median:.3f} (rounds: {', '.join(f'{v:.3f}' for v in values)}); "
                  f"target {op} {target}: {'met' if met else 'MISSED'}")
    for key in [k for k in "BC" if k in times and peak]:
        mfu = flops[key] / statistics.median(times[key]) / 1e12 / peak
        print(f"MFU of ({key}) at {peak:g} TFLOP/s peak: {mfu:.1%}; target >= {TARGETS['mfu']:.0%}: "
              f"{'met' if mfu >= TARGETS['mfu'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="FaRL-tiny", help="FaRL-tiny or an open_clip name, e.g. ViT-B-16-quickgelu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="bf16 autocast on CUDA only, as engine.train")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU; default 989 (H200 bf16 dense) on CUDA")
    p.add_argument("--retries", type=int, default=3, help="re-runs of a run that others disturbed")
    p.add_argument("--idle-wait", type=float, default=60, help="seconds to wait for idle CPUs before a run")
    p.add_argument("--only", default="ABC", help="contenders to run, e.g. AB")
    p.add_argument("--compile", action="store_true", help="torch.compile all of them (FLOPs are counted eager, first)")
    p.add_argument("--compile-mode", default=None, help="torch.compile's mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--adamw", default="own", choices=("own", "fused", "foreach"),
                   help="each trainer's own AdamW (ours: fused on CUDA), or one kernel for all")
    p.add_argument("--eager-loss", action="store_true", help="with --compile: compile our model only, not our loss")
    p.add_argument("--out", metavar="FILE", help="also write each contender's images/s, GFLOP per image and MFU as JSON lines")
    p.add_argument("--profile", metavar="DIR", help="after timing, profile 5 steps of each: DIR/profile_<key>.txt")
    args = p.parse_args(argv)
    global ADAMW, COMPILE_LOSS
    ADAMW, COMPILE_LOSS = args.adamw, not args.eager_loss
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = FaRL(model_config(args.model))
    state = {k: v.clone() for k, v in reference.clip.state_dict().items()}
    grid = reference.grid[0] * reference.grid[1]
    masks = MASKS.get(grid) or (round(grid * 75 / 196), max(1, round(grid * 16 / 196)))
    batches = make_batches(reference, args.batch_size, min(args.steps, 4), masks, device)
    total = args.warmup + 1 + args.rounds * args.steps
    names = {"A": "open_clip train_one_epoch", "B": "ours, MIM off", "C": f"ours, MIM on ({masks[0]}/{grid} masked)"}
    steps = {key: OpenClipStep(state, args.model, batches, device, args.precision, total) if key == "A" else
             OurStep(state, args.model, key == "C", batches, device, args.precision, total) for key in args.only}
    runs = {key: step.run for key, step in steps.items()}
    flops = {key: step_flops(run) for key, run in runs.items()}
    if args.compile:
        for step in steps.values():
            step.compile(args.compile_mode)
    for run in runs.values():
        run(args.warmup)
    times: dict[str, list[float]] = {key: [] for key in runs}
    others: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):  # A, B, C, A, B, C, ...
        for key, run in runs.items():
            seconds, share = measure(run, args.steps, device, args.retries, args.idle_wait)
            times[key].append(seconds / args.steps)
            others[key].append(share)
    peak = args.peak_tflops or (989.0 if device.type == "cuda" else 0.0)
    report(args, names, times, others, flops, peak)
    if args.out:
        with open(args.out, "w") as f:
            for key, values in times.items():
                seconds = statistics.median(values)
                f.write(json.dumps({"step": key, "batch": args.batch_size, "images_per_s": args.batch_size / seconds,
                                    "gflop_per_image": flops[key] / args.batch_size / 1e9,
                                    "mfu": flops[key] / seconds / 1e12 / peak if peak else None}) + "\n")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        for key, run in runs.items():
            path = os.path.join(args.profile, f"profile_{key}.txt")
            print(f"profile of ({key}): {profile(run, 5, device, path)}; operators in {path}")


if __name__ == "__main__":
    main()
