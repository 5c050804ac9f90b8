"""train/export.py: a run's latest checkpoint, or any checkpoint file, as one weights file that
open_clip's own loader takes strictly; --keep-mim; the error lines."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from train.pretraining.checkpoints import Checkpoints
from train.export import main
from train.model import MIM_KEYS, FaRL, model_config


def run_folder(tmp_path: Path) -> tuple[Path, FaRL]:
    """A pre-training output folder whose latest checkpoint (step 20) holds `model`, MIM branch included."""
    torch.manual_seed(0)
    model = FaRL(model_config("FaRL-tiny"), {"depth": 1, "vocab": 192}).eval()
    checkpoints = Checkpoints(str(tmp_path / "run"))
    checkpoints.save(10, FaRL(model_config("FaRL-tiny"), {"depth": 1, "vocab": 192}), torch.optim.AdamW(model.parameters()))
    checkpoints.save(20, model, torch.optim.AdamW(model.parameters()))
    return tmp_path / "run", model


def test_exported_run_loads_strictly_into_open_clip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, model = run_folder(tmp_path)
    out = tmp_path / "exported" / "farl.pt"
    assert main(["--source", str(run), "--output", str(out)]) == 0
    assert "step_00000020.pt" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert not any(MIM_KEYS.match(k) for k in saved["state_dict"])
    assert saved["exported_from"].endswith("checkpoints/step_00000020.pt")
    reference = open_clip.model.CLIP(**saved["farl_config"]["model"]).eval()
    result = open_clip.load_checkpoint(reference, str(out), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, 49407, (2, 77))
    with torch.no_grad():  # the latest checkpoint's weights, not the earlier one's
        assert torch.allclose(reference.encode_image(images), model.encode_image(images), atol=1e-6)
        assert torch.allclose(reference.encode_text(tokens), model.encode_text(tokens), atol=1e-6)
    assert list(out.parent.iterdir()) == [out]  # no temporary left beside it


def test_keep_mim_a_file_as_source_and_an_fsspec_output(tmp_path: Path) -> None:
    """memory:// stands for s3:// and gs://: the same fsspec path."""
    import fsspec

    run, model = run_folder(tmp_path)
    source, out = run / "checkpoints" / "step_00000020.pt", "memory://export-test/weights/with_mim.pt"
    try:
        assert main(["--source", str(source), "--output", out, "--keep-mim"]) == 0
        again = FaRL.from_checkpoint(out)
    finally:
        fsspec.filesystem("memory").rm("/export-test", recursive=True)
    assert again.has_mim and again.config == model.config
    for key, value in model.state_dict_openai().items():
        assert torch.equal(again.clip.state_dict()[key], value), key


def test_error_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out.pt"
    assert main(["--source", str(tmp_path / "missing.pt"), "--output", str(out)]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--source", str(tmp_path / "empty"), "--output", str(out)]) == 2
    assert "without checkpoints/latest.json" in capsys.readouterr().err
    run, _ = run_folder(tmp_path)
    assert main(["--source", str(run), "--output", str(tmp_path / "empty")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["--source", str(run)]) == 2
    assert "--source and --output are required" in capsys.readouterr().err
    assert not out.exists() and list((tmp_path / "empty").iterdir()) == []
    (tmp_path / "file").write_bytes(b"")
    assert main(["--source", str(run), "--output", str(tmp_path / "file" / "out.pt")]) == 1  # under a file
    assert "cannot write" in capsys.readouterr().err
    latest = run / "checkpoints" / "step_00000020.pt"
    before = latest.read_bytes()
    assert main(["--source", str(run), "--output", str(latest)]) == 2
    assert "is the checkpoint it would be made from" in capsys.readouterr().err
    assert latest.read_bytes() == before
    FaRL(model_config("FaRL-tiny")).save_checkpoint(str(tmp_path / "no_mim.pt"))
    assert main(["--source", str(tmp_path / "no_mim.pt"), "--output", str(out), "--keep-mim"]) == 2
    assert "has no MIM branch" in capsys.readouterr().err
    assert not out.exists()
