"""train/downstream/face_model.py and train/downstream/upernet.py: shapes, initialisation from OpenAI-layout files with the
position embedding resized, the ViT-B/16 backbone at 448, heatmaps and losses."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from train.downstream.face_model import FaceModel, ViTBackbone, alignment_loss, gaussian_heatmaps, heatmap_points, parsing_loss
from train.model import FaRL, model_config

TINY = dict(input_size=64, channels=16, blocks=(0, 0, 1, 1))


def test_parsing_and_alignment_shapes() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 80, 80)
    parser = FaceModel("parsing", 11, model_config("FaRL-tiny"), **TINY)
    assert parser(images).shape == (2, 11, 80, 80)
    aligner = FaceModel("alignment", 68, model_config("FaRL-tiny"), heatmap_size=32, **TINY)
    heatmaps = aligner(images)
    assert heatmaps.shape == (2, 68, 32, 32)
    points = heatmap_points(heatmaps)
    assert points.shape == (2, 68, 2) and (points >= 0).all() and (points <= 1).all()
    with pytest.raises(ValueError, match="unknown task"):
        FaceModel("depth", 1, model_config("FaRL-tiny"), **TINY)
    with pytest.raises(ValueError, match="feature blocks"):
        FaceModel("parsing", 2, model_config("FaRL-tiny"), input_size=64, channels=8)  # 3, 5, 7, 11 of 2 blocks


def test_init_from_an_openai_layout_file_resizes_the_position_embedding(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = FaRL(model_config("FaRL-tiny"), {"depth": 1, "vocab": 192})  # 64 px: an 8x8 grid
    source.save_checkpoint(str(tmp_path / "farl.pt"))
    model = FaceModel.create("parsing", 19, str(tmp_path / "farl.pt"), input_size=128, channels=16, blocks=(0, 0, 1, 1))
    visual, original = model.backbone.visual, source.clip.visual
    assert torch.equal(visual.conv1.weight, original.conv1.weight)
    assert torch.equal(visual.transformer.resblocks[1].mlp.c_fc.weight, original.transformer.resblocks[1].mlp.c_fc.weight)
    # 1 + 8x8 tokens -> 1 + 16x16, bicubic on the patch grid, the class token's embedding kept
    assert visual.positional_embedding.shape == (1 + 16 * 16, 128)
    grid = original.positional_embedding[1:].reshape(1, 8, 8, 128).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(visual.positional_embedding[1:], expected.permute(0, 2, 3, 1).reshape(256, 128), atol=1e-6)
    assert torch.equal(visual.positional_embedding[0], original.positional_embedding[0])


def test_vitb16_backbone_at_448_matches_open_clip_blocks() -> None:
    torch.manual_seed(2)
    reference = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).visual.eval()
    state = {f"visual.{k}": v for k, v in reference.state_dict().items()}
    backbone = ViTBackbone(model_config("ViT-B-16-quickgelu"), image_size=224).eval()
    backbone.load_openai(state, "reference")
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        features = backbone(images)
        # block 11's class token, through ln_post and proj, is open_clip's image embedding
        normalised = (images - backbone.mean) / backbone.std
        assert len(features) == 4 and features[3].shape == (1, 768, 14, 14)
        big = ViTBackbone(model_config("ViT-B-16-quickgelu"), image_size=448)
        big.load_openai(state, "reference")
        assert [f.shape for f in big(torch.rand(1, 3, 448, 448))] == [(1, 768, 28, 28)] * 4
        expected = reference(normalised)
    tokens = []
    hook = backbone.visual.transformer.resblocks[11].register_forward_hook(lambda m, i, o: tokens.append(o))
    with torch.no_grad():
        backbone(images)
    hook.remove()
    pooled = backbone.visual.ln_post(tokens[0][:, 0]) @ backbone.visual.proj
    assert torch.allclose(pooled, expected, atol=1e-5)
    assert torch.allclose(tokens[0][:, 1:].transpose(1, 2).reshape(1, 768, 14, 14), features[3])


def test_heatmaps_and_losses() -> None:
    points = torch.tensor([[[0.25, 0.5], [0.7, 0.2]]])
    targets = gaussian_heatmaps(points, 64, sigma=2.0)
    assert targets.shape == (1, 2, 64, 64) and targets.max() <= 1
    logits = torch.logit(targets.clamp(1e-6, 1 - 1e-6))
    assert torch.allclose(heatmap_points(logits), points, atol=2e-3)
    perfect = alignment_loss(logits, points)
    wrong = alignment_loss(logits, points.flip(-1))
    assert perfect["point"] < 2e-3 and wrong["point"] > 0.1 and wrong["loss"] > perfect["loss"]
    assert perfect["loss"] == pytest.approx((perfect["point"] + perfect["heatmap"]).item())
    labels = torch.tensor([[[0, 1], [2, 255]]])
    confident = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [2, 0]]]), 3).permute(0, 3, 1, 2).float() * 50
    assert parsing_loss(confident, labels)["loss"] < 1e-6  # the ignored pixel (255) does not count
    assert parsing_loss(-confident, labels)["loss"] > 10
