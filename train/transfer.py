"""`python -m train.transfer`: is a pre-trained model better than FaRL's weights and than CLIP, and
where? Fine-tunes every (init, task, training fraction) cell with the task's config, then tables and
plots the numbers.

    python -m train.transfer --inits farl=FaRL-Base-Patch16-LAIONFace20M-ep16.pth --inits ours=out/pretrain/last.pt \\
        --inits random=random --tasks lapa=data/LaPa --tasks celeba_attr=data/CelebA \\
        --fractions 0.01,0.1,1 --output out/transfer [-- FLAGS FOR EVERY train.finetune RUN]

Each cell is `train.finetune --config configs/finetune_TASK.yaml --data ROOT --init PATH
--train-fraction F --subset-seed S` into OUTPUT/INIT/TASK/fF (so every init trains on the same
photos), run as a Ray task: one GPU each where the cluster has GPUs, one at a time on CPUs (a
fine-tuning run uses every core). A cell whose report.json exists is not run again (resume; a
killed cell resumes from its last.pt). Then OUTPUT/table.md and table.csv (rows: init; columns:
task x fraction; the validation-chosen test number, and the best-epoch one) and OUTPUT/transfer.png
(each task's number against the training fraction, a line per init).

Two columns need no training, and are measured when asked for: `--zeroshot CELEBA_ROOT` (CelebA's
attributes from each init's text tower, train.zeroshot: mean accuracy) and `--retrieval HELD_OUT`
(image<->text recall on held-out pairs of a build, train.retrieval: mean of recall@1/5/10 both
ways), into OUTPUT/INIT/zeroshot/ and OUTPUT/INIT/retrieval/; `random` has no text tower to ask.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import ray

from pipeline.config import ConfigError, load_config, option
from train.downstream.finetune_config import PROTOCOLS
from train.downstream.transfer_plot import draw_transfer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# a task's headline number in report.json's test metrics, and whether higher is better
HEADLINES = {"parsing": ("f1_mean", True), "attributes": ("mean_accuracy", True), "alignment": ("nme", False)}
# the columns without training: (program, its JSON file's number), keyed by the config field that asks for them
PROBES = {"zeroshot": ("train.zeroshot", "mean_accuracy"), "retrieval": ("train.retrieval", "mean_recall")}


@dataclass
class TransferConfig:
    inits: list[str] = option([], "NAME=PATH of a backbone (ours, an official FaRL file, an OpenAI-CLIP-layout "
                                  "ViT); PATH 'random' = no init; repeatable")
    tasks: list[str] = option([], "DATASET=ROOT of a benchmark in its official layout (" + ", ".join(PROTOCOLS) +
                                  "); repeatable")
    fractions: str = option("1", "training fractions, comma-separated (e.g. 0.01,0.1,1)")
    output: str = option("out/transfer", "one folder per cell, and table.md, table.csv, transfer.png")
    subset_seed: int = option(0, "the low-data subsets' seed, the same for every init")
    zeroshot: str = option("", "CelebA's root: also each init's zero-shot attribute accuracy (train.zeroshot)")
    retrieval: str = option("", "held-out shards (`pipeline.subset --holdout`): also each init's image<->text "
                                "recall on them (train.retrieval)")
    address: str | None = option(None, "a Ray cluster to run on ('auto' or HOST:PORT); default: a local Ray")

    def validate(self) -> None:
        for entry in self.inits + self.tasks:
            if "=" not in entry:
                raise ConfigError(f"expected NAME=PATH, got '{entry}'")
        if not self.inits or not self.tasks:
            raise ConfigError("give at least one --inits NAME=PATH and one --tasks DATASET=ROOT")
        unknown = [task for task in self.task_roots if task not in PROTOCOLS]
        if unknown:
            raise ConfigError(f"unknown task '{unknown[0]}': one of {', '.join(PROTOCOLS)}")
        try:
            values = self.fraction_list
        except ValueError:
            raise ConfigError(f"fractions must be numbers, got '{self.fractions}'") from None
        if not values or not all(0 < f <= 1 for f in values):
            raise ConfigError("fractions must be in (0, 1]")

    @property
    def init_paths(self) -> dict[str, str]:
        return dict(entry.split("=", 1) for entry in self.inits)

    @property
    def task_roots(self) -> dict[str, str]:
        return dict(entry.split("=", 1) for entry in self.tasks)

    @property
    def fraction_list(self) -> list[float]:
        return [float(f) for f in self.fractions.split(",") if f.strip()]


def cell_dir(cfg: TransferConfig, init: str, task: str, fraction: float) -> Path:
    return Path(cfg.output) / init / task / f"f{fraction:g}"


def cell_argv(cfg: TransferConfig, init: str, task: str, fraction: float, extra: list[str]) -> list[str]:
    path = cfg.init_paths[init]
    return ["--config", str(CONFIGS / f"finetune_{task}.yaml"), "--data", cfg.task_roots[task],
            "--init", "" if path == "random" else path, "--train-fraction", str(fraction),
            "--subset-seed", str(cfg.subset_seed), "--output", str(cell_dir(cfg, init, task, fraction)),
            "--no-progress", *extra]


def probes(cfg: TransferConfig) -> list[tuple[str, str]]:
    """(init, probe) of the no-training columns asked for; `random` has nothing to probe."""
    asked = [probe for probe in PROBES if getattr(cfg, probe)]
    return [(init, probe) for init, path in cfg.init_paths.items() if path != "random" for probe in asked]


def probe_dir(cfg: TransferConfig, init: str, probe: str) -> Path:
    return Path(cfg.output) / init / probe


def probe_argv(cfg: TransferConfig, init: str, probe: str) -> list[str]:
    return ["--checkpoint", cfg.init_paths[init], "--data", getattr(cfg, probe),
            "--output", str(probe_dir(cfg, init, probe))]


@ray.remote
def run_cell(program: str, argv: list[str]) -> str:
    """One run of `program`'s main (train.finetune, or a probe); '' when it finished, else its error line."""
    main = importlib.import_module(program).main  # in the worker: the driver need not import the training stack

    stderr, stdout, sys.stderr, sys.stdout = sys.stderr, sys.stdout, io.StringIO(), io.StringIO()
    try:
        code = main(argv)
        said = sys.stderr.getvalue().strip().splitlines()
    finally:
        sys.stderr, sys.stdout = stderr, stdout
    return "" if code == 0 else (said[-1] if said else f"exit {code}")


