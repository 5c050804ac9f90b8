"""train/pretrain.py and train/pretraining/engine.py on the real demo build's shards: overfitting a fixed batch,
one-process and 2-worker Ray Train runs (features gathered across ranks), resume after kill -9,
corrupt shards, checkpoints into open_clip, weight-decay groups, the temperature cap, the
learning-rate schedule, DALL-E targets, and the error lines."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

from standins import StandInEncoder
from train.pretraining.data import LoaderConfig, make_loader
from train.pretraining.engine import Worker, build_model, build_targets, param_groups, train_step
from train.pretraining.losses import FaRLLoss
from train.pretraining.masking import BlockMaskGenerator
from train.model import FaRL, model_config
from train.pretrain import main
from train.pretraining.pretrain_config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "pretrain_tiny.yaml")


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def pretrain_command(data: Path, output: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "train.pretrain", "--config", TINY, "--data", str(data), "--output", str(output),
            "--no-progress", *flags]


def test_overfits_a_fixed_batch(built_output: Path) -> None:
    torch.manual_seed(0)
    cfg = PretrainConfig(data=str(built_output), model="FaRL-tiny", mask_patches=24, mask_min_patches=4)
    targets = build_targets(cfg)
    model = build_model(cfg, targets)
    mask_fn = BlockMaskGenerator(model.grid, 24, 4)
    batch = next(iter(make_loader(cfg.data, LoaderConfig(batch_size=8, image_size=64, workers=0), mask_fn)))
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
    loss_fn = FaRLLoss(targets)
    autocast = torch.autocast("cpu", enabled=False)
    history = [train_step(model, model, loss_fn, optimizer, (batch["image"], batch["text"], batch["mask"]), autocast)
               for _ in range(40)]
    first, last = history[0], history[-1]
    assert last["contrastive"].item() < 0.4 * first["contrastive"].item()
    assert last["mim"].item() < 0.8 * first["mim"].item()


def test_one_process_run_writes_checkpoints_metrics_and_open_clip_files(built_output: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["--config", TINY, "--data", str(built_output), "--output", str(out), "--no-progress"]) == 0
    records = metrics(out)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(r["images_per_s"] > 0 and r["skipped_samples"] == 0 for r in records)
    assert records[-1]["logit_scale"] <= 100
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 20
    # our checkpoint is a FaRL file: our loader, and open_clip's with the same architecture
    path = out / "checkpoints" / latest["model"]
    ours = FaRL.from_checkpoint(str(path)).eval()
    assert ours.has_mim and ours.config["mim"] == {"depth": 1, "vocab": 192}
    reference = open_clip.model.CLIP(**ours.config["model"]).eval()
    result = open_clip.load_checkpoint(reference, str(path), strict=False)
    assert result.missing_keys == [] and all(k.startswith("visual.") for k in result.unexpected_keys)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reference.encode_image(images), ours.encode_image(images), atol=1e-6)
    state = torch.load(out / "checkpoints" / latest["state"], weights_only=True)
    assert state["step"] == 20 and state["optimizer"]["state"]


def test_param_groups_exempt_norms_biases_embeddings_and_temperature() -> None:
    model = FaRL(model_config("FaRL-tiny"), {"depth": 1, "vocab": 192})
    no_decay, decay = param_groups(model, 0.2)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.2)
    name_of = {id(p): n for n, p in model.named_parameters()}
    exempt, decayed = {name_of[id(p)] for p in no_decay["params"]}, {name_of[id(p)] for p in decay["params"]}
    assert exempt | decayed == set(name_of.values()) and not exempt & decayed
    for name in ("clip.logit_scale", "clip.visual.mask_token", "clip.token_embedding.weight", "clip.positional_embedding",
                 "clip.visual.class_embedding", "clip.visual.positional_embedding", "clip.ln_final.weight",
                 "clip.visual.ln_lm.bias", "clip.visual.transformer.resblocks.0.attn.in_proj_bias"):
        assert name in exempt, name
    # everything else is a weight matrix, and decays
    assert decayed == {n for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n
                       and not n.endswith("mask_token")}
    assert {"clip.visual.conv1.weight", "clip.visual.proj", "clip.text_projection", "clip.visual.lm_head.weight"} <= decayed


def test_temperature_is_capped_at_100_after_a_step() -> None:
    torch.manual_seed(0)
    model = FaRL(model_config("FaRL-tiny"))
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(200))
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
    batch = (torch.randn(4, 3, 64, 64), torch.randint(1, 49407, (4, 77)), None)
    train_step(model, model, FaRLLoss(None), optimizer, batch, torch.autocast("cpu", enabled=False))
    assert model.clip.logit_scale.exp().item() == pytest.approx(100, rel=1e-6)


def test_learning_rate_warms_up_then_follows_a_cosine(built_output: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["--config", TINY, "--data", str(built_output), "--output", str(out), "--no-progress", "--lr", "0.002",
                 "--warmup-steps", "3", "--steps", "9", "--log-every", "1", "--checkpoint-every", "9"]) == 0
    # step s (from 1) trains at 0.002 * s / 3 during the warm-up, then on a half cosine from 0.002 down to 0 at step 10
    expected = [0.002 * s / 3 if s <= 3 else 0.001 * (1 + math.cos(math.pi * (s - 4) / 6)) for s in range(1, 10)]
    assert [r["lr"] for r in metrics(out)] == pytest.approx(expected, rel=1e-9)


@pytest.mark.timeout(500)
def test_resume_after_kill(built_output: Path, tmp_path: Path) -> None:
    """kill -9 once a step after the first checkpoint is logged, rerun the same command: it resumes
    at the checkpoint's step, and the metrics hold each step once."""
    out = tmp_path / "run"
    command = pretrain_command(built_output, out, "--steps", "120", "--checkpoint-every", "20", "--log-every", "10")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest.json"

    def logged_past_the_checkpoint() -> bool:
        try:
            return max(r["step"] for r in metrics(out)) > json.loads(latest.read_text())["step"]
        except (OSError, ValueError):  # not written yet, or a line half-written
            return False

    deadline = time.monotonic() + 240
    while not logged_past_the_checkpoint() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert latest.exists(), "no checkpoint within 240 s, or the run died before its first"
    killed_at = json.loads(latest.read_text())["step"]
    assert 20 <= killed_at < 120
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step {killed_at}" in resumed.stderr
    steps = [r["step"] for r in metrics(out)]
    assert steps == list(range(10, 121, 10))  # each step once: what the killed run logged after its checkpoint is dropped
    assert json.loads(latest.read_text())["step"] == 120
    state = torch.load(out / "checkpoints" / "step_00000120.state.pt", weights_only=True)
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {120.0}  # the optimizer state went on from the checkpoint's, not from zero
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*.state.pt"))
    assert len(kept) <= 3  # older checkpoints are pruned


