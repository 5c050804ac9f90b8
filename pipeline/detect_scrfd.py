"""insightface's SCRFD as a torch module: the `torch` backend of `--detector insightface`.

The network is the model pack's own ONNX file (e.g. buffalo_l's det_10g.onnx), converted by
onnx2torch; the preprocessing and decoding are insightface's (insightface.model_zoo.scrfd, 2.1),
done batched on the device by pipeline.detect_torch.TorchDetector, where the onnxruntime backend
(pipeline.detect.InsightFaceDetector) runs insightface itself, one image at a time.
"""

from __future__ import annotations

import logging

import torch

from pipeline.config import ConfigError
from pipeline.detect_torch import TorchDetector

SCRFD_MEAN, SCRFD_STD = 127.5, 128.0  # insightface: blobFromImage(BGR, 1/128, mean 127.5, swapRB=True): RGB in
SCRFD_HEADS = {9: ((8, 16, 32), 2), 15: ((8, 16, 32, 64, 128), 1)}  # outputs -> strides, anchors per cell


class TorchSCRFD(TorchDetector):
    """SCRFD on `device` from the bytes of its ONNX file; `half` runs the network in fp16 (the
    default on a GPU). Outputs are scores, then box distances, then landmarks, per stride."""

    SHRINK_BY_AREA = False  # insightface resizes with cv2.resize's default, INTER_LINEAR, both ways
    NMS_PIXEL = 1.0  # its nms counts pixels inclusively: (x2 - x1 + 1) * (y2 - y1 + 1), in original pixels

    def __init__(self, model: bytes, size: int, device: str | torch.device, floor: float, half: bool | None = None):
        super().__init__(model, size, device, floor, half)
        self.strides, self.anchors, self.layout = self.probe()
        if size % self.strides[-1]:  # insightface's grid is size // stride cells: the network's must match it
            raise ConfigError(f"insightface's SCRFD needs a detect_size divisible by {self.strides[-1]}, got {size}")
        self.centres = [self.anchor_centres(stride) for stride in self.strides]

    @torch.inference_mode()
    def probe(self) -> tuple[tuple[int, ...], int, str]:
        """The strides, anchors per cell and batch layout of the outputs, from running the network
        on two random size x size images alone and together. SCRFD files differ: insightface's
        original export (scrfd2onnx before its PR #1781, which the model packs seem to predate)
        flattens (row, column, image, anchor) into rank-2 outputs; later ones keep a batch axis
        (rank 3); a file may fix its batch at 1. The layout that gives each image its own outputs
        back is used, else the images go through the network one at a time."""
        noise = torch.rand(2, 3, self.size, self.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        images = noise.to(self.device).contiguous(memory_format=torch.channels_last)
        try:
            alone = [[o.reshape(-1, o.shape[-1]) for o in self.network(image[None])] for image in images]
        except RuntimeError as error:  # e.g. an FPN whose upsampled maps miss the next level's by a cell
            raise ConfigError(f"this SCRFD file does not run at detect_size {self.size} (insightface's run at "
                              f"multiples of 32): {error}") from error
        if len(alone[0]) not in SCRFD_HEADS:
            raise ConfigError(f"not an SCRFD detector with landmarks: {len(alone[0])} outputs, not 9 or 15")
        strides, anchors = SCRFD_HEADS[len(alone[0])]
        try:
            together = self.network(images)
        except RuntimeError:  # a reshape that fixes the batch at 1
            together = None
        for layout in ("image-major", "cell-major"):
            if together is not None and self.same_outputs(together, alone, anchors, layout):
                return strides, anchors, layout
        logging.getLogger(__name__).warning("this SCRFD file cannot take a batch: detecting one image at a time")
        return strides, anchors, "one-by-one"

    def same_outputs(self, together: list[torch.Tensor], alone: list[list[torch.Tensor]], anchors: int,
                     layout: str) -> bool:
        """Whether `together`, read in `layout`, holds each image's outputs from `alone` (within
        what a different batch size changes in cuDNN's and TF32's sums)."""
        try:
            return all(torch.allclose(self.per_image(out, len(alone), anchors, layout), torch.stack(parts),
                                      rtol=1e-2, atol=1e-3) for out, parts in zip(together, zip(*alone)))
        except RuntimeError:  # shapes that do not even fit the layout
            return False

    @staticmethod
    def per_image(output: torch.Tensor, images: int, anchors: int, layout: str) -> torch.Tensor:
        """A batch's output as (images, cells x anchors, width), each image's rows in insightface's order."""
        rows = output.reshape(-1, output.shape[-1])
        if layout == "cell-major":  # rows are (row, column, image, anchor)
            return rows.unflatten(0, (-1, images, anchors)).transpose(0, 1).flatten(1, 2)
        return rows.unflatten(0, (images, -1))

    def anchor_centres(self, stride: int) -> torch.Tensor:
        """(cells x anchors, 2): x, y of each anchor in the square, row by row, a cell's anchors
        together, as insightface's np.mgrid centres times the stride."""
        cells = self.size // stride
        ys, xs = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
        centres = torch.stack([xs.flatten(), ys.flatten()], 1).float() * stride
        return centres.repeat_interleave(self.anchors, 0).to(self.device)

    def fit(self, height: int, width: int) -> tuple[int, int, float]:
        """insightface's letterbox: the longer side `size`, the other truncated as int() does, and
        one scale for both axes, the heights'."""
        ratio = height / width
        h, w = (self.size, int(self.size / ratio)) if ratio > 1 else (int(self.size * ratio), self.size)
        h, w = max(1, h), max(1, w)  # a banner insightface cannot resize at all keeps a pixel here
        return h, w, h / height

    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        pixels = ((batch - SCRFD_MEAN) / SCRFD_STD).contiguous(memory_format=torch.channels_last)
        if self.layout == "one-by-one":
            return [torch.cat(parts) for parts in zip(*(self.network(image[None]) for image in pixels))]
        return self.network(pixels)

    def decode(self, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """insightface's distance2bbox and distance2kps: distances from each anchor's centre, in strides."""
        levels = len(self.strides)
        images = outputs[0].numel() // len(self.centres[0])  # the first output: one score per anchor
        layout = "image-major" if self.layout == "one-by-one" else self.layout  # forward stacked them
        corners, marks, scores = [], [], []
        for level, (stride, centres) in enumerate(zip(self.strides, self.centres)):
            score, box, points = (self.per_image(outputs[level + k * levels], images, self.anchors, layout)
                                  for k in range(3))
            box, points = box * stride, points.unflatten(-1, (5, 2)) * stride
            corners.append(torch.cat([centres - box[..., :2], centres + box[..., 2:]], -1))
            marks.append(centres[:, None] + points)
            scores.append(score[..., 0])
        return torch.cat(corners, 1), torch.cat(marks, 1), torch.cat(scores, 1)
