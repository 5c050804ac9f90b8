"""Retrieval on our own data: `pipeline.subset --holdout` draws a held-out share by key,
`train.retrieval` measures image<->text recall@K on it (checked against open_clip's own model and
evaluation transform), and `train.pretrain --holdout` never trains on it and logs the recall."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from outputs import metadata_table, tar_samples
from pipeline.subset import SubsetError, holdout_keys
from train.pretraining.data import LoaderConfig, iter_samples, make_loader
from train.model import FaRL, model_config
from train.pretrain import main as pretrain_main
from train.pretraining.heldout import embed, load_pairs, recall_at_k
from train.retrieval import main as retrieval_main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "pretrain_tiny.yaml")


def hold_out(data: Path, new: Path, fraction: float, seed: int = 0) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pipeline.subset", "--data", str(data), "--holdout", str(fraction),
                           "--holdout-seed", str(seed), "--output", str(new)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return (new / "keys.txt").read_text().split()


def drawn_by_md5(keys: list[str], fraction: float, seed: int) -> list[str]:
    """The rule, computed apart from DuckDB: md5("SEED:KEY")'s first 48 bits below fraction x 2^48."""
    return sorted(k for k in keys if int(hashlib.md5(f"{seed}:{k}".encode()).hexdigest()[:12], 16) < fraction * 2 ** 48)


@pytest.fixture(scope="module")
def held_out(built_output: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    new = tmp_path_factory.mktemp("held") / "held"
    hold_out(built_output, new, 0.4)
    return new


def test_holdout_draws_by_key(built_output: Path, held_out: Path) -> None:
    keys = sorted(metadata_table(built_output)["key"].to_pylist())
    held = sorted((held_out / "keys.txt").read_text().split())
    assert held == drawn_by_md5(keys, 0.4, 0) and 0 < len(held) < len(keys)
    copied, original = tar_samples(held_out), tar_samples(built_output)
    assert sorted(copied) == held and all(copied[k] == original[k] for k in held)  # byte for byte
    smaller = holdout_keys(str(built_output), 0.2)
    assert set(smaller) <= set(held)  # a smaller share is inside a larger one
    other_seed = holdout_keys(str(built_output), 0.4, seed=1)
    assert other_seed == drawn_by_md5(keys, 0.4, 1) and other_seed != held
    with pytest.raises(SubsetError, match=r"--holdout must be a fraction in \(0, 1\), got 1.5"):
        holdout_keys(str(built_output), 1.5)


def test_recall_tells_the_directions_apart() -> None:
    """Every text leans towards image 0: image->text still ranks each own text first, text->image
    ranks image 0 first for every text but text 0 (and the own image second)."""
    n = 12
    images = torch.eye(n)
    texts = F.normalize(torch.eye(n) + 2 * torch.eye(n)[0], dim=1)
    recall = recall_at_k(images, texts, [f"caption {i}" for i in range(n)])
    assert recall["i2t_r1"] == 1.0
    assert recall["t2i_r1"] == pytest.approx(1 / n) and recall["t2i_r5"] == 1.0
    # swapping the two roles swaps the directions
    swapped = recall_at_k(texts, images, [f"caption {i}" for i in range(n)])
    assert swapped["i2t_r1"] == pytest.approx(1 / n) and swapped["t2i_r1"] == 1.0


def test_identical_captions_answer_each_other() -> None:
    n = 8
    images = torch.eye(n)
    # the texts of pairs 0 and 1 are swapped, each keeping a little of its own image: ranked second
    texts = F.normalize(images[[1, 0, *range(2, n)]] + 0.5 * images, dim=1)
    distinct = recall_at_k(images, texts, [f"caption {i}" for i in range(n)])
    assert distinct["i2t_r1"] == pytest.approx((n - 2) / n) and distinct["i2t_r5"] == 1.0
    same = recall_at_k(images, texts, ["portrait", "portrait", *(f"caption {i}" for i in range(2, n))])
    assert same["i2t_r1"] == 1.0 and same["t2i_r1"] == 1.0


def test_cli_matches_open_clip_and_its_eval_transform(held_out: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaRL(model_config("FaRL-tiny"))
    model.save_checkpoint(str(tmp_path / "tiny.pt"))
    assert retrieval_main(["--checkpoint", str(tmp_path / "tiny.pt"), "--data", str(held_out),
                           "--output", str(tmp_path / "r")]) == 0
    result = json.loads((tmp_path / "r" / "retrieval.json").read_text())
    pairs = [s for s in iter_samples(str(held_out))]
    assert result["pairs"] == len(pairs) == len((held_out / "keys.txt").read_text().split())

    reference = open_clip.model.CLIP(**model_config("FaRL-tiny")).eval()
    open_clip.load_checkpoint(reference, str(tmp_path / "tiny.pt"), strict=False)
    preprocess = open_clip.image_transform(64, is_train=False)  # resize the shorter side, centre crop
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu", context_length=reference.context_length)
    images = torch.stack([preprocess(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in pairs])
    captions = [s["txt"].decode() for s in pairs]
    with torch.no_grad():
        image_features = F.normalize(reference.encode_image(images), dim=-1)
        text_features = F.normalize(reference.encode_text(tokenizer(captions)), dim=-1)
    ours = embed(model.eval(), load_pairs(str(held_out), 1000, 64, reference.context_length), torch.device("cpu"))
    # unit vectors computed by the same float32 kernels: a few eps per element of the image, not a pixel's worth
    assert (ours[0] - image_features).abs().max() < 1e-4 and (ours[1] - text_features).abs().max() < 1e-4
    expected = recall_at_k(image_features, text_features, captions)
    assert {k: result[k] for k in expected} == pytest.approx(expected)


def test_pretraining_skips_held_out_samples_and_logs_their_recall(built_output: Path, held_out: Path,
                                                                  tmp_path: Path) -> None:
    held = frozenset((held_out / "keys.txt").read_text().split())
    one_pass = LoaderConfig(batch_size=4, image_size=64, workers=0, resampled=False, exclude_keys=held)
    drawn = [key for batch in make_loader(str(built_output), one_pass) for key in batch["key"]]
    every = set(metadata_table(built_output)["key"].to_pylist())
    assert sorted(drawn) == sorted(every - held)

    out = tmp_path / "run"
    assert pretrain_main(["--config", TINY, "--data", str(built_output), "--output", str(out), "--no-progress",
                          "--holdout", str(held_out), "--eval-every", "10"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = [r["step"] for r in records if "heldout_mean_recall" in r]
    assert [r["step"] for r in records] == [5, 10, 15, 20] and measured == [10, 20]
    assert all(0 <= r[f"heldout_{d}_r{k}"] <= 1 for r in records if r["step"] in measured
               for d in ("i2t", "t2i") for k in (1, 5, 10))


def test_error_lines(built_output: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert pretrain_main(["--config", TINY, "--data", str(built_output), "--output", str(tmp_path / "o"),
                          "--holdout", str(built_output)]) == 2  # a build output has no keys.txt
    assert "has no keys.txt: give a `pipeline.subset` output" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    torch.manual_seed(0)
    FaRL(model_config("FaRL-tiny")).save_checkpoint(str(tmp_path / "tiny.pt"))
    assert retrieval_main(["--checkpoint", str(tmp_path / "tiny.pt"), "--data", str(tmp_path / "none")]) == 2
    assert "no shards match" in capsys.readouterr().err