def test_one_pass_resume_goes_on_with_its_epoch(built_output: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """--no-resampled: a resumed run passes over the samples its epoch already gave (train.pretraining.data's
    test checks which samples), so its epochs turn over at the same steps as an unbroken run's."""
    def run(out: Path, steps: int) -> int:
        return main(["--config", TINY, "--data", str(built_output), "--output", str(out), "--no-progress",
                     "--no-resampled", "--batch-size", "6", "--steps", str(steps), "--log-every", "1",
                     "--checkpoint-every", "4"])

    assert run(tmp_path / "unbroken", 9) == 0
    assert run(tmp_path / "resumed", 4) == 0 and run(tmp_path / "resumed", 9) == 0
    assert "one-pass data: epoch 1 goes on after" in caplog.text
    unbroken, resumed = ({r["step"]: r["epoch"] for r in metrics(tmp_path / name)} for name in ("unbroken", "resumed"))
    assert resumed == unbroken and unbroken[9] >= 2


@pytest.mark.filterwarnings("ignore:.torch.load. received a zip file:UserWarning")
def test_dalle_targets_train(built_output: Path, tmp_path: Path) -> None:
    """--mim-target dalle through the trainer, with test_targets' stand-in encoder (a FAKE dVAE: the
    real one cannot be downloaded here): an 8192-way head, a cross-entropy that starts near ln 8192 and falls."""
    torch.jit.script(StandInEncoder()).save(str(tmp_path / "encoder.pt"))
    out = tmp_path / "run"
    assert main(["--config", TINY, "--data", str(built_output), "--output", str(out), "--no-progress",
                 "--mim-target", "dalle", "--dalle-encoder", str(tmp_path / "encoder.pt"),
                 "--lr", "0.003", "--steps", "16", "--log-every", "1", "--checkpoint-every", "16"]) == 0
    mim = [r["mim"] for r in metrics(out)]
    assert abs(mim[0] - math.log(8192)) < 1.5 and sum(mim[-4:]) / 4 < sum(mim[:4]) / 4 - 0.3
    assert FaRL.from_checkpoint(str(out / "checkpoints" / "step_00000016.pt")).config["mim"] == {"depth": 1, "vocab": 8192}


def test_corrupt_shards_are_skipped_and_counted(built_output: Path, tmp_path: Path) -> None:
    data = tmp_path / "shards"
    shutil.copytree(built_output / "shards", data)
    (data / "90000.tar").write_bytes(os.urandom(5000))
    good = sorted(data.glob("0*.tar"))[0].read_bytes()
    (data / "90001.tar").write_bytes(good[: len(good) // 2 + 100])  # truncated mid-member
    out = tmp_path / "run"
    assert main(["--config", TINY, "--data", str(data / "*.tar"), "--output", str(out), "--no-progress",
                 "--no-resampled", "--steps", "8", "--log-every", "8"]) == 0
    assert metrics(out)[-1]["skipped_samples"] >= 2  # per pass: the random-bytes shard and the truncated one


@pytest.mark.timeout(300)
def test_two_worker_ray_train_run(built_output: Path, tmp_path: Path, ray_address: str) -> None:
    """Two DDP workers of 8 images each. They start from weights whose text projection is zero: every
    text feature is then 0 and so is every logit, which makes the first step's contrastive loss
    exactly ln(candidates), ln 16 when the ranks' features are gathered and ln 8 when they are not."""
    torch.manual_seed(0)
    start = FaRL(model_config("FaRL-tiny"), {"depth": 1, "vocab": 192})
    with torch.no_grad():
        start.clip.text_projection.zero_()
    start.save_checkpoint(str(tmp_path / "start.pt"))
    out = tmp_path / "run"
    result = subprocess.run(pretrain_command(built_output, out, "--workers", "2", "--address", ray_address,
                                             "--init", str(tmp_path / "start.pt"), "--batch-size", "8",
                                             "--steps", "6", "--log-every", "1", "--checkpoint-every", "6"),
                            cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["contrastive"] == pytest.approx(math.log(16), abs=1e-5)
    assert records[0]["images_per_s"] > 0 and all(math.isfinite(r["loss"]) for r in records)
    model = FaRL.from_checkpoint(str(out / "checkpoints" / "step_00000006.pt"))
    assert model.has_mim and model.clip.text_projection.abs().sum() > 0  # the workers' steps reached the checkpoint


def test_error_lines(built_output: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--config", TINY, "--data", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "no shards match" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert main(["--config", TINY, "--data", str(built_output), "--output", str(tmp_path / "o"),
                 "--init", str(tmp_path / "bad.pt")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert main(["--config", TINY, "--data", str(built_output), "--mim-target", "dalle"]) == 2
    assert "needs the DALL-E dVAE encoder file" in capsys.readouterr().err
    assert main(["--config", TINY, "--output", str(tmp_path / "o")]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["--config", TINY, "--data", str(built_output), "--output", str(tmp_path / "o"), "--mask-patches", "75"]) == 2
    assert "num_masked must be in 1..64" in capsys.readouterr().err  # FaRL-tiny has an 8x8 grid
    assert main(["--config", TINY, "--data", str(built_output), "--workers", "2", "--no-resampled"]) == 2
    assert "unequal batches" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was written


def test_init_from_an_openai_layout_file(built_output: Path, tmp_path: Path) -> None:
    """--init takes a file without MIM keys (e.g. OpenAI CLIP): CLIP weights loaded, MIM head new."""
    source = FaRL(model_config("FaRL-tiny"))
    source.save_checkpoint(str(tmp_path / "clip.pt"), include_mim=False)
    cfg = PretrainConfig(data=str(built_output), model="FaRL-tiny", init=str(tmp_path / "clip.pt"))
    model = build_model(cfg, build_targets(cfg))
    for key, value in source.state_dict_openai().items():
        assert torch.equal(model.clip.state_dict()[key], value), key
    assert model.has_mim
    with pytest.raises(ValueError, match="has shape"):  # another architecture
        build_model(PretrainConfig(data="x", model="ViT-B-16-quickgelu", init=str(tmp_path / "clip.pt"), mim=False), None)
    assert Worker().world_size == 1


def test_fsspec_output(built_output: Path, tmp_path: Path) -> None:
    """Checkpoints to an fsspec URL (memory:// here; s3:// and gs:// take the same path), metrics to a
    local --log-dir, and a resume from the URL."""
    import fsspec

    url = "memory://pretrain-test/run"
    flags = ["--config", TINY, "--data", str(built_output), "--output", url, "--log-dir", str(tmp_path / "logs"),
             "--no-progress", "--steps", "4", "--checkpoint-every", "2", "--log-every", "2"]
    try:
        assert main(flags) == 0
        fs = fsspec.filesystem("memory")
        assert json.loads(fs.cat(f"{url}/checkpoints/latest.json"))["step"] == 4
        assert FaRL.from_checkpoint(f"{url}/checkpoints/step_00000004.pt").has_mim
        assert main([*flags[:-6], "--steps", "6", *flags[-4:]]) == 0  # resumes at 4 from the URL
        assert json.loads(fs.cat(f"{url}/checkpoints/latest.json"))["step"] == 6
        assert [r["step"] for r in metrics(tmp_path / "logs")] == [2, 4, 6]
        assert main(["--config", TINY, "--data", str(built_output), "--output", url]) == 2  # metrics need a local folder
    finally:
        fsspec.filesystem("memory").rm("/pretrain-test", recursive=True)


def test_pruning_keeps_the_new_checkpoint_and_leaves_later_ones(tmp_path: Path) -> None:
    from train.pretraining.checkpoints import Checkpoints

    model = FaRL(model_config("FaRL-tiny"))
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoints = Checkpoints(str(tmp_path))
    checkpoints.save(900, model, optimizer)  # an earlier run's, beyond this run's steps
    for step in (10, 20, 30, 40):
        checkpoints.save(step, model, optimizer)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt") if ".state" not in p.name)
    assert names == ["step_00000020.pt", "step_00000030.pt", "step_00000040.pt", "step_00000900.pt"]
    assert checkpoints.latest().step == 40
    (tmp_path / "checkpoints" / "step_00000050.pt.tmp-deadbeef").write_bytes(b"half")
    Checkpoints(str(tmp_path))  # a new run's writer clears what a kill left half-written
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))
