"""Synthetic benchmark folders in the official on-disk layouts, for tests and speed runs without the data.

Each builder writes what its reader in this package expects (same folders, file names, formats):
"faces" drawn as coloured parts whose label maps and landmarks match the pixels, so a model can
learn them and every metric has something to measure. `noise` (the standard deviation of a grey
texture added to the pixels) makes the JPEGs cost about what photographs cost to decode; 0 keeps
flat colours (tiny files, as the tests use).

    make_lapa(root)                                   # 3 x 96 px faces per split (the tests')
    make_lapa(root, size=640, counts={"train": 256, "val": 16, "test": 16}, noise=8)
    make_celebamask_hq(root, {"train": 256, "val": 16, "test": 16})   # 1024 px images, 512 px masks
    make_wflw(root, {"train": 256, "test": 32})                       # 1024 x 768 photos, one face each
    make_celeba_attr(root, {"train": 96, "val": 32, "test": 64})      # Eyeglasses drawn, the rest coin flips
    make_lfwa(root, {"train": 96, "test": 64})                          # the same faces, LFWA's .mat files

Builders write samples on a thread pool (`threads`; PIL and numpy release the GIL while encoding).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageDraw

from .celeba_attr import ATTRIBUTES as CELEBA_ATTRIBUTES
from .celebamask_hq import PART_FILES
from .wflw import ANNOTATION_DIR, ATTRIBUTES

# the tests' three faces (cx, cy, r) in 96 px images; larger images scale them and add random ones
FIXED_FACES = ((48, 48, 28), (40, 52, 24), (56, 44, 30))
LAPA_COLORS = np.array([[30, 30, 30], [220, 60, 60], [40, 40, 220]], np.uint8)  # background, skin, hair


def _run(jobs: Iterable[Callable[[], None]], threads: int) -> None:
    jobs = list(jobs)
    if threads <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()  # raise the first failure


def _threads(threads: int) -> int:
    return threads or min(16, os.cpu_count() or 1)


def _texture(shape: tuple[int, int], noise: float, seed: int) -> np.ndarray | None:
    """One grey noise field a builder adds to all its images (drawing it per image costs more than the JPEG)."""
    if noise <= 0:
        return None
    return np.random.default_rng(seed).normal(0, noise, shape).astype(np.float32)[..., None]


def _photo(pixels: np.ndarray, texture: np.ndarray | None, shift: int = 0) -> Image.Image:
    if texture is None:
        return Image.fromarray(pixels)
    grain = np.roll(texture[: pixels.shape[0], : pixels.shape[1]], shift, axis=(0, 1))
    return Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))


def _faces(count: int, size: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """`count` (cx, cy, r): the tests' three (scaled to `size`), then random ones well inside the image."""
    scale = size / 96
    faces = [(cx * scale, cy * scale, r * scale) for cx, cy, r in FIXED_FACES[:count]]
    while len(faces) < count:
        r = rng.uniform(0.2, 0.3) * size
        faces.append((rng.uniform(0.4, 0.6) * size, rng.uniform(0.4, 0.6) * size, r))
    return faces


def face_points(cx: float, cy: float, r: float) -> np.ndarray:
    """106 LaPa-style points on a circle, with the five the alignment uses where a face has them."""
    angles = np.linspace(0, 2 * np.pi, 106, endpoint=False)
    points = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)
    points[104], points[105] = (cx - 0.35 * r, cy - 0.25 * r), (cx + 0.35 * r, cy - 0.25 * r)  # pupils
    points[54] = (cx, cy + 0.1 * r)  # nose tip
    points[84], points[90] = (cx - 0.3 * r, cy + 0.5 * r), (cx + 0.3 * r, cy + 0.5 * r)  # mouth corners
    return points


