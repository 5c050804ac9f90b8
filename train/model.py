"""FaRL: open_clip's CLIP (`ViT-B-16-quickgelu`) plus the masked-image-modeling (MIM) branch.

The MIM parts live on the image tower as `visual.mask_token`, `visual.lm_transformer`,
`visual.ln_lm` and `visual.lm_head`, so `model.clip.state_dict()` is exactly the OpenAI CLIP key
layout of the official FaRL files, MIM keys included: nothing is renamed on save or load.

Training forward: the clean and the masked copy of a batch go through the shared encoder as one
concatenated batch; the clean half gives the CLIP image features, the masked half goes on through
`lm_transformer` (all tokens, class token included), `ln_lm` and `lm_head`, whose outputs are
kept only at masked positions.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle
import re
from typing import Any

import fsspec
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import nn

log = logging.getLogger("train")
MIM_KEYS = re.compile(r"^visual\.(mask_token|lm_transformer\.|ln_lm\.|lm_head\.)")

# Named configurations besides open_clip's own (any open_clip ViT name works too, e.g. the paper's
# `ViT-B-16-quickgelu`). Head width 64, as in OpenAI's layout, so a saved file's shapes say it all.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "FaRL-tiny": {  # for the CPU: a 2-block ViT on 64 px crops, patch 8 (an 8 x 8 grid)
        "embed_dim": 64, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 2},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    },
}


def model_config(name: str) -> dict[str, Any]:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg, quick_gelu) of a named model."""
    config = MODEL_CONFIGS.get(name) or open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"unknown model '{name}': use one of {sorted(MODEL_CONFIGS)} or an open_clip name "
                         "such as ViT-B-16-quickgelu")
    return copy.deepcopy(config)


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The FaRL config of an OpenAI-layout state dict, from its shapes. Not open_clip's
    build_model_from_openai_state_dict: it casts to fp16 and counts MIM blocks as vision layers."""
    try:
        conv = state_dict["visual.conv1.weight"]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        model = {
            "embed_dim": state_dict["visual.proj"].shape[1], "quick_gelu": True,
            "vision_cfg": {"image_size": conv.shape[-1] * grid, "patch_size": conv.shape[-1], "width": conv.shape[0],
                           "layers": _count_blocks(state_dict, "visual.transformer.resblocks.")},
            "text_cfg": model_config("ViT-B-16-quickgelu")["text_cfg"],  # for vision-only files (the backbone needs no more)
        }
        if "ln_final.weight" in state_dict:
            text_width = state_dict["ln_final.weight"].shape[0]
            model["text_cfg"] = {"context_length": state_dict["positional_embedding"].shape[0],
                                 "vocab_size": state_dict["token_embedding.weight"].shape[0], "width": text_width,
                                 "heads": text_width // 64, "layers": _count_blocks(state_dict, "transformer.resblocks.")}
    except KeyError as err:
        raise ValueError(f"not an OpenAI-CLIP-layout ViT state dict: key {err} is missing") from None
    mim = None
    if "visual.lm_head.weight" in state_dict:
        mim = {"depth": _count_blocks(state_dict, "visual.lm_transformer.resblocks."),
               "vocab": state_dict["visual.lm_head.weight"].shape[0]}
    return {"model": model, "mim": mim}


class FaRL(nn.Module):
    """CLIP towers from open_clip plus, when `mim` is given ({"depth": D, "vocab": V}), the MIM branch."""

    def __init__(self, model: dict[str, Any], mim: dict[str, int] | None = None):
        super().__init__()
        self.config = {"model": copy.deepcopy(model), "mim": dict(mim) if mim else None}
        self.clip = CLIP(**model)
        if mim:
            visual = self.clip.visual
            width = visual.conv1.out_channels
            visual.mask_token = nn.Parameter(torch.zeros(1, 1, width))
            nn.init.trunc_normal_(visual.mask_token, std=0.02)  # as BEiT
            visual.lm_transformer = Transformer(width, mim["depth"], width // 64, act_layer=QuickGELU)
            visual.ln_lm = LayerNorm(width)
            visual.lm_head = nn.Linear(width, mim["vocab"], bias=False)

    @property
    def has_mim(self) -> bool:
        return self.config["mim"] is not None

    @property
    def grid(self) -> tuple[int, int]:
        return self.clip.visual.grid_size

    @property
    def patch_size(self) -> int:
        return self.clip.visual.conv1.kernel_size[0]

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def _embed(self, patches: torch.Tensor) -> torch.Tensor:
        """open_clip's VisionTransformer._embeds after conv1: class token, positions, ln_pre."""
        visual = self.clip.visual
        cls = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)
        return visual.ln_pre(visual.patch_dropout(x))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Normalised image and text features, the logit scale (exp'd) and, when `mask` (B, N) bool
        is given, the MIM outputs of every patch, (B, N, vocab): the loss keeps the masked ones.
        All patches rather than `[mask]`: a boolean index would sync with the host every step and
        change shapes between batches (which torch.compile recompiles for), for ~1% of the FLOPs."""
        visual = self.clip.visual
        batch = images.shape[0]
        patches = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, N, width)
        x = self._embed(patches)
        if mask is not None:
            if not self.has_mim:
                raise ValueError("a mask was given but this model has no MIM branch")
            masked = torch.where(mask.unsqueeze(-1), visual.mask_token.to(patches.dtype), patches)
            x = torch.cat([x, self._embed(masked)])
        x = visual.transformer(x)
        pooled, _ = visual._pool(x[:batch] if mask is not None else x)
        image_features = F.normalize(pooled @ visual.proj, dim=-1)
        mim_logits = None
        if mask is not None:
            mim_logits = visual.lm_head(visual.ln_lm(visual.lm_transformer(x[batch:]))[:, 1:])
        return {"image_features": image_features, "text_features": self.encode_text(tokens, normalize=True),
                "logit_scale": self.clip.logit_scale.exp(), "mim_logits": mim_logits}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)
        if self.has_mim:
            self.clip.visual.lm_transformer.grad_checkpointing = enable

    def state_dict_openai(self, include_mim: bool = True) -> dict[str, torch.Tensor]:
        """The OpenAI CLIP key layout of the official FaRL files."""
        return {k: v for k, v in self.clip.state_dict().items() if include_mim or not MIM_KEYS.match(k)}

    def checkpoint_bytes(self, include_mim: bool = True, **extra: Any) -> bytes:
        """`{'state_dict': ..., 'farl_config': ..., **extra}` as torch.save writes it: loads with
        torch.load(weights_only=True), into official FaRL tools, and into open_clip (strictly
        when include_mim=False)."""
        buffer = io.BytesIO()
        config = {**self.config, "mim": self.config["mim"] if include_mim else None}
        torch.save({"state_dict": self.state_dict_openai(include_mim), "farl_config": config, **extra}, buffer)
        return buffer.getvalue()

    def save_checkpoint(self, path: str, include_mim: bool = True, **extra: Any) -> None:
        with fsspec.open(path, "wb") as f:
            f.write(self.checkpoint_bytes(include_mim, **extra))

    @classmethod
    def from_checkpoint(cls, path: str, with_mim: bool | None = None) -> "FaRL":
        """An official FaRL file, an OpenAI-layout file, or one of ours. `with_mim=None` keeps the MIM
        branch exactly when the file has one."""
        state_dict, config = load_state_dict(path)
        if with_mim is False:
            config["mim"] = None
            state_dict = {k: v for k, v in state_dict.items() if not MIM_KEYS.match(k)}
        elif with_mim and not config["mim"]:
            raise ValueError(f"{path} has no MIM branch (no visual.lm_head.weight)")
        model = cls(**config)
        if "visual.mask_token" in state_dict:  # shape (1, 1, W) here, possibly (W,) elsewhere
            state_dict["visual.mask_token"] = state_dict["visual.mask_token"].reshape(1, 1, -1)
        try:
            missing, unexpected = model.clip.load_state_dict(state_dict, strict=False)
        except RuntimeError as err:  # shapes other than the config's; torch's message has a line per tensor
            raise ValueError(f"{path} does not match its model config: {' '.join(str(err).split())[:300]}") from None
        if missing or unexpected:
            raise ValueError(f"{path} does not match its model config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model


def load_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(OpenAI-layout tensors, FaRL config) of a checkpoint file; non-tensor entries are ignored."""
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
        checkpoint = _load(data)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # torch raises several types for a file that is no checkpoint
        raise ValueError(f"checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of tensors")
    state_dict = checkpoint.get("state_dict", checkpoint)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's TorchScript files carry these
        state_dict.pop(key, None)
    config = checkpoint.get("farl_config") or infer_config(state_dict)
    return state_dict, config


def _load(data: bytes) -> Any:
    """torch.load without unpickling code; OpenAI's released CLIP files are TorchScript archives,
    which weights_only refuses, and are read as such."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as err:
        if "TorchScript" in str(err):
            return torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
        if "Weights only load failed" not in str(err):
            raise
    # extra entries of types torch does not allow by default (an argparse.Namespace of training args, say):
    # a file the user names is trusted, as torch.load did before weights_only existed
    log.warning("checkpoint holds more than tensors and plain values; unpickling it in full")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
