"""train/finetune.py, train/evaluate.py, train/downstream/data.py on tiny fixtures in the official
LaPa and 300W layouts: a small model overfits them (loss falls, metric improves), both report
numbers, resume, evaluation with drawings, initialisation from an OpenAI-layout file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from train.downstream.datasets import open_dataset
from train.downstream.datasets.synthetic import make_lapa  # three 96 px faces per split
from train.downstream.data import WarpedSamples, collate
from train.evaluate import evaluate, main as evaluate_main
from train.downstream.face_model import FaceModel
from train.finetune import main
from train.downstream.finetune_config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
from train.model import FaRL, model_config

SMALL = ["--model", "FaRL-tiny", "--warp-size", "64", "--input-size", "64", "--head-channels", "16",
         "--feature-blocks", "0", "--feature-blocks", "0", "--feature-blocks", "1", "--feature-blocks", "1",
         "--heatmap-size", "16", "--batch-size", "3", "--workers", "0", "--no-progress", "--backbone-lr", "1e-3",
         "--no-augment"]  # overfitting shows learning; the augmentations have tests of their own


def make_300w(root: Path) -> None:
    """68 points as white dots on a dark 80 px image, in the 300W folders, .pts 1-based."""
    rng = np.random.default_rng(0)
    base = np.stack([np.linspace(20, 60, 68), 40 + 15 * np.sin(np.linspace(0, 6, 68))], 1)
    for folder, count in (("lfpw/trainset", 3), ("helen/trainset", 2), ("afw", 1), ("lfpw/testset", 1),
                          ("helen/testset", 1), ("ibug", 1)):
        for n in range(count):
            points = base + rng.normal(0, 1.5, base.shape)
            image = Image.new("RGB", (80, 80), (20, 20, 20))
            pen = ImageDraw.Draw(image)
            for x, y in points:
                pen.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(255, 255, 255))
            (root / folder).mkdir(parents=True, exist_ok=True)
            image.save(root / folder / f"img_{n}.png")
            body = "".join(f"{x + 1:.3f} {y + 1:.3f}\n" for x, y in points)
            (root / folder / f"img_{n}.pts").write_text(f"version: 1\nn_points: 68\n{{\n{body}}}\n")


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
def test_parsing_overfits_lapa_and_reports_both_numbers(tmp_path: Path) -> None:
    make_lapa(tmp_path / "LaPa")
    out = tmp_path / "run"
    args = ["--dataset", "lapa", "--data", str(tmp_path / "LaPa"), "--output", str(out), "--epochs", "30",
            "--eval-every", "10", "--head-lr", "1e-2", "--ema-decay", "0.5", *SMALL]
    assert main(args) == 0
    records = history(out)
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    evaluated = [r for r in records if "test" in r]
    assert [r["epoch"] for r in evaluated] == [10, 20, 30]
    assert evaluated[-1]["test"]["f1_mean"] > evaluated[0]["test"]["f1_mean"]
    assert evaluated[-1]["test"]["f1_mean"] > 0.6
    assert set(evaluated[0]["test"]["f1"]) == set(open_dataset("lapa", str(tmp_path / "LaPa"), "test").labels)
    report = json.loads((out / "report.json").read_text())
    best = max(evaluated, key=lambda r: r["test"]["f1_mean"])
    assert report["best_epoch_test"] == {"epoch": best["epoch"], "test": best["test"]}
    chosen = max(evaluated, key=lambda r: r["val"]["f1_mean"])
    assert report["val_chosen_test"]["epoch"] == chosen["epoch"]
    # resume: the same command with more epochs goes on from epoch 30
    assert main([*args[:-len(SMALL) - 6], "--epochs", "31", "--eval-every", "10", "--head-lr", "1e-2",
                 "--ema-decay", "0.5", *SMALL]) == 0
    assert [r["epoch"] for r in history(out)] == list(range(1, 32))
    chosen = max((r for r in history(out) if "val" in r), key=lambda r: r["val"]["f1_mean"])
    # evaluation of the chosen checkpoint, with drawings
    assert evaluate_main(["--checkpoint", str(out / "best_val.pt"), "--output", str(tmp_path / "eval"), "--draw", "2"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["f1_mean"] == pytest.approx(chosen["test"]["f1_mean"], abs=1e-9)
    assert sorted(p.name for p in (tmp_path / "eval" / "draw").iterdir()) == ["000.png", "001.png"]


@pytest.mark.timeout(300)
def test_alignment_overfits_300w(tmp_path: Path) -> None:
    make_300w(tmp_path / "300W")
    out = tmp_path / "run"
    assert main(["--dataset", "300w", "--data", str(tmp_path / "300W"), "--output", str(out), "--epochs", "24",
                 "--eval-every", "8", "--ema-decay", "0.5", "--val-fraction", "0.2", *SMALL]) == 0
    records = history(out)
    assert records[-1]["loss"] < records[0]["loss"]
    evaluated = [r for r in records if "test" in r]
    first, last = evaluated[0]["test"], evaluated[-1]["test"]
    assert set(last) == {"common", "challenge", "full"}
    assert set(last["full"]) == {"nme_inter_ocular", "nme_inter_pupil", "auc", "fr"}
    assert last["full"]["nme_inter_ocular"] < first["full"]["nme_inter_ocular"]
    report = json.loads((out / "report.json").read_text())
    assert report["best_epoch_test"]["test"]["full"]["nme_inter_ocular"] == min(
        r["test"]["full"]["nme_inter_ocular"] for r in evaluated)


def test_evaluation_geometry_is_exact_for_a_perfect_model(tmp_path: Path) -> None:
    """Ground truth pushed through the warp and back scores perfectly: the unwarp is the warp's inverse."""
    make_lapa(tmp_path / "LaPa")
    cfg = FinetuneConfig(dataset="lapa", data=str(tmp_path / "LaPa"), warp_size=128, workers=0, progress=False)
    cfg.validate()
    samples = WarpedSamples(open_dataset("lapa", cfg.data, "test"), cfg, train=False)

    class Oracle(torch.nn.Module):
        """Stands in for a model: returns the warped ground truth as logits (what a perfect model gives)."""
        task = "parsing"

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            batch = collate([samples[i] for i in range(len(samples))])
            from train.downstream.geometry import tanh_warp_grid, warp_images
            labels = [warp_images(label[None], tanh_warp_grid(m[None], cfg.warp_factor, 128, tuple(label.shape)),
                                  mode="nearest")[0] for label, m in zip(batch["original_label"], batch["label_matrix"])]
            return torch.nn.functional.one_hot(torch.stack(labels), 11).permute(0, 3, 1, 2).float() * 10

    cfg.batch_size = len(samples)
    metrics = evaluate(Oracle(), samples, cfg, torch.device("cpu"))
    assert metrics["f1"]["skin"] > 0.97 and metrics["f1_mean"] > 0.9  # 128 px warp, back to 96 px: edges only


