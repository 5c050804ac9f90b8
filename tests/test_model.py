"""train/model.py: parity with open_clip's ViT-B-16-quickgelu, official-layout files, the MIM forward."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from train.model import MIM_KEYS, FaRL, infer_config, model_config

TINY_MIM = {"depth": 1, "vocab": 192}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def official_file(path: Path, state_dict: dict[str, torch.Tensor], width: int, with_mim: bool) -> Path:
    """A file laid out as the released FaRL weights: {'state_dict': OpenAI-layout keys (+ MIM keys)}
    plus non-tensor entries; the MIM branch has 2 lm_transformer blocks and DALL-E's 8192 codes."""
    state_dict = dict(state_dict)
    if with_mim:
        state_dict["visual.mask_token"] = torch.randn(width)  # a flat token: the loader reshapes it
        lm = open_clip.transformer.Transformer(width, 2, width // 64, act_layer=open_clip.transformer.QuickGELU)
        state_dict.update({f"visual.lm_transformer.{k}": v for k, v in lm.state_dict().items()})
        state_dict["visual.ln_lm.weight"], state_dict["visual.ln_lm.bias"] = torch.ones(width), torch.zeros(width)
        state_dict["visual.lm_head.weight"] = torch.randn(8192, width) * 0.02
    torch.save({"state_dict": state_dict, "epoch": 16, "note": "not a tensor"}, path)
    return path


@pytest.mark.parametrize("with_mim", [False, True])
def test_vitb16_official_file_matches_open_clip(tmp_path: Path, with_mim: bool) -> None:
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    path = official_file(tmp_path / "FaRL-Base-Patch16.pth", reference.state_dict(), 768, with_mim)
    model = FaRL.from_checkpoint(str(path)).eval()
    assert model.has_mim == with_mim
    assert model.config["model"]["vision_cfg"] == {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12}
    images, tokens = torch.randn(2, 3, 224, 224), open_clip.tokenize(["a photo of a face", "two people smiling"])
    with torch.no_grad():
        ours_image, ours_text = model.encode_image(images), model.encode_text(tokens)
        assert ours_image.shape == (2, 512) and ours_text.shape == (2, 512)
        assert relative_error(ours_image, reference.encode_image(images)) < 1e-5
        assert relative_error(ours_text, reference.encode_text(tokens)) < 1e-5
    if with_mim:
        assert model.config["mim"] == {"depth": 2, "vocab": 8192}


def test_saved_checkpoint_loads_into_open_clip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = FaRL(model_config("ViT-B-16-quickgelu"), {"depth": 1, "vocab": 768}).eval()
    clip_only, full = tmp_path / "clip.pt", tmp_path / "full.pt"
    model.save_checkpoint(str(clip_only), include_mim=False)
    model.save_checkpoint(str(full), step=7)
    # open_clip's own loader, strict, with the file as `pretrained`
    strict = open_clip.create_model("ViT-B-16-quickgelu", pretrained=str(clip_only)).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert relative_error(strict.encode_image(images), model.encode_image(images)) < 1e-6
    # the full file: open_clip sees exactly the MIM keys as extra, as with the official FaRL files
    other = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    result = open_clip.load_checkpoint(other, str(full), strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys and all(MIM_KEYS.match(k) for k in result.unexpected_keys)
    assert torch.load(full, weights_only=True)["step"] == 7


def test_round_trip_keeps_config_and_weights(tmp_path: Path) -> None:
    model = FaRL(model_config("FaRL-tiny"), TINY_MIM)
    model.save_checkpoint(str(tmp_path / "a.pt"))
    again = FaRL.from_checkpoint(str(tmp_path / "a.pt"))
    assert again.config == model.config
    for (k, a), (_, b) in zip(model.clip.state_dict().items(), again.clip.state_dict().items()):
        assert torch.equal(a, b), k
    # what the shapes alone say is the same config (heads = width / 64 as in OpenAI's layout)
    assert infer_config(model.state_dict_openai()) == model.config
    without = FaRL.from_checkpoint(str(tmp_path / "a.pt"), with_mim=False)
    assert not without.has_mim and not any(MIM_KEYS.match(k) for k in without.clip.state_dict())


def test_mim_forward() -> None:
    torch.manual_seed(2)
    model = FaRL(model_config("FaRL-tiny"), TINY_MIM).eval()
    images, tokens = torch.randn(3, 3, 64, 64), torch.randint(0, 49408, (3, 77))
    mask = torch.zeros(3, 64, dtype=torch.bool)
    mask[0, :10], mask[1, 5:30], mask[2, 60:] = True, True, True
    with torch.no_grad():
        out = model(images, tokens, mask)
        # the clean half of the concatenated batch is exactly encode_image
        expected = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        assert torch.allclose(out["image_features"], expected, atol=1e-6)
        assert out["mim_logits"].shape == (3, 64, 192)
        assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
        # the masked copy really is masked: the prediction at a masked patch ignores that patch's pixels
        changed = images.clone()
        changed[0, :, 0:8, 0:8] += 5.0  # patch 0 of image 0, which is masked
        assert torch.allclose(model(changed, tokens, mask)["mim_logits"][0, :10], out["mim_logits"][0, :10], atol=1e-5)
        changed[0, :, 16:24, 32:40] += 5.0  # patch 20 of image 0, which is not
        assert not torch.allclose(model(changed, tokens, mask)["mim_logits"][0, :10], out["mim_logits"][0, :10], atol=1e-5)
    with pytest.raises(ValueError, match="no MIM branch"):
        FaRL(model_config("FaRL-tiny"))(images, tokens, mask)


def test_bad_files_give_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        FaRL.from_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        FaRL.from_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="key 'visual.conv1.weight' is missing"):
        FaRL.from_checkpoint(str(tmp_path / "partial.pt"))
    model = FaRL(model_config("FaRL-tiny"))
    state_dict = model.state_dict_openai()
    state_dict["visual.proj"] = torch.zeros(128, 32)  # the config says 128 x 64
    torch.save({"state_dict": state_dict, "farl_config": model.config}, tmp_path / "reshaped.pt")
    with pytest.raises(ValueError, match=r"does not match its model config: .*size mismatch for visual.proj") as err:
        FaRL.from_checkpoint(str(tmp_path / "reshaped.pt"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown model"):
        model_config("ViT-Q-99")


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(3)
    model = FaRL(model_config("FaRL-tiny"), TINY_MIM)
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(0, 49408, (2, 77))
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, 20:40] = True

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(images, tokens, mask)
        (out["image_features"] @ out["text_features"].T).sum().add(out["mim_logits"].square().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.clip.visual.transformer.grad_checkpointing and model.clip.visual.lm_transformer.grad_checkpointing
    for name, grad in grads().items():
        assert torch.allclose(grad, plain[name], atol=1e-6), name


class ScriptedCLIP(torch.nn.Module):
    """A TorchScript archive with OpenAI's key layout, as OpenAI's released ViT-B-16.pt is."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.visual, self.transformer, self.token_embedding = clip.visual, clip.transformer, clip.token_embedding
        self.ln_final = clip.ln_final
        self.positional_embedding, self.text_projection = clip.positional_embedding, clip.text_projection
        self.logit_scale = clip.logit_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_torchscript_and_vision_only_files(tmp_path: Path) -> None:
    torch.manual_seed(4)
    clip = open_clip.model.CLIP(**model_config("FaRL-tiny")).eval()
    torch.jit.script(ScriptedCLIP(clip)).save(str(tmp_path / "openai.pt"))
    model = FaRL.from_checkpoint(str(tmp_path / "openai.pt")).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), clip.encode_image(images), atol=1e-6)
    visual_only = {k: v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    config = infer_config(visual_only)  # the image tower's shapes are enough; the text tower defaults to CLIP's
    assert config["model"]["vision_cfg"] == model.config["model"]["vision_cfg"]


def test_extra_entries_of_any_type_are_ignored(tmp_path: Path) -> None:
    """Official files may carry training arguments (an argparse.Namespace): torch's weights_only
    refuses those, so the loader unpickles such a file in full and still takes only its tensors."""
    import argparse

    model = FaRL(model_config("FaRL-tiny"))
    torch.save({"state_dict": model.state_dict_openai(), "args": argparse.Namespace(lr=1e-3)}, tmp_path / "f.pth")
    again = FaRL.from_checkpoint(str(tmp_path / "f.pth"))
    assert torch.equal(again.clip.visual.conv1.weight, model.clip.visual.conv1.weight)
