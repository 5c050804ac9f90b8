"""Pre-training data: a webdataset loader over the builder's shards (OUT/shards/*.tar).

Each batch is one RandomResizedCrop per sample (the trainer derives its MIM targets from the
same crop), the caption tokenized with open_clip's tokenizer, an optional MIM mask, the
sample keys, and how many samples or shards the producing worker skipped.

Choices:
- Resampled shards by default: every (rank, worker) draws shards with replacement from its
  own seed, so the stream is infinite and no rank runs dry before the others. With one pass
  split by node, ranks get unequal sample counts (shards differ in size, samples get skipped)
  and DDP hangs on the rank that stops first; the one-pass mode is for evaluation and
  single-process runs. Each batch says which loader worker made it and how many samples that
  worker has drawn in the epoch, so a resumed one-pass run can pass over exactly those.
- Crop scale (0.9, 1.0), open_clip's training default: the caption describes the whole
  image, so a crop must keep nearly all of it; FaRL's faces are often small, and aggressive
  crops (torchvision's 0.08) would cut most of them out.
- Face crop bias (`face_crop_bias`, off by default): with that probability a crop is drawn
  among the RandomResizedCrop windows that contain one stored face box (picked at random), so
  that the face survives small crop scales. At the default scale nearly every crop keeps the
  faces anyway; the option matters when the trainer lowers `crop_scale`.
- Shards are opened with fsspec for every URL kind (local paths included), not webdataset's
  gopen, which pipes remote URLs through curl: one code path and fsspec's credentials.
- Nothing in the data crashes a run: an unreadable or truncated shard, a sample without its
  jpg or txt, or an undecodable JPEG is skipped, logged and counted in the batch's `skipped`.
  A missing or broken json only turns the face bias off for that sample. Skips are reported with
  the worker's next batch, so those after a one-pass worker's last batch go uncounted.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import braceexpand
import fsspec
import numpy as np
import open_clip
import torch
import torchvision.transforms.functional as F
import webdataset as wds
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import make_seed, pytorch_worker_info

log = logging.getLogger(__name__)

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
MaskFn = Callable[[np.random.Generator], np.ndarray]  # e.g. train.pretraining.masking.BlockMaskGenerator


@dataclass
class LoaderConfig:
    batch_size: int
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.9, 1.0)
    face_crop_bias: float = 0.0  # probability that a crop must contain a stored face box
    workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = True
    seed: int = 0
    context_length: int = 77
    tokenizer: str = "ViT-B-16-quickgelu"
    exclude_keys: frozenset[str] = frozenset()  # samples never drawn (a held-out set, see pipeline.subset)


def expand_shards(pattern: str) -> list[str]:
    """Shard URLs from: a builder output folder (OUT -> OUT/shards/*.tar), a glob, a brace pattern
    (`out/shards/{00000..00003}.tar`), a comma-free single path, or any of these as an fsspec URL
    (s3://, gs://, file://, memory://). Raises ValueError naming the pattern when nothing matches.

    Names of a brace pattern that do not exist are dropped, as a glob would: the builder writes
    no shard for a unit without samples, so ranges have gaps."""
    found: set[str] = set()
    listings: dict[tuple[int, str], dict[str, str]] = {}
    for part in braceexpand.braceexpand(pattern):
        fs, path = fsspec.core.url_to_fs(part)
        path = path.rstrip("/")
        if re.search(r"[*?\[]", path):
            paths = [p for p in fs.glob(path) if p.endswith(".tar")]
        else:
            kind = _listing(fs, path.rpartition("/")[0] or "/", listings).get(path)
            if kind == "directory":
                shards = path + "/shards"
                paths = fs.glob(f"{shards if fs.isdir(shards) else path}/*.tar")
            else:
                paths = [path] if kind == "file" else []
        found.update(fs.unstrip_protocol(p) for p in paths)
    if not found:
        raise ValueError(f"no shards match {pattern!r}")
    return sorted(found)


def _listing(fs: fsspec.AbstractFileSystem, parent: str, cache: dict) -> dict[str, str]:
    """One listing per folder, not one request per shard: a brace range over an object store
    can name thousands of shards."""
    if (id(fs), parent) not in cache:
        try:
            entries = fs.ls(parent, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        cache[id(fs), parent] = {fs._strip_protocol(e["name"]).rstrip("/"): e["type"] for e in entries}
    return cache[id(fs), parent]


def face_crop_window(width: int, height: int, box: tuple[float, float, float, float],
                     scale: tuple[float, float], generator: torch.Generator | None = None,
                     ) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of a RandomResizedCrop window that contains `box` (x1, y1, x2, y2
    in image pixels), or None when ten draws of size and aspect found none big enough. The
    window's size is drawn as RandomResizedCrop draws it; its position uniformly among the
    positions that keep the box inside."""
    x1, y1 = min(max(0, math.floor(box[0])), width), min(max(0, math.floor(box[1])), height)
    x2, y2 = min(max(0, math.ceil(box[2])), width), min(max(0, math.ceil(box[3])), height)
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        area = width * height * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if max(1, x2 - x1) <= w <= width and max(1, y2 - y1) <= h <= height:
            top = _randint(max(0, y2 - h), min(y1, height - h), generator)
            left = _randint(max(0, x2 - w), min(x1, width - w), generator)
            return top, left, h, w
    return None


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _face_box(raw: bytes | None, image: Image.Image) -> tuple[float, ...] | None:
    """One stored face, picked at random, in stored-image pixels (faces are stored in original
    pixels); None when the json is missing, broken or has no faces."""
    try:
        meta = json.loads(raw)
        faces = meta["faces"]
        if not faces:
            return None
        box = faces[_randint(0, len(faces) - 1, None)]["box"]
        sx, sy = image.width / meta["original_width"], image.height / meta["original_height"]
        return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError):
        return None


def _prepare(sample: dict[str, Any], config: LoaderConfig, tokenizer: Callable) -> dict[str, Any]:
    caption = sample["txt"].decode("utf-8")  # a KeyError here (no txt) skips the sample
    with Image.open(io.BytesIO(sample["jpg"])) as im:
        image = im.convert("RGB")
    window = None
    if config.face_crop_bias > 0 and torch.rand(1).item() < config.face_crop_bias:
        box = _face_box(sample.get("json"), image)
        if box is not None:
            window = face_crop_window(image.width, image.height, box, config.crop_scale)
    if window is None:
        window = RandomResizedCrop.get_params(image, list(config.crop_scale), list(RATIO))
    crop = F.resized_crop(image, *window, [config.image_size] * 2,
                          interpolation=InterpolationMode.BICUBIC, antialias=True)
    out = {"image": F.normalize(F.to_tensor(crop), open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
           "text": tokenizer([caption])[0], "__drawn__": sample["__drawn__"]}
    return out


def _add_masks(samples: Iterable[dict], mask_fn: MaskFn, seed: int, epoch: int) -> Iterator[dict]:
    rng = np.random.default_rng(_worker_seed(seed + 1, epoch))  # seeded inside the worker, as the shuffle
    for sample in samples:
        sample["mask"] = torch.from_numpy(np.asarray(mask_fn(rng), dtype=bool).reshape(-1))
        yield sample


class _Skips:
    """The handler of every stage: logs and counts what it skips, and reports the count in the
    next batch. Each DataLoader worker holds its own copy, so counts are per producing worker."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipped a sample or shard: %s", repr(exn)[:300])
        return True  # continue with the next sample or shard

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _number(samples: Iterable[dict], start: Sequence[int]) -> Iterator[dict]:
    """Numbers the samples this loader worker draws from its shuffled stream in this epoch, after
    passing over the `start[worker]` that a resumed one-pass run already trained on (before
    decoding). Samples skipped later as corrupt have numbers too, so the last number of a batch
    says exactly where the worker's stream stands."""
    worker = pytorch_worker_info()[2]
    first = start[worker] if worker < len(start) else 0
    for number, sample in enumerate(islice(samples, first, None), first + 1):
        yield {**sample, "__drawn__": number}


def _collate(samples: list[dict[str, Any]], skips: _Skips) -> dict[str, Any]:
    batch = {name: torch.stack([s[name] for s in samples]) for name in samples[0] if not name.startswith("__")}
    batch["key"] = [s["__key__"] for s in samples]  # wds.map carries the key over
    batch["skipped"] = torch.tensor(skips.take(), dtype=torch.int64)
    batch["position"] = torch.tensor([pytorch_worker_info()[2], samples[-1]["__drawn__"]], dtype=torch.int64)
    return batch


def _worker_seed(seed: int, epoch: int) -> int:
    rank, _, worker, _ = pytorch_worker_info()
    return make_seed(seed, rank, worker, epoch)


def _open_shards(shards: Iterable[dict], handler: _Skips) -> Iterator[dict]:
    for shard in shards:
        try:
            stream = fsspec.open(shard["url"], "rb").open()
        except Exception as exn:  # whatever the backend raises for a missing or unreadable shard
            handler(exn)
            continue
        with stream:
            yield {**shard, "stream": stream}


def _samples(shards: Iterable[dict], handler: _Skips) -> Iterator[dict]:
    """The samples of each shard in turn, grouped within it: group_by_keys over the files of a run
    of shards would merge the last sample of one shard with the first of the next when their keys
    are equal, as when a resampled stream draws a one-sample shard twice in a row."""
    for shard in shards:
        yield from group_by_keys(tar_file_expander([shard], handler=handler), handler=handler)


def _keep(samples: Iterable[dict], exclude: frozenset[str]) -> Iterator[dict]:
    return (sample for sample in samples if sample["__key__"] not in exclude)


def iter_samples(pattern: str) -> Iterator[dict]:
    """Every sample of the shards of `pattern` (see expand_shards) once, in shard and stored order, as
    webdataset dicts of bytes, read in this process; unreadable shards and samples are skipped and logged."""
    skips = _Skips()
    yield from _samples(_open_shards(({"url": url} for url in expand_shards(pattern)), skips), skips)


def _shuffle(samples: Iterable[dict], bufsize: int, seed: int, epoch: int) -> Iterator[dict]:
    # seeded inside the worker, so that workers and ranks shuffle differently
    yield from wds.shuffle(bufsize, rng=random.Random(_worker_seed(seed, epoch)))(samples)


def make_loader(pattern: str, config: LoaderConfig, mask_fn: MaskFn | None = None,
                epoch: int = 0, start: Sequence[int] = ()) -> Iterable[dict[str, Any]]:
    """Batches as dicts: image float32 (B,3,S,S) normalised with open_clip's OPENAI_DATASET_MEAN/STD,
    text int64 (B, context_length), mask bool (B, N) when mask_fn is given (mask_fn(rng) per sample,
    flattened), key list[str], skipped int64 scalar: samples or shards the producing worker skipped
    since its previous batch, position int64 (2,): the producing loader worker and how many samples
    it has drawn in this epoch. Infinite when resampled; one pass (reshuffled by epoch and seed)
    otherwise, with a last partial batch. `start[w]`: samples loader worker w drew in this epoch
    before a resume (the `position`s of the last batches trained on), passed over before decoding."""
    urls = expand_shards(pattern)
    if config.resampled:
        shards = [wds.ResampledShards(urls, worker_seed=partial(_worker_seed, config.seed, epoch),
                                      deterministic=True)]
    else:
        _, world_size, _, _ = pytorch_worker_info()
        readers = world_size * max(1, config.workers)
        if len(urls) < readers:
            raise ValueError(f"{len(urls)} shards for {readers} readers ({world_size} ranks × "
                             f"{max(1, config.workers)} workers): some would get no data; use resampled mode")
        # the same shuffled order on every rank, so that split_by_node partitions it
        shards = [wds.SimpleShardList(urls, seed=make_seed(config.seed, epoch)), wds.split_by_node, wds.split_by_worker]
    skips = _Skips()
    tokenizer = open_clip.get_tokenizer(config.tokenizer, context_length=config.context_length)
    pipeline = wds.DataPipeline(
        *shards,
        partial(_open_shards, handler=skips),
        partial(_samples, handler=skips),
        *([partial(_keep, exclude=config.exclude_keys)] if config.exclude_keys else []),
        # shuffle the encoded bytes, a tenth the size of decoded tensors
        partial(_shuffle, bufsize=config.shuffle_buffer, seed=config.seed, epoch=epoch),
        partial(_number, start=start),
        wds.map(partial(_prepare, config=config, tokenizer=tokenizer), handler=skips),
        *([partial(_add_masks, mask_fn=mask_fn, seed=config.seed, epoch=epoch)] if mask_fn else []),
        wds.batched(config.batch_size, collation_fn=partial(_collate, skips=skips), partial=True),
    )
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=config.workers,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available())
