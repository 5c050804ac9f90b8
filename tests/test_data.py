"""The pre-training loader (train.pretraining.data) over real shards in the builder's format: batches and
tokens, shard patterns and fsspec URLs, bad data skipped and counted, splitting by worker and
node, resampling, and face-biased crops."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from collections import Counter
from itertools import islice
from pathlib import Path

import fsspec
import numpy as np
import open_clip
import pytest
import skimage.data
import torch
from PIL import Image

from train.pretraining.data import LoaderConfig, expand_shards, face_crop_window, make_loader

PHOTOS = {"astronaut": skimage.data.astronaut(), "camera": skimage.data.camera(), "coffee": skimage.data.coffee()}
# the astronaut's face in original pixels (the stored image is half the original size)
FACE = {"box": [330.0, 60.0, 540.0, 330.0], "landmarks": [[400.0, 180.0]] * 5, "score": 0.99}


def jpeg(name: str) -> bytes:
    """A real photo stored at half its size, as the builder re-encodes large images."""
    image = Image.fromarray(PHOTOS[name])
    image = image.resize((image.width // 2, image.height // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sample(key: str, photo: str) -> dict[str, bytes]:
    """KEY.jpg, KEY.txt and KEY.json as pipeline.write lays them out."""
    width, height = Image.open(io.BytesIO(jpeg(photo))).size
    meta = {"url": f"https://img.example.com/{key}.jpg", "sample_id": int(key), "width": width, "height": height,
            "original_width": 2 * width, "original_height": 2 * height, "sha256": "0" * 64,
            "faces": [FACE] if photo == "astronaut" else []}
    return {"jpg": jpeg(photo), "txt": f"a photo of {photo}, sample {key}".encode(), "json": json.dumps(meta).encode()}


def tar_bytes(samples: dict[str, dict[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def shard_samples(shard: int, n: int = 3) -> dict[str, dict[str, bytes]]:
    keys = [f"{shard:05d}{row:09d}" for row in range(n)]
    return {key: sample(key, photo) for key, photo in zip(keys, PHOTOS)}


def write_output(root: Path, shards: int = 4) -> dict[str, str]:
    """An output folder OUT/shards/NNNNN.tar; returns each key's caption."""
    (root / "shards").mkdir(parents=True)
    captions = {}
    for shard in range(shards):
        samples = shard_samples(shard)
        (root / "shards" / f"{shard:05d}.tar").write_bytes(tar_bytes(samples))
        captions.update({key: s["txt"].decode() for key, s in samples.items()})
    return captions


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("data") / "out"
    return root, write_output(root)


def one_pass(pattern: str, **overrides) -> list[dict]:
    config = LoaderConfig(**{"batch_size": 4, "workers": 0, "resampled": False, "shuffle_buffer": 8, **overrides})
    return list(make_loader(pattern, config))