def headline(task: str, test: dict) -> float:
    """The task's number from a report's test metrics: mean F1, mean accuracy, or the full set's NME."""
    protocol = PROTOCOLS[task]
    if protocol["task"] == "alignment":
        return test["full"][f"nme_{protocol['metrics']['normalize'][0]}"]
    return test[HEADLINES[protocol["task"]][0]]


def collect(cfg: TransferConfig) -> list[dict]:
    """A row per finished cell: init, task, fraction, metric, val_chosen_test, best_epoch_test."""
    rows = []
    for init in cfg.init_paths:
        for task in cfg.task_roots:
            for fraction in cfg.fraction_list:
                path = cell_dir(cfg, init, task, fraction) / "report.json"
                if not path.exists():
                    continue
                report = json.loads(path.read_text())
                kind = PROTOCOLS[task]["task"]
                metric = HEADLINES[kind][0] if kind != "alignment" else f"nme_{PROTOCOLS[task]['metrics']['normalize'][0]}"
                chosen = report.get("val_chosen_test")
                rows.append({"init": init, "task": task, "fraction": fraction, "metric": metric,
                             "val_chosen_test": headline(task, chosen["test"]) if chosen else None,
                             "best_epoch_test": headline(task, report["best_epoch_test"]["test"])})
    for init, probe in probes(cfg):
        path = probe_dir(cfg, init, probe) / f"{probe}.json"
        if path.exists():  # no epochs to choose from: the one number is both
            value = json.loads(path.read_text())[PROBES[probe][1]]
            rows.append({"init": init, "task": probe, "fraction": 0.0, "metric": PROBES[probe][1],
                         "val_chosen_test": value, "best_epoch_test": value})
    return rows


def write_tables(cfg: TransferConfig, rows: list[dict]) -> None:
    out = Path(cfg.output)
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["init"])
        writer.writeheader()
        writer.writerows(rows)
    columns = [(task, fraction) for task in cfg.task_roots for fraction in cfg.fraction_list]
    asked = [probe for probe in PROBES if getattr(cfg, probe)]
    found = {(r["init"], r["task"], r["fraction"]): r for r in rows}
    lines = ["| init | " + " | ".join([f"{task} {fraction:g}" for task, fraction in columns] + asked) + " |",
             "|---|" + "---|" * (len(columns) + len(asked))]
    for init in cfg.init_paths:
        cells = []
        for task, fraction in columns:
            row = found.get((init, task, fraction))
            chosen = f"{row['val_chosen_test']:.4f}" if row and row["val_chosen_test"] is not None else "-"
            cells.append(f"{chosen} ({row['best_epoch_test']:.4f})" if row else "not run")
        for probe in asked:
            row = found.get((init, probe, 0.0))
            cells.append(f"{row['val_chosen_test']:.4f}" if row else "-" if cfg.init_paths[init] == "random" else "not run")
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    metrics = ", ".join([f"{task}: {HEADLINES[PROTOCOLS[task]['task']][0]}" for task in cfg.task_roots] +
                        [f"{probe}: {PROBES[probe][1]}" for probe in asked])
    (out / "table.md").write_text("\n".join(lines) + "\n\nEach cell: the test number of the epoch chosen on "
                                  f"validation (the best-epoch test number). Metrics: {metrics} (nme: lower is "
                                  "better).\n")


def transfer(cfg: TransferConfig, extra: list[str]) -> list[str]:
    """Runs the cells not finished yet, then writes the tables and the plot; returns the failed cells' lines."""
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    todo = [("train.finetune", f"{init}/{task}/{fraction:g}", cell_argv(cfg, init, task, fraction, extra))
            for init in cfg.init_paths for task in cfg.task_roots for fraction in cfg.fraction_list
            if not (cell_dir(cfg, init, task, fraction) / "report.json").exists()]
    todo += [(PROBES[probe][0], f"{init}/{probe}", probe_argv(cfg, init, probe)) for init, probe in probes(cfg)
             if not (probe_dir(cfg, init, probe) / f"{probe}.json").exists()]
    failed = []
    if todo:
        if not ray.is_initialized():
            ray.init(address=cfg.address, logging_level=logging.WARNING, log_to_driver=False)
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = {"num_gpus": 1} if gpus else {"num_cpus": ray.cluster_resources().get("CPU", 1)}
        refs = [run_cell.options(**resources).remote(program, argv) for program, _, argv in todo]
        for (_, name, _), error in zip(todo, ray.get(refs)):
            if error:
                failed.append(f"{name}: {error}")
    rows = collect(cfg)
    write_tables(cfg, rows)
    draw_transfer([row for row in rows if row["task"] in cfg.task_roots], {task: HEADLINES[PROTOCOLS[task]["task"]][1] for task in cfg.task_roots},
                  Path(cfg.output) / "transfer.png")
    return failed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    try:
        cfg = load_config(TransferConfig, argv[:split], "Fine-tune every init on every task and training fraction.")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = transfer(cfg, argv[split + 1:])
    for line in failed:
        print(f"error: cell {line}", file=sys.stderr)
    print((Path(cfg.output) / "table.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
