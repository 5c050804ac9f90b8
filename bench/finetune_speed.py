"""Fine-tuning speed on the GPU: one short `train.finetune` run per task family on synthetic data.

    python -m bench.finetune_speed --device cuda --out DIR [--parsing celebamask_hq|lapa] [--alignment wflw]
        [--train-images 480] [--eval-images 40] [--epochs 2] [--workers N] [--precision bf16] [--init FILE]
    python -m bench.finetune_speed --device cpu --out DIR --quick      # tiny model and sizes: the script itself

Per task (parsing, alignment), standalone (no Ray, no network):
 1. writes a synthetic dataset in the benchmark's official layout (train.downstream.datasets.synthetic) into a
    temporary folder: --train-images training images and --eval-images each for validation (LaPa,
    CelebAMask-HQ) and test, at the real images' sizes (CelebAMask-HQ 1024 px with 512 px masks,
    LaPa 640 px, WFLW 1024 x 768 photos, one face each), with a noise texture so JPEG decoding
    costs about what photographs cost;
 2. runs train.finetune (its `main`, in this process) with configs/finetune_DATASET.yaml and
    --epochs --precision --workers --eval-every EPOCHS (evaluation at the end only), random
    initialisation unless --init, the config's batch size unless --batch-size. images_per_s: the
    training steps of every epoch after its first one (which waits for the loader's start-up), as
    train.finetune writes them into metrics.jsonl; in epochs this short the workers' prefetch
    covers them, so this is the model's pace. loader_images_per_s: the same DataLoader alone,
    sustained (batches drawn with replacement, timed after the prefetched ones). A real run goes at
    the slower of the two: expected_images_per_s, and `bound` says which. peak_mem_gib:
    torch.cuda.max_memory_allocated over the run (training and the final evaluation);
 3. reruns the same command with one more epoch: resume_ok when it says it resumes from last.pt and
    the metrics of the first epochs are kept; then `python -m train.evaluate` on last.pt (the test
    split): eval_ok when it exits 0 with finite metrics (eval_metrics: mean F1, or WFLW's full-set
    NME, AUC and FR; meaningless numbers of a barely trained model on synthetic faces);
 4. prints one JSON line per task and writes the list to DIR/finetune_speed.json, with gpu_hours for
    every dataset of the task's family: train_images x epochs / expected_images_per_s (300 epochs,
    and the protocol's: 300 parsing, 250 300W, 150 WFLW and AFLW-19), training steps only, not the
    per-epoch validation and test evaluation nor checkpoint writes; the other datasets of a family
    are assumed to train at the measured one's pace (same network and input size; their loaders
    differ). A table of them goes to stderr. Logs of the runs: DIR/DATASET.log. Exit 0 when every
    task resumed and evaluated.

--quick: FaRL-tiny at 64 px, batch 3, a dozen small images: checks the script, measures nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# training-split sizes (the dataset readers' docstrings, train/downstream/datasets/): what the paper trained on
TRAIN_IMAGES = {"celebamask_hq": 24183, "lapa": 18176, "300w": 3148, "wflw": 7500, "aflw19": 20000}
FAMILIES = {"parsing": ("celebamask_hq", "lapa"), "alignment": ("300w", "wflw", "aflw19")}
QUICK_MODEL = ["--model", "FaRL-tiny", "--warp-size", "64", "--input-size", "64", "--head-channels", "16",
               "--feature-blocks", "0", "--feature-blocks", "0", "--feature-blocks", "1", "--feature-blocks", "1",
               "--heatmap-size", "16", "--batch-size", "3"]


def build(dataset: str, root: Path, train: int, evaluation: int, quick: bool) -> str:
    """The synthetic dataset; returns its source image size, as text."""
    from train.downstream.datasets.synthetic import make_celebamask_hq, make_lapa, make_wflw

    if dataset == "celebamask_hq":
        size = 128 if quick else 1024
        make_celebamask_hq(root, {"train": train, "val": evaluation, "test": evaluation}, size=size, mask_size=size // 2)
        return f"{size}x{size} (masks {size // 2})"
    if dataset == "lapa":
        size = 96 if quick else 640
        make_lapa(root, size=size, counts={"train": train, "val": evaluation, "test": evaluation}, noise=8)
        return f"{size}x{size}"
    width, height = (160, 120) if quick else (1024, 768)
    make_wflw(root, {"train": train, "test": evaluation}, size=(width, height))
    return f"{width}x{height}"


@contextlib.contextmanager
def logged(path: Path):
    """stdout and stderr of what runs inside into `path` (appended); yields the file."""
    with open(path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield log


def records_of(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def loader_speed(train_set: Any, cfg: Any) -> float | None:
    """images/s the training DataLoader sustains alone (the run's dataset, workers and batch size; no
    model): batches drawn with replacement, timed after the first 2 x workers, which the workers
    prefetch while the first is made (a short epoch hides a slow loader behind that prefetch)."""
    import torch

    from train.downstream.data import collate

    skip = max(1, 2 * cfg.workers)
    batches = skip + max(10, 2 * cfg.workers)
    sampler = torch.utils.data.RandomSampler(train_set, replacement=True, num_samples=batches * cfg.batch_size)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.workers, collate_fn=collate)
    count, start = 0, 0.0
    for step, _ in enumerate(loader):
        if step + 1 == skip:
            start = time.perf_counter()
        elif step + 1 > skip:
            count += cfg.batch_size
    return count / (time.perf_counter() - start) if count else None


def finite(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(finite(v) for v in value.values())
    return isinstance(value, (int, float)) and math.isfinite(value)


def gpu_hours(task: str, images_per_s: float) -> list[dict[str, Any]]:
    from train.downstream.finetune_config import PROTOCOLS

    rows = []
    for dataset in FAMILIES[task]:
        images, epochs = TRAIN_IMAGES[dataset], PROTOCOLS[dataset]["epochs"]
        rows.append({"dataset": dataset, "train_images": images, "protocol_epochs": epochs,
                     "gpu_hours_300_epochs": round(300 * images / images_per_s / 3600, 2),
                     "gpu_hours_protocol_epochs": round(epochs * images / images_per_s / 3600, 2)})
    return rows


def run_task(task: str, dataset: str, args: argparse.Namespace, work: Path, out: Path) -> dict[str, Any]:
    import torch

    from pipeline.config import load_config
    from train.evaluate import main as evaluate_main
    from train.finetune import main as finetune_main, make_splits
    from train.downstream.finetune_config import FinetuneConfig

    cuda = args.device == "cuda"
    data, run, log = work / "data" / dataset, work / "runs" / dataset, out / f"{dataset}.log"
    log.unlink(missing_ok=True)
    result: dict[str, Any] = {"task": task, "dataset": dataset, "device": args.device,
                              "precision": args.precision if cuda else "fp32",  # train.finetune: CPU runs are fp32
                              "workers": args.workers, "init": args.init or "random"}
    started = time.perf_counter()
    result["fixture_image_size"] = build(dataset, data, args.train_images, args.eval_images, args.quick)
    result["build_s"] = round(time.perf_counter() - started, 1)

    common = ["--config", str(REPO / "configs" / f"finetune_{dataset}.yaml"), "--data", str(data), "--output", str(run),
              "--precision", args.precision, "--workers", str(args.workers), "--eval-every", str(args.epochs),
              "--no-progress", *(QUICK_MODEL if args.quick else []),
              *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
              *(["--init", args.init] if args.init else [])]
    cfg = load_config(FinetuneConfig, [*common, "--epochs", str(args.epochs)], "")
    train_set, val_set, test_set, _ = make_splits(cfg)
    evaluated = len(test_set) + (len(val_set) if val_set is not None else 0)
    result.update(image_size=cfg.input_size, warp_size=cfg.warp_size, batch_size=cfg.batch_size, model=cfg.model,
                  train_images=len(train_set), epochs=args.epochs)

    # 2. the timed run
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with logged(log):
        code = finetune_main([*common, "--epochs", str(args.epochs)])
    result["train_wall_s"] = round(time.perf_counter() - started, 1)
    if code != 0:
        raise RuntimeError(f"train.finetune exited {code}: see {log}")
    records = records_of(run)
    timed = [r for r in records if "images_per_s" in r]
    if not timed:
        raise RuntimeError("no epoch had two steps to time: give more --train-images or a smaller --batch-size")
    # every timed epoch times the same number of full batches, so overall images/s is their harmonic mean
    result["images_per_s"] = round(len(timed) / sum(1 / r["images_per_s"] for r in timed), 2)
    result["images_per_s_per_epoch"] = [round(r["images_per_s"], 2) for r in timed]
    result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None
    result["gpu"] = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    with logged(log):
        speed = loader_speed(train_set, cfg)
    result["loader_images_per_s"] = round(speed, 1) if speed else None
    # a run as long as the real one goes no faster than its loader
    result["bound"] = "loader" if speed and speed < result["images_per_s"] else "model"
    result["expected_images_per_s"] = round(min(result["images_per_s"], speed or math.inf), 2)

    # 3. resume for one more epoch, then evaluate last.pt on the test split
    started = time.perf_counter()
    with logged(log) as stream:
        stream.write(f"--- resume: --epochs {args.epochs + 1}\n")
        code = finetune_main([*common, "--epochs", str(args.epochs + 1)])
    result["resume_wall_s"] = round(time.perf_counter() - started, 1)
    resumed = records_of(run)
    if resumed and resumed[-1].get("eval_s"):  # validation and test of the last epoch, loader start-up included
        result["eval_images_per_s"] = round(evaluated / resumed[-1]["eval_s"], 1)
    said = f"resuming from epoch {args.epochs} " in log.read_text()
    result["resume_ok"] = (code == 0 and said and [r["epoch"] for r in resumed] == list(range(1, args.epochs + 2))
                           and [r["loss"] for r in resumed[:args.epochs]] == [r["loss"] for r in records])
    started = time.perf_counter()
    with logged(log) as stream:
        stream.write("--- evaluate last.pt\n")
        code = evaluate_main(["--checkpoint", str(run / "last.pt"), "--output", str(work / "eval" / dataset)])
    result["eval_wall_s"] = round(time.perf_counter() - started, 1)
    metrics_path = work / "eval" / dataset / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if code == 0 and metrics_path.exists() else {}
    compact = {"f1_mean": metrics.get("f1_mean")} if task == "parsing" else metrics.get("full", {})
    result["eval_ok"] = code == 0 and finite(compact)
    result["eval_metrics"] = compact
    result["gpu_hours"] = gpu_hours(task, result["expected_images_per_s"])
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'task':10s} {'dataset':14s} {'measured on':14s} {'images/s':>9s} {'train imgs':>10s} "
          f"{'gpu_hours_300_epochs':>21s} {'protocol epochs':>15s} {'gpu_hours':>9s}", file=sys.stderr)
    for result in results:
        if "gpu_hours" not in result:
            continue
        for row in result["gpu_hours"]:
            print(f"{result['task']:10s} {row['dataset']:14s} {result['dataset']:14s} {result['expected_images_per_s']:9.1f} "
                  f"{row['train_images']:10d} {row['gpu_hours_300_epochs']:21.2f} {row['protocol_epochs']:15d} "
                  f"{row['gpu_hours_protocol_epochs']:9.2f}", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", required=True, help="folder for finetune_speed.json and the runs' logs")
    parser.add_argument("--tasks", nargs="+", choices=tuple(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--parsing", choices=("celebamask_hq", "lapa"), default="celebamask_hq")
    parser.add_argument("--alignment", choices=("wflw",), default="wflw")
    parser.add_argument("--train-images", type=int, default=0, help="training images (default 480; --quick 12)")
    parser.add_argument("--eval-images", type=int, default=0, help="validation and test images each (default 40; --quick 3)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the timed run (then one more, resumed)")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the config's (40)")
    parser.add_argument("--workers", type=int, default=-1, help="DataLoader workers (default: CPUs - 2, at most 12; --quick 1)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--init", default="", help="pre-trained backbone file (default: random initialisation)")
    parser.add_argument("--work", default="", help="folder for the data and runs (default: a temporary one, removed)")
    parser.add_argument("--quick", action="store_true", help="FaRL-tiny, 64 px, batch 3, a few images: checks the script")
    args = parser.parse_args(argv)
    args.train_images = args.train_images or (12 if args.quick else 480)
    args.eval_images = args.eval_images or (3 if args.quick else 40)
    if args.workers < 0:
        args.workers = 1 if args.quick else max(1, min(12, (os.cpu_count() or 1) - 2))
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch loads: train.finetune takes a GPU when it sees one
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU (use --device cpu --quick to check the script)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="finetune_speed_"))
    args.init = str(Path(args.init).resolve()) if args.init else ""
    shutil.rmtree(work / "runs", ignore_errors=True)  # a rerun into --work would resume the old runs
    print(f"torch {torch.__version__}, python {platform.python_version()}, work folder {work}", file=sys.stderr)
    results = []
    try:
        for task in args.tasks:
            dataset = args.parsing if task == "parsing" else args.alignment
            print(f"{task} ({dataset}): building {args.train_images} training images, fine-tuning...", file=sys.stderr)
            started = time.perf_counter()
            try:
                result = run_task(task, dataset, args, work, out)
            except Exception as err:  # noqa: BLE001 - one task's failure (an OOM, say) must not lose the other's numbers
                result = {"task": task, "dataset": dataset, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            result["task_wall_s"] = round(time.perf_counter() - started, 1)
            print(json.dumps(result), flush=True)
            results.append(result)
            if args.device == "cuda":
                import gc
                gc.collect()
                torch.cuda.empty_cache()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    (out / "finetune_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    ok = all("error" not in r and r["resume_ok"] and r["eval_ok"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
