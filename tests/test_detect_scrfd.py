"""The torch backend of insightface's SCRFD (pipeline.detect_scrfd) against insightface's own SCRFD
code, run by the onnxruntime backend (pipeline.detect.InsightFaceDetector), on real photos (the
demo's ~50, as stored and as downloaded).

No real SCRFD file exists offline (insightface downloads its model packs), so the network is a
STAND-IN: a tiny random conv net, built here as ONNX, in SCRFD's output layout (9 outputs: scores,
box distances and landmarks for strides 8, 16 and 32, two anchors per cell), with dynamic batch
and spatial axes, as insightface's exports have. Its weights are random, so its "faces" are not
faces; what it tests is everything around the network: letterbox, normalisation, output layouts,
anchor centres, distance decoding, score floor, NMS and the scale back, against insightface's.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from bench.detect_speed import equality
from demo.data import make_demo_images
from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError
from pipeline.decode import decode_image
from pipeline.detect import (DETECTION_FLOOR, InsightFaceDetector, detect_backend, detect_samples,
                             make_detector)
from pipeline.detect_scrfd import TorchSCRFD
from pipeline.schema import Sample

MIN_FACE_SCORE = BuildConfig().min_face_score
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# How a stand-in flattens each head's (N, anchors x width, H, W) map, as the SCRFD exports do:
LAYOUTS = {
    "rank2": ([2, 3, 0, 1], [-1]),  # insightface's original scrfd2onnx (the model packs'): rows (y, x, image, anchor)
    "rank3": ([0, 2, 3, 1], [0, -1]),  # after its PR #1781: a batch axis, (image, y * x * anchor)
    "unbatchable": ([1, 2, 3, 0], [-1]),  # rows (anchor, y, x, image): images interleave, one at a time only
}


def standin_scrfd(layout: str, seed: int = 0) -> bytes:
    """STAND-IN for an SCRFD file such as buffalo_l's det_10g.onnx (~15 KB, not 17 MB): a stride-2
    conv stem, features at strides 8, 16 and 32 joined top-down as an FPN (nearest Resize, Add),
    and heads shared by the strides. Scores are a sigmoid of each anchor's feature against its 5 x 5
    neighbourhood, so they peak where the photo does and differ from photo to photo; box distances
    are 0.8 to 1 stride (boxes of neighbouring cells overlap too little for NMS, so a face is one
    anchor); landmarks are free. The second anchor of a cell scores lower than the first."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []

    def const(value, dtype=np.float32) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"c{len(initializers)}"))
        return initializers[-1].name

    def op(kind: str, inputs: list[str], **attributes) -> str:
        nodes.append(helper.make_node(kind, inputs, [f"t{len(nodes)}"], **attributes))
        return nodes[-1].output[0]

    def weights(channels_in: int, channels_out: int, kernel: int, scale: float = 1.0) -> tuple[list[str], int]:
        std = scale * (2 / (channels_in * kernel * kernel)) ** 0.5  # He's, times scale
        return [const(rng.normal(0, std, (channels_out, channels_in, kernel, kernel))),
                const(rng.normal(0, 0.1, channels_out))], kernel

    def conv(x: str, parameters: tuple[list[str], int], stride: int = 1) -> str:
        names, kernel = parameters
        return op("Conv", [x, *names], kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[kernel // 2] * 4)

    def flat(x: str, width: int) -> str:
        perm, shape = LAYOUTS[layout]
        return op("Reshape", [op("Transpose", [x], perm=perm), const(shape + [width], np.int64)])

    width, anchors = 8, 2
    x = op("Relu", [conv("input.1", weights(3, width, 3), stride=2)])
    levels = [op("Relu", [conv(x, weights(width, width, 3), stride=2)])]  # stride 4
    for _ in range(3):  # strides 8, 16, 32
        levels.append(op("Relu", [conv(levels[-1], weights(width, width, 3), stride=2)]))
    pyramid = [levels[3]]
    for level in (levels[2], levels[1]):  # top-down, as an FPN: nearest upsampling (Resize), then Add
        up = op("Resize", [pyramid[0], const([]), const([1, 1, 2, 2])], mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        pyramid.insert(0, op("Add", [level, up]))
    cls, box, kps = (weights(width, anchors * n, 1, scale) for n, scale in ((1, 2.0), (4, 0.5), (10, 0.5)))
    anchor_bias = const(np.array([-4.5, -7.5]).reshape(1, anchors, 1, 1))
    scores, boxes, points = [], [], []
    for level in pyramid:
        peak = conv(level, cls)
        around = op("AveragePool", [peak], kernel_shape=[5, 5], strides=[1, 1], pads=[2] * 4)
        logits = op("Add", [op("Mul", [op("Sub", [peak, around]), const(2.0)]), anchor_bias])
        scores.append(op("Sigmoid", [flat(logits, 1)]))
        distances = op("Add", [op("Mul", [op("Sigmoid", [conv(level, box)]), const(0.2)]), const(0.8)])
        boxes.append(flat(distances, 4))
        points.append(flat(conv(level, kps), 10))
    batch = ["batch"] if layout == "rank3" else []
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, batch + ["anchors", n])
               for names, n in ((scores, 1), (boxes, 4), (points, 10)) for name in names]
    graph = helper.make_graph(nodes, "standin_scrfd", [helper.make_tensor_value_info(
        "input.1", TensorProto.FLOAT, ["batch", 3, "height", "width"])], outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def photos() -> dict[str, list[bytes]]:
    """The demo's photos as the builder stores them (longer side 512: the letterbox enlarges them)
    and as downloaded (up to 3000 px: it shrinks the larger ones)."""
    originals = [image.data for image in make_demo_images()]
    return {"stored": [decode_image(data, BuildConfig())[0] for data in originals], "original": originals}


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The stand-in SCRFD files, one per output layout, where insightface can read them."""
    folder = tmp_path_factory.mktemp("scrfd")
    for layout in LAYOUTS:
        model = standin_scrfd(layout)
        assert len(model) < 20_000  # built here each run, never committed
        (folder / f"{layout}.onnx").write_bytes(model)
    return {layout: folder / f"{layout}.onnx" for layout in LAYOUTS}


def assert_same_detections(expected: list, got: list, floor_only: bool = False) -> None:
    """The bar for the faces that count: the same faces, boxes and landmarks within 1 px, scores
    within 0.01. For all the detector keeps, the stand-in's weak candidates move further: the
    letterbox is bilinear where OpenCV's rounds in fixed point, a level apart on some pixels, and
    an untrained random network's scores are steeper in its pixels than a trained detector's
    (RetinaFace's move by 0.003, tests/test_detect_torch.py): measured up to 0.031, so scores
    within 0.05 there, and a candidate within 0.05 of the floor may be kept by one side only (or
    lose to another in NMS)."""
    counted = equality(expected, got, MIN_FACE_SCORE)
    if not floor_only:
        assert counted["faces"] >= 100 and sum(any(f.score >= MIN_FACE_SCORE for f in faces) for faces in expected) >= 20
    for min_score in ((DETECTION_FLOOR,) if floor_only else (MIN_FACE_SCORE, DETECTION_FLOOR)):
        found = equality(expected, got, min_score)
        one_side = found["only_onnxruntime"] + found["only_torch"]
        assert all(score < DETECTION_FLOOR + 0.05 for score in one_side) if min_score == DETECTION_FLOOR \
            else one_side == [], found
        assert found["max_box_diff_px"] <= 1.0 and found["max_landmark_diff_px"] <= 1.0, found
        assert found["max_score_diff"] <= (0.05 if min_score == DETECTION_FLOOR else 0.01), found


@pytest.mark.parametrize("layout", ["rank2", "rank3"])
def test_torch_on_the_cpu_finds_what_insightface_finds(standins, photos, layout: str) -> None:
    reference = InsightFaceDetector(str(standins[layout]), 640, use_gpu=False, floor=DETECTION_FLOOR)
    assert reference.model.batched == (layout == "rank3")  # insightface reads both layouts
    detector = TorchSCRFD(standins[layout].read_bytes(), 640, "cpu", DETECTION_FLOOR)
    for which in ("stored", "original"):  # each set in one batch: insightface takes them one by one
        assert_same_detections(reference.detect_bytes(photos[which]), detector.detect_bytes(photos[which]))


@CUDA
@pytest.mark.parametrize("half", [True, False])
def test_torch_on_the_gpu_finds_what_insightface_finds(standins, photos, half: bool) -> None:
    reference = InsightFaceDetector(str(standins["rank2"]), 640, use_gpu=False, floor=DETECTION_FLOOR)
    detector = TorchSCRFD(standins["rank2"].read_bytes(), 640, "cuda", DETECTION_FLOOR, half=half)
    assert detector.layout == "cell-major"
    for which in ("stored", "original"):
        assert_same_detections(reference.detect_bytes(photos[which]), detector.detect_bytes(photos[which]))


def test_the_batch_layout_is_found_by_running_the_network(standins, photos) -> None:
    layouts = {layout: TorchSCRFD(path.read_bytes(), 640, "cpu", DETECTION_FLOOR).layout
               for layout, path in standins.items()}
    assert layouts == {"rank2": "cell-major", "rank3": "image-major", "unbatchable": "one-by-one"}
    # a file whose outputs mix the images of a batch still detects, one image at a time
    reference = InsightFaceDetector(str(standins["unbatchable"]), 640, use_gpu=False, floor=DETECTION_FLOOR)
    detector = TorchSCRFD(standins["unbatchable"].read_bytes(), 640, "cpu", DETECTION_FLOOR)
    expected, got = reference.detect_bytes(photos["stored"]), detector.detect_bytes(photos["stored"])
    assert equality(expected, got, DETECTION_FLOOR)["faces"] >= 100
    assert_same_detections(expected, got, floor_only=True)


@pytest.mark.parametrize("shape", [(300, 451), (512, 384), (886, 1280), (40, 40), (3, 700)])
def test_letterbox_is_insightfaces(standins, shape: tuple[int, int]) -> None:
    """insightface's: the longer side 640, the other truncated, cv2.resize's INTER_LINEAR (which
    rounds in fixed point: within one level of our bilinear), at the top left; one scale, the heights'."""
    rng = np.random.default_rng(0)
    image = np.asarray(Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR))  # smooth, as photos are, not pure noise
    ratio = shape[0] / shape[1]  # insightface's SCRFD._detect_candidates, as it writes it
    h, w = (640, int(640 / ratio)) if ratio > 1 else (int(640 * ratio), 640)
    theirs = np.zeros((640, 640, 3), np.uint8)
    theirs[:h, :w] = cv2.resize(image, (w, h))
    detector = TorchSCRFD(standins["rank2"].read_bytes(), 640, "cpu", DETECTION_FLOOR)
    ours, scales = detector.letterbox([torch.from_numpy(image.copy()).permute(2, 0, 1)])
    assert scales.tolist() == [h / shape[0]]
    difference = np.abs(ours[0].permute(1, 2, 0).numpy() - theirs)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.15  # measured: 9 % of the levels differ by 1


def test_a_file_without_scrfds_outputs_or_a_size_it_cannot_run_at_is_refused() -> None:
    model = onnx.load_from_string(standin_scrfd("rank2"))
    del model.graph.output[6:]  # scores and boxes, no landmarks
    with pytest.raises(ConfigError, match="6 outputs"):
        TorchSCRFD(model.SerializeToString(), 640, "cpu", DETECTION_FLOOR)
    with pytest.raises(ConfigError, match="detect_size 600"):  # as insightface's own SCRFD files, it fails there
        TorchSCRFD(standin_scrfd("rank2"), 600, "cpu", DETECTION_FLOOR)


# --- the backend the build runs -------------------------------------------------------------------

def test_insightface_runs_on_torch_when_asked_and_the_output_says_so(standins, photos) -> None:
    config = BuildConfig(detector="insightface", insightface_model=str(standins["rank2"]), detect_backend="torch")
    config.validate()
    detector = make_detector(config, use_gpu=False)
    assert isinstance(detector, TorchSCRFD) and detector.name == "torch-cpu-fp32"
    samples = []
    for data in photos["stored"][:3]:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        samples.append(Sample(key="00000000000000", unit=0, input_file="in.parquet", input_row=0, url="https://x/a.jpg",
                              caption="c", content=data, width=width, height=height, original_width=width,
                              original_height=height))
    found = detect_samples(samples, detector, batch_size=2)
    assert {s.detected_by for s in found} == {"torch-cpu-fp32"} and any(s.faces for s in found)


def test_auto_picks_torch_for_insightface_on_a_gpu_and_onnxruntime_on_cpus(standins, monkeypatch) -> None:
    config = BuildConfig(detector="insightface", insightface_model=str(standins["rank2"]))
    assert make_detector(config, use_gpu=False).name == "onnxruntime-cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU node
    assert detect_backend(config, use_gpu=True) == "torch"
    assert detect_backend(BuildConfig(), use_gpu=True) == "torch"
    assert detect_backend(config, use_gpu=False) == "onnxruntime"
    chosen = BuildConfig(detector="insightface", detect_backend="onnxruntime")
    assert detect_backend(chosen, use_gpu=True) == "onnxruntime"


@CUDA
def test_auto_runs_insightface_on_torch_in_fp16_on_a_gpu(standins) -> None:
    config = BuildConfig(detector="insightface", insightface_model=str(standins["rank2"]))
    assert make_detector(config, use_gpu=True).name == "torch-cuda-fp16"
