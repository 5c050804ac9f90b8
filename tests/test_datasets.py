"""train/downstream/datasets: tiny fixtures written in each dataset's official on-disk format, read back."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from train.downstream.datasets import (DATASETS, AFLW19, CelebAMaskHQ, DatasetError, LaPa, MissingFileError, W300,
                            WFLW, open_dataset)
from train.downstream.datasets.celebamask_hq import PART_FILES

RNG = np.random.default_rng(0)


def write_image(path: Path, size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 40, 90)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_mask(path: Path, rows: slice, cols: slice, size: int = 32, mode: str = "L") -> None:
    array = np.zeros((size, size), np.uint8)
    array[rows, cols] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert("RGB") if mode == "RGB" else image).save(path)


def test_registry() -> None:
    assert set(DATASETS) == {"celebamask_hq", "lapa", "300w", "wflw", "aflw19", "celeba_attr", "lfwa"}
    assert {cls.task for cls in DATASETS.values()} == {"parsing", "alignment", "attributes"}
    assert CelebAMaskHQ.labels[0] == "background" and len(CelebAMaskHQ.labels) == 19
    assert len(LaPa.labels) == 11 and (W300.num_points, WFLW.num_points, AFLW19.num_points) == (68, 98, 19)
    with pytest.raises(DatasetError, match="unknown dataset"):
        open_dataset("helen", "/nonexistent", "train")


# ---------------------------------------------------------------- CelebAMask-HQ

def make_celebamask(root: Path) -> None:
    # HQ idx -> CelebA file; CelebA split: 000006 train, 000002 val, 000003 test, 000004 train
    mapping = {0: (5, "000006.jpg"), 1: (1, "000002.jpg"), 2: (2, "000003.jpg"), 2001: (3, "000004.jpg")}
    (root / "CelebA-HQ-to-CelebA-mapping.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text(
        "idx         orig_idx    orig_file\n" + "".join(f"{i}  {o}  {f}\n" for i, (o, f) in mapping.items()))
    split = {1: 0, 2: 1, 3: 2, 4: 0, 5: 2, 6: 0}
    (root / "list_eval_partition.txt").write_text("".join(f"{k:06d}.jpg {v}\n" for k, v in split.items()))
    for idx in mapping:
        write_image(root / "CelebA-HQ-img" / f"{idx}.jpg", (64, 64))
        write_mask(root / "CelebAMask-HQ-mask-anno" / str(idx // 2000) / f"{idx:05d}_skin.png", slice(4, 28), slice(0, 32))
    anno = root / "CelebAMask-HQ-mask-anno" / "0"
    write_mask(anno / "00000_neck.png", slice(24, 32), slice(8, 24))           # under skin at rows 24..27
    write_mask(anno / "00000_hair.png", slice(0, 8), slice(0, 32), mode="RGB")  # over skin at rows 4..7
    write_mask(anno / "00000_nose.png", slice(10, 20), slice(14, 20))
    write_mask(anno / "00000_l_eye.png", slice(8, 12), slice(4, 10))
    write_mask(anno / "00000_eye_g.png", slice(9, 11), slice(2, 12))           # glasses over the eye
    (anno / "Thumbs.db").write_bytes(b"junk")


def test_celebamask_hq_merge_split_sizes(tmp_path: Path) -> None:
    make_celebamask(tmp_path)
    train = open_dataset("celebamask_hq", str(tmp_path), "train")
    assert [s[0] for s in train.samples] == [0, 2001] and train.task == "parsing"
    assert [s[0] for s in CelebAMaskHQ(str(tmp_path), "val").samples] == [1]
    assert [s[0] for s in CelebAMaskHQ(str(tmp_path), "test").samples] == [2]
    item = train[0]
    assert item["image"].shape == (64, 64, 3) and item["image"].dtype == np.uint8
    assert item["path"].endswith(os.path.join("CelebA-HQ-img", "0.jpg"))
    label = item["label"]
    assert label.shape == (32, 32) and label.dtype == np.uint8
    value = {part: PART_FILES.index(part) + 1 for part in PART_FILES}
    assert train.labels[value["skin"]] == "face" and train.labels[value["l_ear"]] == "right_ear"
    assert label[2, 5] == value["hair"] and label[6, 5] == value["hair"]      # hair over skin
    assert label[15, 16] == value["nose"] and label[15, 2] == value["skin"]
    assert label[8, 5] == value["l_eye"] and label[10, 5] == value["eye_g"]  # glasses over eye
    assert label[26, 10] == value["skin"] and label[30, 10] == value["neck"]  # skin over neck
    assert label[30, 2] == 0
    assert set(np.unique(train[1]["label"])) == {0, value["skin"]}
    assert train.subsets()["full"].tolist() == [0, 1]


def test_celebamask_hq_errors(tmp_path: Path) -> None:
    make_celebamask(tmp_path)
    root = str(tmp_path)
    with pytest.raises(DatasetError, match="unknown split"):
        CelebAMaskHQ(root, "dev")
    mapping = tmp_path / "CelebA-HQ-to-CelebA-mapping.txt"
    good = mapping.read_text()
    mapping.write_text(good + "7 xx 000009.jpg\n")
    with pytest.raises(DatasetError, match=r"mapping\.txt:6: expected 'idx orig_idx orig_file'"):
        CelebAMaskHQ(root, "train")
    mapping.write_text(good + "7 8 000009.jpg\n")
    with pytest.raises(DatasetError, match="no split for 000009.jpg"):
        CelebAMaskHQ(root, "train")
    mapping.write_text(good)
    partition = tmp_path / "list_eval_partition.txt"
    partition.write_text(partition.read_text() + "000007.jpg 3\n")
    with pytest.raises(DatasetError, match=r"list_eval_partition\.txt:7:"):
        CelebAMaskHQ(root, "train")
    (tmp_path / "Eval").mkdir()
    partition.rename(tmp_path / "Eval" / "list_eval_partition.txt")  # CelebA's own location is accepted
    with pytest.raises(DatasetError, match=r"list_eval_partition\.txt:7:"):
        CelebAMaskHQ(root, "train")
    (tmp_path / "Eval" / "list_eval_partition.txt").unlink()
    with pytest.raises(MissingFileError, match="list_eval_partition.txt"):
        CelebAMaskHQ(root, "train")


def test_celebamask_hq_missing_files(tmp_path: Path) -> None:
    make_celebamask(tmp_path)
    root = str(tmp_path)
    (tmp_path / "CelebA-HQ-img" / "2001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"CelebA-HQ image: .*2001\.jpg"):
        CelebAMaskHQ(root, "train")
    assert len(CelebAMaskHQ(root, "val")) == 1
    (tmp_path / "CelebAMask-HQ-mask-anno" / "0" / "00002_skin.png").unlink()
    with pytest.raises(MissingFileError, match="missing masks of image 2"):
        CelebAMaskHQ(root, "test")
    write_mask(tmp_path / "CelebAMask-HQ-mask-anno" / "0" / "00001_nose.png", slice(0, 4), slice(0, 4), size=16)
    with pytest.raises(DatasetError, match=r"00001_nose\.png is 16x16"):
        CelebAMaskHQ(root, "val")[0]
    (tmp_path / "CelebA-HQ-to-CelebA-mapping.txt").unlink()
    with pytest.raises(MissingFileError, match="mapping"):
        CelebAMaskHQ(root, "val")


# ---------------------------------------------------------------- LaPa

def write_lapa_sample(base: Path, name: str, label: np.ndarray, points: np.ndarray) -> None:
    h, w = label.shape
    write_image(base / "images" / f"{name}.jpg", (w, h))
    (base / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(base / "labels" / f"{name}.png")
    (base / "landmarks").mkdir(parents=True, exist_ok=True)
    (base / "landmarks" / f"{name}.txt").write_text("106\n" + "".join(f"{x:.6f} {y:.6f}\n" for x, y in points))


def test_lapa_roundtrip_and_errors(tmp_path: Path) -> None:
    labels, points = {}, {}
    for name in ("b_face", "a_face"):
        labels[name] = RNG.integers(0, 11, size=(40, 56), dtype=np.uint8)
        points[name] = RNG.uniform(0, 50, size=(106, 2)).astype(np.float32)
        write_lapa_sample(tmp_path / "train", name, labels[name], points[name])
    write_lapa_sample(tmp_path / "test", "t", labels["a_face"], points["a_face"])
    train = open_dataset("lapa", str(tmp_path), "train")
    assert len(train) == 2 and train.task == "parsing" and train.labels[10] == "hair"
    for i, name in enumerate(("a_face", "b_face")):  # sorted by name
        item = train[i]
        assert item["path"].endswith(f"{name}.jpg") and item["image"].shape == (40, 56, 3)
        np.testing.assert_array_equal(item["label"], labels[name])
        np.testing.assert_allclose(item["landmarks"], points[name], atol=1e-5)
        assert item["landmarks"].dtype == np.float32 and item["label"].dtype == np.uint8
    assert len(LaPa(str(tmp_path), "test")) == 1
    with pytest.raises(MissingFileError, match="LaPa val folder"):
        LaPa(str(tmp_path), "val")

    lm = tmp_path / "train" / "landmarks" / "a_face.txt"
    good = lm.read_text()
    lm.write_text(good.replace("106\n", "98\n", 1))
    with pytest.raises(DatasetError, match=r"a_face\.txt:1: expected the point count '106'"):
        LaPa(str(tmp_path), "train")
    lines = good.splitlines()
    lines[5] = "12.5 abc"
    lm.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"a_face\.txt:6: expected numbers"):
        LaPa(str(tmp_path), "train")
    lm.write_text("\n".join(lines[:50]) + "\n")
    with pytest.raises(DatasetError, match="expected 106 'x y' lines after the count, found 49"):
        LaPa(str(tmp_path), "train")
    lm.write_text(good)
    bad = labels["a_face"].copy()
    bad[0, 0] = 11
    Image.fromarray(bad).save(tmp_path / "train" / "labels" / "a_face.png")
    with pytest.raises(DatasetError, match="has value 11"):
        LaPa(str(tmp_path), "train")[0]
    (tmp_path / "train" / "labels" / "a_face.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels.a_face\.png"):
        LaPa(str(tmp_path), "train")


def test_lapa_palette_label(tmp_path: Path) -> None:
    label = RNG.integers(0, 11, size=(20, 30), dtype=np.uint8)
    write_lapa_sample(tmp_path / "val", "p", label, RNG.uniform(0, 20, size=(106, 2)))
    image = Image.fromarray(label, mode="L").convert("P")  # palette PNG: values are indices
    image.putpalette([c for i in range(256) for c in (255 - i, i, 7)])
    image.putdata(label.ravel().tolist())
    image.save(tmp_path / "val" / "labels" / "p.png")
    np.testing.assert_array_equal(LaPa(str(tmp_path), "val")[0]["label"], label)


# ---------------------------------------------------------------- 300W

def write_pts(path: Path, points: np.ndarray) -> None:
    body = "".join(f"{x:.3f} {y:.3f}\n" for x, y in points)
    path.write_text(f"version: 1\nn_points:  {len(points)}\n{{\n{body}}}\n")


def make_300w(root: Path) -> dict[str, np.ndarray]:
    written = {}
    layout = [("lfpw/trainset", "image_0001", ".png"), ("helen/trainset", "100032540_1", ".jpg"),
              ("afw", "134212_1", ".jpg"), ("lfpw/testset", "image_0002", ".png"),
              ("helen/testset", "296814969_3", ".jpg"), ("ibug", "image_092 _01", ".jpg")]
    for folder, stem, ext in layout:
        points = RNG.uniform(5, 60, size=(68, 2)).round(3)
        write_image(root / folder / f"{stem}{ext}")
        write_pts(root / folder / f"{stem}.pts", points)
        written[f"{folder}/{stem}"] = points
    return written


def test_300w_splits_coordinates_boxes(tmp_path: Path) -> None:
    written = make_300w(tmp_path)
    train = open_dataset("300w", str(tmp_path), "train")
    assert [Path(s[0]).name for s in train.samples] == ["image_0001.png", "100032540_1.jpg", "134212_1.jpg"]
    assert list(train.subsets()) == ["full"]
    test = W300(str(tmp_path), "test")
    subsets = test.subsets()
    assert subsets["common"].tolist() == [0, 1] and subsets["challenge"].tolist() == [2]
    assert subsets["full"].tolist() == [0, 1, 2]
    item = test[2]
    assert item["path"].endswith("image_092 _01.jpg") and item["image"].shape == (48, 64, 3)
    expected = written["ibug/image_092 _01"] - 1.0  # 1-based .pts -> 0-based pixels
    np.testing.assert_allclose(item["landmarks"], expected, atol=1e-4)
    low, high = expected.min(0), expected.max(0)
    center, side = (low + high) / 2, (high - low).max()
    np.testing.assert_allclose(item["center"], center, atol=1e-4)
    assert item["scale"] == pytest.approx(side / 200, abs=1e-6)
    np.testing.assert_allclose(item["box"], [*(center - side / 2), *(center + side / 2)], atol=1e-4)
    assert item["box"].dtype == np.float32 and item["landmarks"].shape == (68, 2)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("n_points:  68", "n_points:  67"), "n_points says 67 but 68"),
    (lambda t: t.replace("{\n", "{\n1.0 2.0 3.0\n", 1), r"\.pts:4: expected 'x y'"),
    (lambda t: t.rsplit("}", 1)[0], r"missing \}"),
    (lambda t: t.replace("version: 1", "garbage"), r"\.pts:1: expected 'key: value'"),
    (lambda t: "\n".join(line for line in t.splitlines() if line != "{"), r"\.pts:3: expected 'key: value'"),
])
def test_300w_malformed_pts(tmp_path: Path, edit, message) -> None:
    make_300w(tmp_path)
    pts = tmp_path / "afw" / "134212_1.pts"
    pts.write_text(edit(pts.read_text()))
    with pytest.raises(DatasetError, match=message):
        W300(str(tmp_path), "train")
    assert len(W300(str(tmp_path), "test")) == 3  # other split unaffected


def test_300w_missing(tmp_path: Path) -> None:
    make_300w(tmp_path)
    (tmp_path / "helen" / "testset" / "296814969_3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing image for .*296814969_3\.pts"):
        W300(str(tmp_path), "test")
    write_image(tmp_path / "helen" / "testset" / "296814969_3.jpg")
    (tmp_path / "ibug" / "image_092 _01.pts").unlink()
    (tmp_path / "ibug" / "image_092 _01.jpg").unlink()
    with pytest.raises(DatasetError, match=r"no \.pts files in .*ibug"):
        W300(str(tmp_path), "test")
    os.rmdir(tmp_path / "ibug")
    with pytest.raises(MissingFileError, match="300W folder: .*ibug"):
        W300(str(tmp_path), "test")


# ---------------------------------------------------------------- WFLW

def wflw_line(points: np.ndarray, rect: list[int], attrs: list[int], image: str) -> str:
    return " ".join([*(f"{v:.6f}" for v in points.ravel()), *map(str, rect), *map(str, attrs), image])


def make_wflw(root: Path) -> list[tuple[np.ndarray, list[int], list[int], str]]:
    records = [
        (RNG.uniform(0, 60, size=(98, 2)), [3, 4, 50, 60], [1, 0, 0, 0, 1, 0], "0--Parade/0_Parade_marchingband_1_116.jpg"),
        (RNG.uniform(0, 60, size=(98, 2)), [1, 2, 30, 40], [0, 0, 0, 0, 0, 0], "0--Parade/0_Parade_marchingband_1_116.jpg"),
        (RNG.uniform(0, 60, size=(98, 2)), [0, 0, 10, 10], [0, 1, 1, 1, 1, 1], "51--Dresses/51_Dresses_wearingdress_51_377.jpg"),
    ]
    ann = root / "WFLW_annotations" / "list_98pt_rect_attr_train_test"
    ann.mkdir(parents=True)
    ann.joinpath("list_98pt_rect_attr_test.txt").write_text("".join(wflw_line(*r) + "\n" for r in records))
    ann.joinpath("list_98pt_rect_attr_train.txt").write_text(wflw_line(*records[2]) + "\n")
    for r in records:
        write_image(root / "WFLW_images" / r[3])
    return records


def test_wflw_roundtrip_subsets(tmp_path: Path) -> None:
    records = make_wflw(tmp_path)
    test = open_dataset("wflw", str(tmp_path), "test")
    assert len(test) == 3 and len(WFLW(str(tmp_path), "train")) == 1
    subsets = test.subsets()
    assert set(subsets) == {"full", "pose", "expression", "illumination", "makeup", "occlusion", "blur"}
    assert subsets["full"].tolist() == [0, 1, 2] and subsets["pose"].tolist() == [0]
    assert subsets["occlusion"].tolist() == [0, 2] and subsets["blur"].tolist() == [2]
    assert list(WFLW(str(tmp_path), "train").subsets()) == ["full"]
    for i, (points, rect, attrs, image) in enumerate(records):
        item = test[i]
        assert item["path"].endswith(image)
        np.testing.assert_allclose(item["landmarks"], points, atol=1e-5)
        np.testing.assert_array_equal(item["rect"], rect)
        np.testing.assert_array_equal(item["attributes"], attrs)
        low, high = points.min(0), points.max(0)
        center, half = (low + high) / 2, (high - low).max() / 2
        np.testing.assert_allclose(item["box"], [*(center - half), *(center + half)], atol=1e-4)


def test_wflw_errors(tmp_path: Path) -> None:
    records = make_wflw(tmp_path)
    path = tmp_path / "WFLW_annotations" / "list_98pt_rect_attr_train_test" / "list_98pt_rect_attr_test.txt"
    good = path.read_text().splitlines()
    cases = [(wflw_line(records[0][0], records[0][1], records[0][2], "").strip(), "expected 207 fields.*got 206"),
             (wflw_line(records[0][0], records[0][1], [1, 0, 2, 0, 0, 0], "x.jpg"), "attribute flags must be 0 or 1"),
             (good[1].replace(good[1].split()[7], "nan?", 1), "expected numbers"),
             (good[1].replace(good[1].split()[7], "inf", 1), "non-finite")]
    for line, message in cases:
        path.write_text("\n".join([good[0], "", line, good[2]]) + "\n")
        with pytest.raises(DatasetError, match=rf"list_98pt_rect_attr_test\.txt:3: {message}"):
            WFLW(str(tmp_path), "test")
    path.write_text("\n".join(good) + "\n")
    (tmp_path / "WFLW_images" / records[2][3]).unlink()
    with pytest.raises(FileNotFoundError, match="51_Dresses_wearingdress_51_377.jpg"):
        WFLW(str(tmp_path), "test")
    path.unlink()
    with pytest.raises(MissingFileError, match="list_98pt_rect_attr_test.txt"):
        WFLW(str(tmp_path), "test")


# ---------------------------------------------------------------- AFLW-19

def make_aflw(root: Path, n: int) -> dict[str, np.ndarray]:
    data = RNG.uniform(1, 60, size=(n, 38)).round(2)
    mask = np.ones((n, 19))
    mask[1::2, 3] = 0  # odd rows: one occluded point
    bbox = np.tile([2.0, 58.0, 3.0, 61.0], (n, 1)) + np.arange(n)[:, None]
    ra = RNG.permutation(n) + 1.0
    names = np.empty((n, 1), dtype=object)
    for i in range(n):
        names[i, 0] = f"{(0, 2, 3)[i % 3]}/image{i:05d}.jpg"
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "AFLWinfo_release.mat",
                     {"data": data, "mask_new": mask, "bbox": bbox, "ra": ra[None, :], "nameList": names})
    return {"data": data, "mask": mask, "bbox": bbox, "ra": ra, "names": names}


def test_aflw19_protocol_split(tmp_path: Path) -> None:
    n = 20004  # the protocol's first 20000 of ra train, 4 test
    info = make_aflw(tmp_path, n)
    test_rows = (info["ra"][20000:] - 1).astype(int)
    for r in test_rows:
        write_image(tmp_path / "data" / "flickr" / info["names"][r, 0])
    test = open_dataset("aflw19", str(tmp_path), "test")
    assert [s[0] for s in test.samples] == test_rows.tolist()
    assert test.subsets()["frontal"].tolist() == [i for i, r in enumerate(test_rows) if r % 2 == 0]
    item = test[1]
    r = int(test_rows[1])
    assert item["mat_row"] == r and item["path"].endswith(info["names"][r, 0])
    np.testing.assert_allclose(item["landmarks"][:, 0], info["data"][r, :19], atol=1e-4)
    np.testing.assert_allclose(item["landmarks"][:, 1], info["data"][r, 19:], atol=1e-4)
    x1, x2, y1, y2 = info["bbox"][r]
    np.testing.assert_allclose(item["box"], [x1, y1, x2, y2])
    assert item["visible"].dtype == bool and item["visible"].sum() == (18 if r % 2 else 19)
    with pytest.raises(FileNotFoundError, match="AFLW image"):
        AFLW19(str(tmp_path), "train")  # train images were not written


def test_aflw19_small_and_errors(tmp_path: Path) -> None:
    info = make_aflw(tmp_path, 6)
    for i in range(6):
        write_image(tmp_path / "data" / "flickr" / info["names"][i, 0])
    train = AFLW19(str(tmp_path), "train", num_train=4)
    assert len(train) == 4 and list(train.subsets()) == ["full"]
    with pytest.raises(DatasetError, match="first 20000 of ra"):
        AFLW19(str(tmp_path), "test")
    mat = tmp_path / "AFLWinfo_release.mat"
    base = {k: v for k, v in scipy.io.loadmat(mat).items() if not k.startswith("__")}
    broken = [({"ra": base["ra"] * 0 + 1}, "ra must be a permutation"),
              ({"data": base["data"][:, :37]}, "data has shape"),
              ({"mask_new": base["mask_new"] * 2}, "only 0 and 1"),
              ({"nameList": base["nameList"][:5]}, "nameList has 5 entries")]
    for change, message in broken:
        scipy.io.savemat(mat, {**base, **change})
        with pytest.raises(DatasetError, match=message):
            AFLW19(str(tmp_path), "train", num_train=4)
    scipy.io.savemat(mat, {k: v for k, v in base.items() if k != "bbox"})
    with pytest.raises(DatasetError, match="missing variable.*bbox"):
        AFLW19(str(tmp_path), "train", num_train=4)
    mat.write_bytes(b"not a mat file at all")
    with pytest.raises(DatasetError, match="cannot read .*AFLWinfo_release.mat"):
        AFLW19(str(tmp_path), "train", num_train=4)
    mat.unlink()
    with pytest.raises(FileNotFoundError, match="AFLWinfo_release.mat"):
        AFLW19(str(tmp_path), "train", num_train=4)


def test_common_image_errors(tmp_path: Path) -> None:
    make_300w(tmp_path)
    (tmp_path / "ibug" / "image_092 _01.jpg").write_bytes(b"not a jpeg")
    test = W300(str(tmp_path), "test")
    with pytest.raises(DatasetError, match="cannot decode image file .*image_092 _01.jpg"):
        test[2]
    with pytest.raises(IndexError):
        test[3]
    with pytest.raises(MissingFileError, match="root folder"):
        WFLW(str(tmp_path / "nope"), "test")
    (tmp_path / "afw" / "134212_1.pts").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DatasetError, match=r"134212_1\.pts: not a text file"):
        W300(str(tmp_path), "train")


def lfwa_release(path: Path) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """lfw_att_40.mat's names and labels and the split's 1-based rows, read with h5py alone (not the reader)."""
    with h5py.File(path / "lfw_att_40.mat") as f:
        names = ["".join(map(chr, f[ref][()].ravel())) for ref in f["name"][()].ravel()]
        labels = f["label"][()].T
    with h5py.File(path / "indices_train_test.mat") as f:
        rows = {split: f[f"indices_img_{split}"][()].ravel().astype(int) for split in ("train", "test")}
    return names, labels, rows


def test_lfwa_reads_the_release_files(tmp_path: Path) -> None:
    from train.downstream.datasets.synthetic import make_lfwa

    make_lfwa(tmp_path, {"train": 7, "test": 5})
    assert (tmp_path / "lfw_att_40.mat").read_bytes().startswith(b"MATLAB 7.3 MAT-file")
    names, labels, rows = lfwa_release(tmp_path)
    assert sorted([*rows["train"], *rows["test"]]) == list(range(1, 13)) and rows["train"].tolist() != list(range(1, 8))
    for split in ("train", "test"):
        dataset = open_dataset("lfwa", str(tmp_path), split)
        assert dataset.task == "attributes" and len(dataset) == len(rows[split])
        assert dataset.attribute_names[15] == "Eyeglasses" and len(dataset.attribute_names) == 40
        for item, row in zip(dataset, rows[split]):  # 1-based rows: row r is names[r - 1]
            assert item["path"] == str(tmp_path / "lfw" / names[row - 1].replace("\\", "/"))
            assert np.array_equal(item["attributes"], labels[row - 1]) and item["attributes"].dtype == np.float32
            assert item["image"].shape == (64, 64, 3)
    # a copy saved as an older MAT version (as scipy and MATLAB's -v7 write it) reads the same
    copy = tmp_path / "v5"
    copy.mkdir()
    (copy / "lfw").symlink_to(tmp_path / "lfw")
    cells = np.empty((len(names), 1), dtype=object)
    cells[:, 0] = names
    scipy.io.savemat(copy / "lfw_att_40.mat", {"name": cells, "label": labels})
    scipy.io.savemat(copy / "indices_train_test.mat", {f"indices_img_{s}": r[:, None].astype(float) for s, r in rows.items()})
    old, new = open_dataset("lfwa", str(copy), "test"), open_dataset("lfwa", str(tmp_path), "test")
    assert [os.path.relpath(p, copy) for p, _ in old.samples] == [os.path.relpath(p, tmp_path) for p, _ in new.samples]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(old.samples, new.samples))


@pytest.mark.parametrize("damage, message", [
    ("no_label", r"lfw_att_40.mat: no 'label' variable"),
    ("label_of_2", r"lfw_att_40.mat: 'label' should hold 0 and 1 only, found \[2.0\]"),
    ("short_label", r"lfw_att_40.mat: 'label' has 5 rows for 6 image names"),
    ("zero_index", r"indices_train_test.mat: 'indices_img_train' should be 1-based rows of the 6 annotated images"),
    ("not_a_mat", r"indices_train_test.mat: cannot be read as a MAT file"),
    ("missing_mat", r"missing LFWA annotation file: .*lfw_att_40.mat"),
    ("missing_image", r"missing LFWA image: .*Person_0000_0001.jpg"),
])
def test_lfwa_errors_name_the_file(tmp_path: Path, damage: str, message: str) -> None:
    from train.downstream.datasets.synthetic import make_lfwa, write_mat73

    make_lfwa(tmp_path, {"train": 3, "test": 3})
    names, labels, rows = lfwa_release(tmp_path)
    if damage == "no_label":
        write_mat73(tmp_path / "lfw_att_40.mat", {"name": names})
    elif damage in ("label_of_2", "short_label"):
        labels[0, 3] = 2 if damage == "label_of_2" else labels[0, 3]
        write_mat73(tmp_path / "lfw_att_40.mat", {"name": names, "label": labels[1:] if damage == "short_label" else labels})
    elif damage == "zero_index":
        write_mat73(tmp_path / "indices_train_test.mat", {"indices_img_train": rows["train"][:, None] - 1.0})
    elif damage == "not_a_mat":
        (tmp_path / "indices_train_test.mat").write_text("indices_img_train 1 2 3\n")
    elif damage == "missing_mat":
        (tmp_path / "lfw_att_40.mat").unlink()
    else:
        (tmp_path / "lfw" / "Person_0000" / "Person_0000_0001.jpg").unlink()
    with pytest.raises(DatasetError, match=message):
        DATASETS["lfwa"](str(tmp_path), "train" if damage != "missing_image" or 1 in rows["train"] else "test")
