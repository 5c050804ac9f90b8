"""train.zeroshot: CelebA attributes from the text tower, on fixture data in the official layout."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from train.downstream.datasets.celeba_attr import ATTRIBUTES
from train.downstream.datasets.synthetic import make_celeba_attr, make_lfwa
from train.model import FaRL, model_config
from train.zeroshot import DESCRIPTIONS, TEMPLATES, description_embeddings, main, predict


def test_every_celeba_attribute_has_a_present_and_an_absent_description() -> None:
    assert list(DESCRIPTIONS) == ATTRIBUTES
    assert all(present != absent for present, absent in DESCRIPTIONS.values())


def test_descriptions_are_template_averages_present_first() -> None:
    model = FaRL(model_config("FaRL-tiny")).eval()
    embedded = description_embeddings(model, ("Eyeglasses",))
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    with torch.no_grad():
        present = model.encode_text(tokenizer([t.format("with eyeglasses") for t in TEMPLATES]), normalize=True)
    assert embedded.shape == (1, 2, present.shape[-1])
    expected = F.normalize(present.mean(0), dim=-1)
    assert torch.allclose(embedded[0, 0], expected, atol=1e-5 * expected.numel() ** 0.5)


def test_an_image_nearer_the_present_description_has_the_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image tower stands in here (labelled fake: no trained FaRL exists on this box) with the
    features it would give; the decision is the real code's."""
    model = FaRL(model_config("FaRL-tiny"))
    features = torch.tensor([[0.1, 0.99], [0.99, 0.1]])
    monkeypatch.setattr(FaRL, "encode_image", lambda self, images, normalize=False: features)
    descriptions = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # one attribute: present, absent
    assert predict(model, torch.zeros(2, 3, 8, 8), descriptions).tolist() == [[True], [False]]


def test_zeroshot_runs_end_to_end_and_a_random_model_is_at_chance(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    make_celeba_attr(tmp_path / "CelebA", {"train": 2, "val": 2, "test": 24})
    FaRL(model_config("FaRL-tiny")).save_checkpoint(str(tmp_path / "tiny.pt"), include_mim=False)
    assert main(["--checkpoint", str(tmp_path / "tiny.pt"), "--data", str(tmp_path / "CelebA"),
                 "--output", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "zeroshot.json").read_text())
    assert result["images"] == 24 and len(result["accuracy"]) == 40
    assert 0.3 < result["mean_balanced_accuracy"] < 0.7
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path / "CelebA")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_zeroshot_on_lfwa(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_lfwa(tmp_path / "LFWA", {"train": 2, "test": 12})
    FaRL(model_config("FaRL-tiny")).save_checkpoint(str(tmp_path / "tiny.pt"), include_mim=False)
    assert main(["--checkpoint", str(tmp_path / "tiny.pt"), "--dataset", "lfwa", "--data", str(tmp_path / "LFWA"),
                 "--output", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "zeroshot.json").read_text())
    assert result["dataset"] == "lfwa" and result["images"] == 12 and len(result["accuracy"]) == 40
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "tiny.pt"), "--dataset", "lfwa", "--data", str(tmp_path / "LFWA"),
                 "--split", "val"]) == 2  # LFWA has train and test only
    assert capsys.readouterr().err.strip() == "error: LFWA: unknown split 'val'; expected one of ('train', 'test')"