def keys_of(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def test_batches_hold_normalised_crops_tokens_and_masks(output):
    root, captions = output
    config = LoaderConfig(batch_size=5, workers=0, resampled=False, shuffle_buffer=8)
    batches = list(make_loader(str(root), config, mask_fn=lambda rng: rng.random((14, 14)) < 0.4))
    assert sorted(keys_of(batches)) == sorted(captions)
    assert [len(b["key"]) for b in batches] == [5, 5, 2]  # the last partial batch is kept
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    for batch in batches:
        n = len(batch["key"])
        assert batch["image"].shape == (n, 3, 224, 224) and batch["image"].dtype == torch.float32
        assert (batch["image"] >= -mean / std - 1e-5).all() and (batch["image"] <= (1 - mean) / std + 1e-5).all()
        assert batch["image"].std() > 0.3  # a photo, not a blank
        assert batch["text"].shape == (n, 77) and batch["text"].dtype == torch.int64
        expected = tokenizer([captions[key] for key in batch["key"]])
        assert torch.equal(batch["text"], expected)
        assert batch["mask"].shape == (n, 196) and batch["mask"].dtype == torch.bool
        assert batch["skipped"].dtype == torch.int64 and batch["skipped"].ndim == 0 and batch["skipped"] == 0


def test_expand_shards_patterns(output):
    root, _ = output
    shards = root / "shards"
    expected = [f"file://{shards}/{i:05d}.tar" for i in range(4)]
    assert expand_shards(str(root)) == expected  # an output folder
    assert expand_shards(str(shards)) == expected  # its shards folder
    assert expand_shards(f"{shards}/*.tar") == expected
    assert expand_shards(f"{shards}/{{00001..00007}}.tar") == expected[1:]  # gaps are dropped, like a glob
    assert expand_shards(f"file://{shards}/00002.tar") == expected[2:3]
    assert expand_shards(f"file://{root}") == expected
    for pattern in (f"{shards}/*.zip", f"{root}/missing", f"{shards}/{{00010..00012}}.tar"):
        with pytest.raises(ValueError, match="no shards match") as error:
            expand_shards(pattern)
        assert pattern in str(error.value) and "\n" not in str(error.value)


def test_memory_filesystem():
    fs = fsspec.filesystem("memory")
    root = f"/laion-face-test-{uuid.uuid4().hex}"
    captions = {}
    try:
        for shard in range(2):
            samples = shard_samples(shard)
            fs.pipe(f"{root}/shards/{shard:05d}.tar", tar_bytes(samples))
            captions.update({key: s["txt"].decode() for key, s in samples.items()})
        assert expand_shards(f"memory://{root}") == [f"memory://{root}/shards/{i:05d}.tar" for i in range(2)]
        assert sorted(keys_of(one_pass(f"memory://{root}/shards/{{00000..00001}}.tar"))) == sorted(captions)
    finally:
        fs.rm(root, recursive=True)


def test_bad_data_is_skipped_and_counted(tmp_path: Path):
    shards = tmp_path / "out" / "shards"
    shards.mkdir(parents=True)
    good = shard_samples(0)
    (shards / "00000.tar").write_bytes(tar_bytes(good))
    (shards / "00001.tar").write_bytes(np.random.default_rng(0).bytes(30_000))  # not a tar
    truncated = shard_samples(2)
    data = tar_bytes(truncated)
    (shards / "00002.tar").write_bytes(data[: len(data) // 2])  # a copy cut short
    broken = shard_samples(3)
    no_caption, bad_jpeg, bad_json = list(broken)
    del broken[no_caption]["txt"]
    broken[bad_jpeg]["jpg"] = b"\xff\xd8\xff\xe0 not a jpeg at all"
    broken[bad_json]["json"] = b"{broken"
    (shards / "00003.tar").write_bytes(tar_bytes(broken))

    batches = one_pass(str(tmp_path / "out"), batch_size=2, face_crop_bias=1.0)
    arrived = keys_of(batches)
    # the truncated shard's first sample still arrives; a broken json only disables the face bias
    assert sorted(arrived) == sorted([*good, next(iter(truncated)), bad_json])
    # the corrupt shard, the truncated one (at least once), the missing caption, the bad JPEG
    assert sum(int(b["skipped"]) for b in batches) >= 4


def test_one_pass_splits_by_worker_and_node(output, monkeypatch):
    root, captions = output
    config = LoaderConfig(batch_size=2, workers=2, resampled=False, shuffle_buffer=4)
    epoch0 = keys_of(list(make_loader(str(root), config, epoch=0)))
    assert Counter(epoch0) == Counter(captions.keys())  # each sample exactly once across 2 workers
    epoch1 = keys_of(list(make_loader(str(root), config, epoch=1)))
    assert Counter(epoch1) == Counter(captions.keys()) and epoch1 != epoch0  # reshuffled per epoch

    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(keys_of(one_pass(str(root))))
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    assert Counter(per_rank[0] + per_rank[1]) == Counter(captions.keys())


def test_one_pass_goes_on_from_the_workers_positions(tmp_path: Path):
    """A loader started at the positions of the batches trained on delivers exactly the rest of the
    epoch, corrupt samples included in the counts (they are drawn, then skipped)."""
    shards = tmp_path / "out" / "shards"
    shards.mkdir(parents=True)
    for shard in range(4):
        samples = shard_samples(shard)
        if shard == 1:
            del samples[next(iter(samples))]["txt"]  # drawn, then skipped when decoded
        (shards / f"{shard:05d}.tar").write_bytes(tar_bytes(samples))
    config = LoaderConfig(batch_size=2, workers=2, resampled=False, shuffle_buffer=4, seed=3)
    whole = list(make_loader(str(tmp_path / "out"), config, epoch=2))
    assert len(keys_of(whole)) == 11 and sum(int(b["skipped"]) for b in whole) == 1
    for trained in (1, 3, 4):
        start = [0, 0]
        for batch in whole[:trained]:
            worker, drawn = batch["position"].tolist()
            start[worker] = drawn
        rest = keys_of(list(make_loader(str(tmp_path / "out"), config, epoch=2, start=start)))
        assert sorted(rest) == sorted(keys_of(whole[trained:]))
    assert list(make_loader(str(tmp_path / "out"), config, epoch=2, start=[6, 6])) == []  # the epoch was over


def test_too_few_shards_for_one_pass(output, monkeypatch):
    root, _ = output
    with pytest.raises(ValueError, match="resampled") as error:
        make_loader(f"{root}/shards/00000.tar", LoaderConfig(batch_size=2, workers=2, resampled=False))
    assert "\n" not in str(error.value)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="3 ranks"):
        make_loader(str(root), LoaderConfig(batch_size=2, workers=2, resampled=False))


def test_a_one_sample_shard_drawn_twice_in_a_row_gives_two_samples(tmp_path: Path):
    """Keys are unique across shards, but a resampled stream can draw the same shard twice in a row."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(tar_bytes(shard_samples(0, n=1)))
    batches = list(islice(make_loader(str(tmp_path), LoaderConfig(batch_size=2, workers=0, shuffle_buffer=1)), 3))
    assert keys_of(batches) == ["00000000000000"] * 6 and sum(int(b["skipped"]) for b in batches) == 0


def test_resampled_is_infinite(output):
    root, captions = output
    loader = make_loader(str(root), LoaderConfig(batch_size=4, workers=0, shuffle_buffer=8, face_crop_bias=0.5))
    batches = list(islice(loader, 10))  # 40 samples from 12
    keys = keys_of(batches)
    assert len(keys) == 40 and set(keys) <= set(captions)
    assert all(b["image"].shape == (4, 3, 224, 224) for b in batches)


def test_face_crop_bias_keeps_the_stored_face_in_the_crop(tmp_path: Path):
    """The loader's crops at a small scale, on images that are black but for a white square where
    their json says the face is (a marker, so that a crop shows whether it holds the face)."""
    marker = np.zeros((400, 400, 3), dtype=np.uint8)
    marker[300:380, 40:120] = 255
    buffer = io.BytesIO()
    Image.fromarray(marker).save(buffer, format="PNG")
    meta = {"original_width": 400, "original_height": 400, "faces": [{"box": [40.0, 300.0, 120.0, 380.0]}]}
    samples = {f"{row:014d}": {"jpg": buffer.getvalue(), "txt": b"a face", "json": json.dumps(meta).encode()}
               for row in range(40)}
    (tmp_path / "out" / "shards").mkdir(parents=True)
    (tmp_path / "out" / "shards" / "00000.tar").write_bytes(tar_bytes(samples))

    def white_share(bias: float) -> np.ndarray:
        """Per crop, the share of white pixels (normalised white is above 1.8 in every channel)."""
        images = torch.cat([b["image"] for b in one_pass(str(tmp_path / "out"), batch_size=8, image_size=64,
                                                         crop_scale=(0.1, 0.2), face_crop_bias=bias)])
        return (images > 1.8).all(1).float().mean((1, 2)).numpy()

    biased, plain = white_share(1.0), white_share(0.0)
    assert len(biased) == len(plain) == 40
    # the whole 80 x 80 square is in every biased crop: 4 % of the image, 20-40 % of a crop (less its
    # edges, which the resize blurs)
    assert biased.min() > 0.12 and biased.max() < 0.5
    assert (plain < 0.12).mean() > 0.5  # most crops of the same scale miss most of it


def test_face_crop_window_contains_the_box():
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    scale = (0.25, 0.5)
    for _ in range(500):
        # near-square images and face-sized boxes: every window of this scale is big enough
        width, height = (int(v) for v in rng.integers(400, 530, size=2))
        x1, y1 = rng.uniform(0, 0.75 * width), rng.uniform(0, 0.75 * height)
        x2, y2 = x1 + rng.uniform(1, 0.25 * width), y1 + rng.uniform(1, 0.25 * height)
        top, left, h, w = face_crop_window(width, height, (x1, y1, x2, y2), scale, generator)
        assert 0 <= left <= x1 and x2 <= left + w <= width
        assert 0 <= top <= y1 and y2 <= top + h <= height
        assert 0.25 * 0.98 <= w * h / (width * height) <= 0.5 * 1.02
    corner = face_crop_window(400, 400, (350.0, 360.0, 400.0, 400.0), scale, generator)
    assert corner[0] + corner[2] == 400 and corner[1] + corner[3] == 400
    # deterministic with a seeded generator; None when no window of the scale holds the box
    box = (10.0, 20.0, 60.0, 90.0)
    assert face_crop_window(200, 100, box, (0.3, 0.6), torch.Generator().manual_seed(3)) == \
        face_crop_window(200, 100, box, (0.3, 0.6), torch.Generator().manual_seed(3))
    assert face_crop_window(200, 100, (0.0, 0.0, 200.0, 100.0), (0.3, 0.6), generator) is None
