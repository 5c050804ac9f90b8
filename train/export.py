"""Export a checkpoint as one weights file for open_clip and for FaRL's downstream code.

    python -m train.export --source out/pretrain --output farl_vitb16.pt    # the run's latest checkpoint
    python -m train.export --source out/pretrain/checkpoints/step_00078000.pt --output farl.pt --keep-mim

The file is `{'state_dict', 'farl_config', 'exported_from'}` in the OpenAI CLIP key layout of the
released FaRL weights. Without the MIM branch (the default) open_clip's own loader takes it strictly:
`open_clip.create_model("ViT-B-16-quickgelu", pretrained="farl_vitb16.pt")`. Training checkpoints
keep the branch, which open_clip then loads only with strict=False. `train.finetune --init` and
FaRL's downstream code read either: they keep the `visual.` keys.
"""

from __future__ import annotations

import posixpath
import sys
from dataclasses import dataclass

from pipeline.config import ConfigError, load_config, option
from pipeline.storage import Output
from train.pretraining.checkpoints import Checkpoints
from train.model import FaRL


@dataclass
class ExportConfig:
    source: str = option("", "a checkpoint file (ours, an official FaRL file, any OpenAI-CLIP-layout ViT) or a "
                             "pre-training output folder, whose latest checkpoint is taken; local path or fsspec URL")
    output: str = option("", "the weights file to write (local path or fsspec URL); written whole or not at all")
    keep_mim: bool = option(False, "keep the MIM branch (mask token, lm_transformer, ln_lm, lm_head), which the "
                                   "source must have; open_clip then loads the file only with strict=False")

    def validate(self) -> None:
        if not self.source or not self.output:
            raise ConfigError("--source and --output are required")


def checkpoint_path(source: str) -> str:
    """`source` itself, or the latest checkpoint of the pre-training output folder it names."""
    checkpoints = Checkpoints(source, writer=False)
    if not checkpoints.output.fs.isdir(checkpoints.output.root):
        return source
    latest = checkpoints.latest_model()
    if latest is None:
        raise ValueError(f"{source} is a folder without checkpoints/latest.json: "
                         "give a pre-training output folder or a checkpoint file")
    return latest


def export(cfg: ExportConfig) -> str:
    """Write cfg.output; returns the checkpoint it was made from."""
    path = checkpoint_path(cfg.source)
    output = Output(cfg.output)  # rooted at the file itself: write_atomic needs only its file system
    if output.fs.isdir(output.root):
        raise ValueError(f"--output {cfg.output} is a folder: give the file to write")
    if output.fs.exists(output.root) and Output(path).root == output.root:
        raise ValueError(f"--output {cfg.output} is the checkpoint it would be made from: give another file")
    model = FaRL.from_checkpoint(path, with_mim=cfg.keep_mim)
    data = model.checkpoint_bytes(include_mim=cfg.keep_mim, exported_from=path)
    try:
        output.makedirs(posixpath.dirname(output.root))
        output.write_atomic(output.root, lambda f: f.write(data))
    except OSError as err:  # permissions, a full disk, a bucket that refuses
        raise RuntimeError(f"cannot write {cfg.output}: {err}") from None
    return path


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(ExportConfig, argv, "Export a checkpoint as one weights file for open_clip and FaRL's tools.")
        source = export(cfg)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    mim = "with" if cfg.keep_mim else "without"
    print(f"wrote {cfg.output} ({mim} the MIM branch) from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
