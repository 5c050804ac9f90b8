"""train.transfer end to end on the CPU: a tiny grid (2 inits x 2 tasks x 2 fractions, FaRL-tiny,
fixture data in the official layouts, plus the zero-shot and retrieval columns) on the test
session's Ray, its tables, its picture, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.subset import holdout_keys, write_subset
from train.downstream.datasets.synthetic import make_celeba_attr, make_lapa
from train.model import FaRL, model_config
from train.transfer import main

TINY = ["--model", "FaRL-tiny", "--warp-size", "64", "--input-size", "64", "--head-channels", "16",
        "--feature-blocks", "0", "--feature-blocks", "0", "--feature-blocks", "1", "--feature-blocks", "1",
        "--heatmap-size", "16", "--batch-size", "2", "--workers", "0", "--epochs", "1", "--max-steps-per-epoch", "1",
        "--no-augment"]


@pytest.mark.timeout(300)
def test_a_tiny_grid_runs_every_cell_once_and_tables_them(ray_address: str, built_output: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    held_out = tmp_path / "held_out"
    write_subset(str(built_output), str(held_out), holdout_keys(str(built_output), 0.4))
    make_lapa(tmp_path / "LaPa")
    make_celeba_attr(tmp_path / "CelebA", {"train": 8, "val": 4, "test": 4})
    FaRL(model_config("FaRL-tiny")).save_checkpoint(str(tmp_path / "ours.pt"), include_mim=False)
    out = tmp_path / "transfer"
    argv = ["--inits", f"ours={tmp_path / 'ours.pt'}", "--inits", "random=random",
            "--tasks", f"lapa={tmp_path / 'LaPa'}", "--tasks", f"celeba_attr={tmp_path / 'CelebA'}",
            "--fractions", "0.5,1", "--zeroshot", str(tmp_path / "CelebA"), "--retrieval", str(held_out),
            "--output", str(out), "--", *TINY]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert {(r["init"], r["task"], float(r["fraction"])) for r in rows} == {
        (init, task, f) for init in ("ours", "random") for task in ("lapa", "celeba_attr") for f in (0.5, 1.0)
    } | {("ours", "zeroshot", 0.0), ("ours", "retrieval", 0.0)}  # random has no text tower to ask
    assert {r["metric"] for r in rows} == {"f1_mean", "mean_accuracy", "mean_recall"}
    assert all(0 <= float(r["val_chosen_test"]) <= 1 and 0 <= float(r["best_epoch_test"]) <= 1 for r in rows)
    table = (out / "table.md").read_text()
    assert table.startswith("| init | lapa 0.5 | lapa 1 | celeba_attr 0.5 | celeba_attr 1 | zeroshot | retrieval |")
    assert "| ours | " in table and "not run" not in table
    assert next(line for line in table.splitlines() if line.startswith("| random |")).endswith("| - | - |")
    probed = {r["task"]: float(r["val_chosen_test"]) for r in rows if r["init"] == "ours" and r["fraction"] == "0.0"}
    for probe, metric in (("zeroshot", "mean_accuracy"), ("retrieval", "mean_recall")):
        assert probed[probe] == json.loads((out / "ours" / probe / f"{probe}.json").read_text())[metric]
    # one subset for every init: the half of LaPa's training photos that both trained on
    cut = [(out / init / "lapa" / "f0.5" / "train_subset.txt").read_text() for init in ("ours", "random")]
    assert cut[0] == cut[1] and len(cut[0].splitlines()) == 2
    with Image.open(out / "transfer.png") as picture:
        assert picture.size[0] == 2 * 420 and picture.getextrema() != ((255, 255),) * 3
    report = out / "ours" / "lapa" / "f1" / "report.json"
    finished = report.stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0, "a rerun runs nothing: every cell has its report"
    assert report.stat().st_mtime_ns == finished


def test_bad_arguments_are_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["--inits", "x=y", "--tasks", "imagenet=z"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown task 'imagenet': one of celebamask_hq, lapa, 300w, wflw, aflw19, celeba_attr, lfwa"
    assert main(["--inits", "x", "--tasks", "lapa=z"]) == 2
    assert "expected NAME=PATH, got 'x'" in capsys.readouterr().err
