"""train/pretraining/losses.py: the loss over 2 ranks (gloo on loopback, real torch.distributed) equals the loss of
one process over the same global batch, and DDP's averaged gradients equal that process's gradients."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from numerics import assert_close
from train.pretraining.losses import FaRLLoss
from train.pretraining.masking import BlockMaskGenerator
from train.model import FaRL, model_config
from train.pretraining.targets import PixelTargets

GLOBAL_BATCH = 8


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=generator)
    tokens = torch.randint(1, 49407, (GLOBAL_BATCH, 77), generator=generator)
    # masks of different sizes on the two ranks: the MIM mean must still be the global batch's
    rng = np.random.default_rng(0)
    masks = [torch.from_numpy(BlockMaskGenerator((8, 8), n, 4)(rng).reshape(-1)) for n in (24, 24, 24, 24, 8, 8, 8, 8)]
    return images, tokens, torch.stack(masks)


def fresh_model() -> FaRL:
    torch.manual_seed(1)
    model = FaRL(model_config("FaRL-tiny"), {"depth": 1, "vocab": 192})
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(20.0))  # sharper than the initial 1/0.07: larger gradients
    return model


def losses_and_grads(model: torch.nn.Module, inner: FaRL, loss_fn: FaRLLoss, images, tokens, mask):
    losses = loss_fn(model(images, tokens, mask), images, mask)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in losses.items()}, grads


def worker(rank: int, result_dir: str) -> None:
    # a file rendezvous: a free port picked beforehand could be taken by another process meanwhile
    dist.init_process_group("gloo", init_method=f"file://{result_dir}/rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(1)
    images, tokens, mask = (t.chunk(2)[rank] for t in global_batch())
    inner = fresh_model()
    model = DistributedDataParallel(inner)
    loss_fn = FaRLLoss(PixelTargets(8), rank=rank, world_size=2)
    losses, grads = losses_and_grads(model, inner, loss_fn, images, tokens, mask)
    torch.save({"losses": losses, "grads": grads}, Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    mp.start_processes(worker, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    inner = fresh_model()
    images, tokens, mask = global_batch()
    single, single_grads = losses_and_grads(inner, inner, FaRLLoss(PixelTargets(8)), images, tokens, mask)

    for name in ("contrastive", "mim", "loss"):  # the mean of the ranks' losses is the global loss
        mean = sum(r["losses"][name] for r in ranks) / 2
        assert mean == pytest.approx(single[name], rel=1e-5), name
    assert ranks[0]["losses"]["contrastive"] != pytest.approx(ranks[1]["losses"]["contrastive"], rel=1e-3)
    # DDP left the same averaged gradient on both ranks (an all-reduce of two terms: the same bits), and
    # it is the one process's gradient up to the order of float32 sums, which torch's CPU kernels choose
    # by ISA, threads and batch shape: so the difference is bounded relative to the gradient's norm (an
    # element where terms cancel keeps their rounding; one in 6.3M of the token embedding's broke
    # allclose(rtol=1e-4, atol=1e-6) with AVX-512). The longest sums behind these gradients have ~600
    # terms (8 texts x 77 tokens into the token embedding, 512-wide MLPs), and Wilkinson's bound for n
    # terms is n eps: 1000 eps. Measured: <= 11 eps (default, avx2, avx512; 1 and 4 threads). A real
    # error is far above: a wrong world size or a gather without gradient is off by >= 40% (> 3e6 eps).
    assert single_grads.keys() == ranks[0]["grads"].keys()
    for name, grad in single_grads.items():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        assert_close(ranks[0]["grads"][name], grad, ulps=1000, what=name)
    assert single_grads["clip.logit_scale"].abs().item() > 0


def test_weights_and_contrastive_only() -> None:
    inner = fresh_model()
    images, tokens, mask = global_batch()
    with torch.no_grad():
        out = inner(images, tokens, mask)
        both = FaRLLoss(PixelTargets(8), contrastive_weight=0.5, mim_weight=2.0)(out, images, mask)
        assert both["loss"].item() == pytest.approx(0.5 * both["contrastive"].item() + 2.0 * both["mim"].item(), rel=1e-6)
        only = FaRLLoss(None)(inner(images, tokens, None), images, None)
        assert set(only) == {"contrastive", "loss"} and only["loss"] == only["contrastive"]
        # the contrastive loss is CLIP's: mean of the two cross-entropies over scaled cosine similarities
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        labels = torch.arange(GLOBAL_BATCH)
        expected = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        assert both["contrastive"].item() == pytest.approx(expected.item(), rel=1e-5)