def test_init_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_300w(tmp_path / "300W")
    FaRL(model_config("FaRL-tiny")).save_checkpoint(str(tmp_path / "clip.pt"), include_mim=False)
    out = tmp_path / "run"
    assert main(["--dataset", "300w", "--data", str(tmp_path / "300W"), "--output", str(out), "--epochs", "1",
                 "--init", str(tmp_path / "clip.pt"), "--max-steps-per-epoch", "1", *SMALL]) == 0
    assert (out / "best_val.pt").exists()
    assert main(["--dataset", "300w", "--data", str(tmp_path / "nowhere"), "--output", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["--dataset", "300w", "--task", "parsing", "--data", str(tmp_path / "300W")]) == 2
    assert "dataset 300w is for alignment, not parsing" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for bad in (tmp_path / "junk.pt", tmp_path / "300W"):  # a file torch cannot read, a folder
        capsys.readouterr()
        assert evaluate_main(["--checkpoint", str(bad)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: checkpoint {bad} cannot be read") and error.count("\n") == 1
    # a rerun into the same output with settings other than its run's is refused before it loads anything
    assert main(["--dataset", "300w", "--data", str(tmp_path / "300W"), "--output", str(out), "--epochs", "2",
                 "--init", str(tmp_path / "clip.pt"), "--max-steps-per-epoch", "1", *SMALL, "--backbone-lr", "5e-2"]) == 2
    error = capsys.readouterr().err
    assert "other settings (backbone_lr 0.001 -> 0.05)" in error and error.count("\n") == 1


def test_resume_continues_exactly(tmp_path: Path) -> None:
    """3 epochs in one go and 1 + a resumed 2 give the same weights: the random state is restored too."""
    make_300w(tmp_path / "300W")
    common = ["--dataset", "300w", "--data", str(tmp_path / "300W"), "--eval-every", "3", "--val-fraction", "0.2",
              *SMALL[:-1]]  # with the augmentations: their random draws must resume too
    assert main([*common, "--output", str(tmp_path / "straight"), "--epochs", "3"]) == 0
    assert main([*common, "--output", str(tmp_path / "resumed"), "--epochs", "1"]) == 0
    assert main([*common, "--output", str(tmp_path / "resumed"), "--epochs", "3"]) == 0
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    # bit-exact on the CPU; CUDA's backward kernels add in no fixed order, so there only up to rounding
    tolerance = {"rtol": 1e-3, "atol": 1e-4} if torch.cuda.is_available() else {"atol": 1e-6}
    for key, value in straight["weights"].items():
        assert torch.allclose(value.float(), resumed["weights"][key].float(), **tolerance), key
    assert [r["epoch"] for r in history(tmp_path / "resumed")] == [1, 2, 3]
    # last.pt is an evaluable checkpoint too
    assert evaluate_main(["--checkpoint", str(tmp_path / "resumed" / "last.pt")]) == 0


def test_whole_training_split_without_validation(tmp_path: Path) -> None:
    """--val-fraction 0: every training image is trained on, and the report has the best-epoch number only."""
    make_300w(tmp_path / "300W")
    out = tmp_path / "run"
    assert main(["--dataset", "300w", "--data", str(tmp_path / "300W"), "--output", str(out), "--epochs", "2",
                 "--val-fraction", "0", *SMALL]) == 0
    records = history(out)
    assert all("test" in r and "val" not in r for r in records)
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"best_epoch_test"} and "val_chosen_test" not in report
    assert (out / "best_test.pt").exists() and not (out / "best_val.pt").exists()
    from train.finetune import make_splits

    cfg = FinetuneConfig(dataset="300w", data=str(tmp_path / "300W"), val_fraction=0)
    cfg.validate()
    train, val, _, share = make_splits(cfg)
    assert val is None and len(train) == len(open_dataset("300w", str(tmp_path / "300W"), "train")) and share == 1


def test_aflw19_auc_and_fr_use_the_box_normalisation() -> None:
    """farl.md: AFLW-19 ranks by NME diag but reports AUC and FR of NME box at 0.07."""
    from train.evaluate import alignment_metrics

    cfg = FinetuneConfig(dataset="aflw19", data="x")
    cfg.validate()
    gt = np.zeros((2, 19, 2))
    boxes = np.array([[0, 0, 100, 100], [0, 0, 100, 100]], float)  # sqrt(w h) = 100, diag = 141.4
    pred = gt + [8.0, 0.0]  # every point 8 px off: NME box 0.08 (> 0.07), NME diag 0.0566 (< 0.07)
    row = alignment_metrics(pred, gt, boxes, cfg, None)["full"]
    assert row["nme_box"] == pytest.approx(0.08) and row["nme_diag"] == pytest.approx(8 / np.hypot(100, 100))
    assert row["fr"] == 1.0 and row["auc"] == 0.0


def test_validation_holds_out_whole_images() -> None:
    from train.downstream.data import train_val_indices

    paths = ["a.jpg", "a.jpg", "b.jpg", "c.jpg", "c.jpg", "c.jpg", "d.jpg", "e.jpg"]
    kept, held = train_val_indices(paths, 0.4, seed=0)
    assert sorted(kept + held) == list(range(len(paths)))
    assert not {paths[i] for i in kept} & {paths[i] for i in held}
    assert len({paths[i] for i in held}) == 2  # 40 % of 5 images
    assert train_val_indices(paths, 0.4, seed=0) == (kept, held)


def test_epoch_records_time_training_and_evaluation(tmp_path: Path) -> None:
    """metrics.jsonl times each epoch's steps after its first (images_per_s) and its evaluation (eval_s);
    --precision bf16 is accepted everywhere and is fp32 on the CPU."""
    make_300w(tmp_path / "300W")
    out = tmp_path / "run"
    assert main(["--dataset", "300w", "--data", str(tmp_path / "300W"), "--output", str(out), "--epochs", "1",
                 "--val-fraction", "0", "--precision", "bf16", *SMALL, "--batch-size", "2"]) == 0
    record = history(out)[0]
    assert record["images_per_s"] > 0 and record["eval_s"] > 0  # 6 images, batch 2: 2 timed steps
    assert ("peak_memory_gib" in record) == torch.cuda.is_available()
    assert evaluate_main(["--checkpoint", str(out / "last.pt")]) == 0


def test_low_data_subsets_are_seeded_nested_and_keep_photos_whole() -> None:
    from train.downstream.data import subset_indices

    paths = [f"{n // 2}.jpg" for n in range(40)] + [f"single{n}.jpg" for n in range(60)]  # 80 photos, 100 faces
    indices = list(range(len(paths)))
    small, large = (subset_indices(paths, indices, fraction, 0, seed=3) for fraction in (0.1, 0.5))
    photos = [{paths[i] for i in cut} for cut in (small, large)]
    assert [len(p) for p in photos] == [8, 40] and photos[0] < photos[1]  # one seed: the smaller inside the larger
    for cut in (small, large):
        assert set(cut) == {i for i in indices if paths[i] in {paths[j] for j in cut}}  # every face of a kept photo
    assert subset_indices(paths, indices, 0.1, 0, seed=3) == small
    assert {paths[i] for i in subset_indices(paths, indices, 0.1, 0, seed=4)} != photos[0]
    assert len({paths[i] for i in subset_indices(paths, indices, 1.0, 5, seed=3)}) == 5  # --train-count
    assert len(subset_indices(paths, indices, 0.001, 0, seed=3)) >= 1


def test_a_cut_split_trains_longer_by_its_share_up_to_the_cap() -> None:
    from train.finetune import schedule_for

    cfg = FinetuneConfig(dataset="wflw", data="x")
    cfg.validate()
    assert (schedule_for(cfg, 1.0).epochs, schedule_for(cfg, 1.0).lr_drop_epoch) == (150, 200)
    assert (schedule_for(cfg, 0.25).epochs, schedule_for(cfg, 0.25).lr_drop_epoch) == (600, 800)  # the same steps
    assert schedule_for(cfg, 0.01).epochs == 1500  # capped at max_epoch_scale 10
    given = FinetuneConfig(dataset="wflw", data="x", epochs=7)  # as a config file gives them
    given.validate()
    assert schedule_for(given, 0.5).epochs == 14 and schedule_for(given, 1.0).epochs == 7
    unscaled = FinetuneConfig(dataset="wflw", data="x", epochs=7, max_epoch_scale=1)
    unscaled.validate()
    assert schedule_for(unscaled, 0.01).epochs == 7


def test_a_cut_run_lists_its_photos_and_a_listed_subset_is_reused(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    make_300w(tmp_path / "300W")
    common = ["--dataset", "300w", "--data", str(tmp_path / "300W"), "--epochs", "1", "--val-fraction", "0",
              "--max-steps-per-epoch", "1", *SMALL]
    assert main([*common, "--output", str(tmp_path / "cut"), "--train-count", "2", "--subset-seed", "5"]) == 0
    listed = (tmp_path / "cut" / "train_subset.txt").read_text().splitlines()
    train = open_dataset("300w", str(tmp_path / "300W"), "train")
    assert len(listed) == 2 and {str(tmp_path / "300W" / photo) for photo in listed} < {
        train.image_path(i) for i in range(len(train))}  # below the data root: the list works on any copy
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert report["train_count"] == 2 and report["epochs"] == 3  # 2 of the 6 photos: --epochs 1 x 3
    subset = str(tmp_path / "cut" / "train_subset.txt")
    assert main([*common, "--output", str(tmp_path / "reused"), "--train-subset", subset]) == 0
    assert (tmp_path / "reused" / "train_subset.txt").read_text().splitlines() == listed
    assert not (tmp_path / "whole").exists()
    assert main([*common, "--output", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / "train_subset.txt").exists(), "an uncut run lists nothing"
    (tmp_path / "bad.txt").write_text("nowhere/img_9.png\n")
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "bad"), "--train-subset", str(tmp_path / "bad.txt")]) == 2
    assert "bad.txt: 1 image(s) not in the training split, e.g. 'nowhere/img_9.png'" in capsys.readouterr().err
    # a cut to one photo would train on batches of one, which the heads' batch norm refuses mid-run
    assert main([*common, "--output", str(tmp_path / "one"), "--train-count", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("error: 1 training sample(s) left after the validation hold-out and the "
                                               "low-data cut: training needs at least 2 (raise --train-fraction or "
                                               "--train-count)")
    assert not (tmp_path / "one").exists()


ATTRIBUTE_RUN = ["--model", "FaRL-tiny", "--warp-size", "64", "--input-size", "64", "--batch-size", "16",
                 "--workers", "0", "--no-progress", "--no-augment", "--ema-decay", "0.5", "--eval-every", "4"]


@pytest.mark.timeout(300)
def test_attributes_learn_the_drawn_one_and_stay_at_chance_on_coin_flips(tmp_path: Path) -> None:
    """CelebA's layout; Eyeglasses is a bar across the eyes, every other attribute a coin flip."""
    from train.downstream.datasets.synthetic import make_celeba_attr

    make_celeba_attr(tmp_path / "CelebA", {"train": 96, "val": 32, "test": 96})
    out = tmp_path / "run"
    assert main(["--dataset", "celeba_attr", "--data", str(tmp_path / "CelebA"), "--output", str(out),
                 "--epochs", "12", "--backbone-lr", "1e-3", "--head-lr", "1e-2", *ATTRIBUTE_RUN]) == 0
    report = json.loads((out / "report.json").read_text())
    test = report["val_chosen_test"]["test"]
    assert test["balanced_accuracy"]["Eyeglasses"] > 0.9 and test["accuracy"]["Eyeglasses"] > 0.9
    others = [value for name, value in test["balanced_accuracy"].items() if name != "Eyeglasses"]
    # coin flips: 96 test images put a chance-level balanced accuracy within ~0.05 of 0.5 (one sigma)
    assert abs(np.mean(others) - 0.5) < 0.05
    assert 0.5 <= test["majority_accuracy"] < 0.65 and len(test["accuracy"]) == 40
    assert evaluate_main(["--checkpoint", str(out / "best_val.pt")]) == 0


def test_a_linear_probe_leaves_the_backbone_as_initialised(tmp_path: Path) -> None:
    from train.downstream.datasets.synthetic import make_celeba_attr

    make_celeba_attr(tmp_path / "CelebA", {"train": 16, "val": 8, "test": 8})
    init = tmp_path / "clip.pt"
    FaRL(model_config("FaRL-tiny")).save_checkpoint(str(init), include_mim=False)
    out = tmp_path / "probe"
    assert main(["--dataset", "celeba_attr", "--data", str(tmp_path / "CelebA"), "--output", str(out), "--epochs", "1",
                 "--init", str(init), "--linear-probe", *ATTRIBUTE_RUN]) == 0
    fresh = FaceModel.create("attributes", 40, str(init), input_size=64)  # the init's weights, a new head
    trained = torch.load(out / "last.pt", weights_only=True)["model"]
    backbone = {k: v for k, v in fresh.state_dict().items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(trained[k], v) for k, v in backbone.items())
    head = [v for k, v in trained.items() if k.startswith("head.")]
    assert head and trained["head.mix"].abs().sum() > 0, "the head learned"


def test_celeba_files_are_checked_line_by_line(tmp_path: Path) -> None:
    from train.downstream.datasets import DatasetError
    from train.downstream.datasets.synthetic import make_celeba_attr

    make_celeba_attr(tmp_path, {"train": 2, "val": 1, "test": 1})
    attributes = tmp_path / "list_attr_celeba.txt"
    lines = attributes.read_text().splitlines()
    attributes.write_text("\n".join(lines[:3] + [lines[3].replace("-1", "0", 1).replace(" 1", " 0", 1)] + lines[4:]) + "\n")
    with pytest.raises(DatasetError, match=r"list_attr_celeba.txt:4: expected an image file and 40 values of 1 or -1"):
        open_dataset("celeba_attr", str(tmp_path), "train")
    attributes.write_text("\n".join(lines) + "\n")
    (tmp_path / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"missing CelebA image: .*000002.jpg"):
        open_dataset("celeba_attr", str(tmp_path), "train")


def test_lfwa_fine_tunes_with_its_config_and_a_validation_set_cut_from_train(tmp_path: Path) -> None:
    from train.downstream.datasets.synthetic import make_lfwa

    make_lfwa(tmp_path / "LFWA", {"train": 40, "test": 8})
    out = tmp_path / "run"
    assert main(["--config", str(ROOT / "configs" / "finetune_lfwa.yaml"), "--data", str(tmp_path / "LFWA"),
                 "--output", str(out), "--epochs", "1", "--val-fraction", "0.25", *ATTRIBUTE_RUN]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "lfwa" and report["task"] == "attributes"
    chosen = report["val_chosen_test"]  # LFWA has no val split: one was cut from train, and chose the epoch
    assert 0 <= chosen["val"]["mean_accuracy"] <= 1 and 0 <= chosen["test"]["mean_accuracy"] <= 1