def make_lapa(root: Path, size: int = 96, counts: dict[str, int] | None = None, noise: float = 0.0,
              seed: int = 0, threads: int = 0) -> None:
    """LaPa's train/val/test folders (default: three `size` px faces each): a disk, red below (label 1,
    skin) and blue above (label 2); the image shows its labels, so a model can learn them."""
    counts = counts or {"train": 3, "val": 3, "test": 3}
    texture = _texture((size, size), noise, seed)
    rng = np.random.default_rng(seed)
    jobs = []
    for split, count in counts.items():
        for folder in ("images", "labels", "landmarks"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for n, face in enumerate(_faces(count, size, rng)):
            jobs.append(lambda split=split, n=n, face=face: _lapa_sample(root / split, f"face_{n}", face, size, texture))
    _run(jobs, _threads(threads))


def _lapa_sample(base: Path, name: str, face: tuple[float, float, float], size: int, texture: np.ndarray | None) -> None:
    cx, cy, r = face
    label = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(label)
    pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    pen.pieslice([cx - r, cy - r, cx + r, cy + r], 180, 360, fill=2)  # the top half: "hair"
    label_array = np.asarray(label)
    _photo(LAPA_COLORS[label_array], texture, int(cx)).save(base / "images" / f"{name}.jpg", quality=95)
    Image.fromarray(label_array).save(base / "labels" / f"{name}.png")
    (base / "landmarks" / f"{name}.txt").write_text(
        "106\n" + "".join(f"{x:.3f} {y:.3f}\n" for x, y in face_points(cx, cy, r)))


# CelebAMask-HQ parts drawn per face, as (part, shape, box relative to the face centre in radii);
# painted in PART_FILES order by the reader, so later parts (eyes, nose, lips, hair) win over skin
CELEBA_PARTS = (("neck", "rect", (-0.45, 0.7, 0.45, 1.6)), ("skin", "ellipse", (-1.0, -1.0, 1.0, 1.0)),
                ("cloth", "rect", (-1.6, 1.3, 1.6, 2.2)), ("l_brow", "rect", (-0.6, -0.5, -0.15, -0.4)),
                ("r_brow", "rect", (0.15, -0.5, 0.6, -0.4)), ("l_eye", "ellipse", (-0.55, -0.3, -0.2, -0.15)),
                ("r_eye", "ellipse", (0.2, -0.3, 0.55, -0.15)), ("nose", "ellipse", (-0.12, -0.15, 0.12, 0.25)),
                ("l_lip", "ellipse", (-0.35, 0.5, 0.35, 0.65)), ("u_lip", "ellipse", (-0.35, 0.38, 0.35, 0.5)),
                ("hair", "pieslice", (-1.05, -1.15, 1.05, -0.25)))


def make_celebamask_hq(root: Path, counts: dict[str, int], size: int = 1024, mask_size: int = 512,
                       noise: float = 8.0, seed: int = 0, threads: int = 0) -> None:
    """CelebAMask-HQ's layout: `size` px CelebA-HQ-img/{idx}.jpg, one `mask_size` px binary mask per part
    in CelebAMask-HQ-mask-anno/{idx // 2000}/, the HQ-to-CelebA mapping and CelebA's partition file
    putting counts["train"], ["val"], ["test"] images in each split."""
    codes = {"train": 0, "val": 1, "test": 2}
    splits = [codes[split] for split, count in counts.items() for _ in range(count)]
    (root / "CelebA-HQ-img").mkdir(parents=True, exist_ok=True)
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text(
        "idx         orig_idx    orig_file\n" + "".join(f"{i}  {i}  {i + 1:06d}.jpg\n" for i in range(len(splits))))
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {c}\n" for i, c in enumerate(splits)))
    for folder in {i // 2000 for i in range(len(splits))}:
        (root / "CelebAMask-HQ-mask-anno" / str(folder)).mkdir(parents=True, exist_ok=True)
    texture = _texture((size, size), noise, seed)
    faces = _faces(len(splits), mask_size, np.random.default_rng(seed))
    palette = np.random.default_rng(seed + 1).integers(30, 226, (len(PART_FILES) + 1, 3)).astype(np.uint8)
    _run([lambda i=i, face=face: _celeba_sample(root, i, face, size, mask_size, palette, texture)
          for i, face in enumerate(faces)], _threads(threads))


def _celeba_sample(root: Path, idx: int, face: tuple[float, float, float], size: int, mask_size: int,
                   palette: np.ndarray, texture: np.ndarray | None) -> None:
    cx, cy, r = face
    label = np.zeros((mask_size, mask_size), np.uint8)
    folder = root / "CelebAMask-HQ-mask-anno" / str(idx // 2000)
    for part, shape, (x0, y0, x1, y1) in CELEBA_PARTS:
        mask = Image.new("L", (mask_size, mask_size), 0)
        box = [cx + x0 * r, cy + y0 * r, cx + x1 * r, cy + y1 * r]
        pen = ImageDraw.Draw(mask)
        if shape == "ellipse":
            pen.ellipse(box, fill=255)
        elif shape == "pieslice":
            pen.pieslice(box, 180, 360, fill=255)
        else:
            pen.rectangle(box, fill=255)
        mask.save(folder / f"{idx:05d}_{part}.png")
        label[np.asarray(mask) > 0] = PART_FILES.index(part) + 1
    pixels = np.asarray(Image.fromarray(palette[label]).resize((size, size), Image.NEAREST))
    _photo(pixels, texture, idx).save(root / "CelebA-HQ-img" / f"{idx}.jpg", quality=90)


def wflw_template() -> np.ndarray:
    """WFLW's 98 points laid out as a face in a unit box centred on 0 (jaw 0-32, brows 33-50, nose
    51-59, eyes 60-75 with corners 60/64 and 68/72, mouth 76-95, pupils 96-97)."""
    jaw = np.linspace(np.pi * 0.95, np.pi * 0.05, 33)
    points = [np.stack([0.5 * np.cos(jaw), 0.1 + 0.55 * np.sin(jaw)], 1)]
    for xs in (np.linspace(-0.4, -0.1, 9), np.linspace(0.1, 0.4, 9)):  # brows: 9 points each
        points.append(np.stack([xs, np.full(9, -0.25)], 1))
    points.append(np.stack([np.zeros(4), np.linspace(-0.15, 0.1, 4)], 1))  # nose bridge
    points.append(np.stack([np.linspace(-0.1, 0.1, 5), np.full(5, 0.15)], 1))  # nostrils
    ring = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    for centre in (-0.2, 0.2):  # eyes: 8 points each from the corner on the image's left (60, 68), 64 and 72 opposite
        points.append(np.stack([centre - 0.1 * np.cos(ring), -0.12 + 0.04 * np.sin(ring)], 1))
    ring12, ring8 = np.linspace(0, 2 * np.pi, 12, endpoint=False), np.linspace(0, 2 * np.pi, 8, endpoint=False)
    points.append(np.stack([0.22 * np.cos(ring12 + np.pi), 0.32 + 0.08 * np.sin(ring12 + np.pi)], 1))  # outer lip
    points.append(np.stack([0.14 * np.cos(ring8 + np.pi), 0.32 + 0.03 * np.sin(ring8 + np.pi)], 1))  # inner lip
    points.append(np.array([[-0.2, -0.12], [0.2, -0.12]]))  # pupils
    template = np.concatenate(points)
    assert template.shape == (98, 2)
    return template


def make_wflw(root: Path, counts: dict[str, int], size: tuple[int, int] = (1024, 768), noise: float = 8.0,
              seed: int = 0, threads: int = 0) -> None:
    """WFLW's layout: WFLW_images/{event}/{name}.jpg (`size` = width, height; one face each, drawn as
    white dots on its 98 points) and list_98pt_rect_attr_{train,test}.txt with points, rectangle,
    six attribute flags (drawn at random, so every test subset has faces) and the image path."""
    width, height = size
    texture = _texture((height, width), noise, seed)
    rng = np.random.default_rng(seed)
    template = wflw_template()
    annotations = root / ANNOTATION_DIR
    annotations.mkdir(parents=True, exist_ok=True)
    jobs = []
    for folder in range(4):
        (root / "WFLW_images" / f"{folder}--Event").mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        lines = []
        for n in range(count):
            face = rng.uniform(0.25, 0.45) * min(width, height)
            centre = rng.uniform([face, face], [width - face, height - face])
            points = centre + face * (template + rng.normal(0, 0.01, template.shape))
            rect = np.concatenate([points.min(0), points.max(0)])
            flags = rng.integers(0, 2, len(ATTRIBUTES))
            rel = f"{n % 4}--Event/{split}_{n}.jpg"
            lines.append(" ".join([*(f"{v:.3f}" for v in points.ravel()), *(f"{v:.0f}" for v in rect),
                                   *(str(f) for f in flags), rel]))
            jobs.append(lambda rel=rel, points=points, n=n: _wflw_image(root / "WFLW_images" / rel, points, size,
                                                                       texture, n))
        (annotations / f"list_98pt_rect_attr_{split}.txt").write_text("\n".join(lines) + "\n")
    _run(jobs, _threads(threads))


def _wflw_image(path: Path, points: np.ndarray, size: tuple[int, int], texture: np.ndarray | None, shift: int) -> None:
    image = Image.new("RGB", size, (60, 50, 45))
    pen = ImageDraw.Draw(image)
    cx, cy = points.mean(0)
    half = (points.max(0) - points.min(0)).max() * 0.6
    pen.ellipse([cx - half, cy - half, cx + half, cy + half], fill=(190, 150, 130))
    dot = max(1.0, half / 60)
    for x, y in points:
        pen.ellipse([x - dot, y - dot, x + dot, y + dot], fill=(255, 255, 255))
    _photo(np.asarray(image), texture, shift).save(path, quality=90)


def make_celeba_attr(root: Path, counts: dict[str, int], size: tuple[int, int] = (64, 64), marked: str = "Eyeglasses",
                     seed: int = 0) -> None:
    """CelebA's img_align_celeba/, list_attr_celeba.txt and list_eval_partition.txt: a face disk, with a
    dark bar across the eyes exactly when `marked` is 1, so a model can learn that attribute; every
    attribute (that one too) is a fair coin flip, so the others cannot be learned from the pixels."""
    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rows, partition, number = [], [], 0
    for code, split in enumerate(("train", "val", "test")):
        for _ in range(counts.get(split, 0)):
            number += 1
            name = f"{number:06d}.jpg"
            values = rng.integers(0, 2, len(CELEBA_ATTRIBUTES))
            _attribute_face(size, values[CELEBA_ATTRIBUTES.index(marked)]).save(root / "img_align_celeba" / name,
                                                                               quality=95)
            rows.append(f"{name} " + " ".join(" 1" if v else "-1" for v in values))
            partition.append(f"{name} {code}")
    header = f"{len(rows)}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n"
    (root / "list_attr_celeba.txt").write_text(header + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")


def make_lfwa(root: Path, counts: dict[str, int], size: tuple[int, int] = (64, 64), marked: str = "Eyeglasses",
              seed: int = 0) -> None:
    """LFWA's lfw/NAME/NAME_000K.jpg, lfw_att_40.mat and indices_train_test.mat (MATLAB v7.3 layout), the
    images drawn as make_celeba_attr's. The split indices interleave, as the release's do not follow
    the file order either."""
    rng = np.random.default_rng(seed)
    total = sum(counts.get(split, 0) for split in ("train", "test"))
    files, labels = [], rng.integers(0, 2, (total, len(CELEBA_ATTRIBUTES)))
    for row in range(total):
        person = f"Person_{row // 3:04d}"
        (root / "lfw" / person).mkdir(parents=True, exist_ok=True)
        files.append(f"{person}\\{person}_{row % 3 + 1:04d}.jpg")
        _attribute_face(size, labels[row, CELEBA_ATTRIBUTES.index(marked)]).save(
            root / "lfw" / person / f"{person}_{row % 3 + 1:04d}.jpg", quality=95)
    order = rng.permutation(total) + 1  # 1-based, as MATLAB's
    train = np.sort(order[:counts.get("train", 0)])
    write_mat73(root / "lfw_att_40.mat", {"name": files, "label": labels.astype(np.float64),
                                          "AttrName": list(CELEBA_ATTRIBUTES)})
    write_mat73(root / "indices_train_test.mat", {"indices_img_train": train[:, None].astype(np.float64),
                                                  "indices_img_test": np.sort(order[len(train):])[:, None].astype(np.float64)})


def write_mat73(path: Path, variables: dict[str, np.ndarray | list[str]]) -> None:
    """A MATLAB v7.3 MAT file as MATLAB writes one: HDF5 behind a 512-byte text header, matrices stored
    transposed (column-major), a list of str as an n x 1 cell array of char arrays (uint16 codes in
    #refs#, referenced from the variable)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        for name, value in variables.items():
            if isinstance(value, list):
                cells = [refs.create_dataset(f"{name}_{i}", data=np.array([[ord(c) for c in text]], np.uint16).T)
                         for i, text in enumerate(value)]
                for cell in cells:
                    cell.attrs["MATLAB_class"] = np.bytes_("char")
                data = f.create_dataset(name, data=np.array([[cell.ref for cell in cells]], dtype=h5py.ref_dtype))
                data.attrs["MATLAB_class"] = np.bytes_("cell")
            else:
                data = f.create_dataset(name, data=np.asarray(value).T)
                data.attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")


def _attribute_face(size: tuple[int, int], marked: int) -> Image.Image:
    """A face disk, with a dark bar across the eyes when `marked`."""
    width, height = size
    image = Image.new("RGB", size, (40, 40, 40))
    pen = ImageDraw.Draw(image)
    pen.ellipse([width * 0.2, height * 0.15, width * 0.8, height * 0.9], fill=(200, 150, 120))
    if marked:
        pen.rectangle([width * 0.22, height * 0.38, width * 0.78, height * 0.48], fill=(10, 10, 10))
    return image
