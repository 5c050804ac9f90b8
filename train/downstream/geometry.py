"""Face crops for FaRL's downstream tasks: 3x3 matrices, RoI tanh-warping and its exact inverse.

Coordinates (one convention everywhere, OpenCV's): a point is (x, y) in pixels with pixel (row i,
column j) centred at x = j, y = i; an image of width W spans x in [-0.5, W - 0.5]. Landmarks and
boxes are read in this convention (a box's x1..x2 are continuous edges: (-0.5, W - 0.5) is the
whole width). grid_sample is always called with align_corners=False, whose normalised coordinate
u = (x + 0.5) / W * 2 - 1 is exactly this convention, so cv2.warpAffine with the same matrix
gives the same crop (tests/test_geometry.py checks it).

A `matrix` (B, 3, 3) maps original-image points to the *aligned, unwarped* output frame of size
`output_size` (h, w). Tanh-warping (Lin et al., "Face Parsing with RoI Tanh-Warping", CVPR 2019,
as FaRL's blueprint/facer implement it) then acts per axis on the normalised output coordinate
n = (x + 0.5) / w * 2 - 1: |n| <= 1 - f stays linear (the face), beyond it the excess e is squashed
to f * tanh(e / f), so the whole plane lands inside the output (f = warp_factor; f = 0 is a plain
crop, f = 1 plain tanh; FaRL uses 0.8 for LaPa, 0 for CelebAMask-HQ and the alignment sets). The
slope is 1 on both sides of the knee, so the warp is C1. FaRL normalises with x / w (half a pixel
off-centre); the symmetric form here moves the knee by half a pixel, which no result depends on.

Five-point template: facer's `_standard_face_pts` (FaRL's LaPa alignment, face scale 1.0): eyes
(196, 226), (316, 226), nose (256, 286), mouth corners (220, 360.4), (292, 360.4) in a 512 frame,
here kept in normalised [-1, 1] units. Order: image-left eye, image-right eye, nose tip,
image-left and image-right mouth corner; FaRL takes LaPa's 106 landmarks [104, 105, 54, 84, 90].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Size = int | tuple[int, int]

LAPA_FIVE_POINTS = (104, 105, 54, 84, 90)  # pupils, nose tip, mouth corners among LaPa's 106 points
FIVE_POINT_TEMPLATE = torch.tensor([[-0.234375, -0.1171875], [0.234375, -0.1171875], [0.0, 0.1171875],
                                    [-0.140625, 0.4078125], [0.140625, 0.4078125]])  # = facer's / 256 - 1


def hw(size: Size) -> tuple[int, int]:
    """(h, w) from an int (square) or an (h, w) pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _wh(size: Size, like: torch.Tensor) -> torch.Tensor:
    h, w = hw(size)
    return torch.tensor([w, h], dtype=like.dtype, device=like.device)


def apply_matrix(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Points (B, K, 2) or (K, 2) through matrices (B, 3, 3) or (3, 3), with the homogeneous divide."""
    ones = torch.ones_like(points[..., :1])
    out = torch.cat([points, ones], dim=-1) @ matrix.transpose(-1, -2)
    return out[..., :2] / out[..., 2:]


def similarity_matrix(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, shift; no reflection) taking src onto dst.

    This is Umeyama's solution for 2-D, written with complex numbers: with centred points p, q the
    best c = a + ib minimising sum |c p - q|^2 is sum(conj(p) q) / sum |p|^2. Differentiable.
    """
    mp, mq = src.mean(dim=-2, keepdim=True), dst.mean(dim=-2, keepdim=True)
    p, q = src - mp, dst - mq
    norm = p.square().sum(dim=(-1, -2))
    a = (p[..., 0] * q[..., 0] + p[..., 1] * q[..., 1]).sum(-1) / norm
    b = (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(-1) / norm
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # (..., 2, 2)
    shift = mq.squeeze(-2) - (rot @ mp.squeeze(-2).unsqueeze(-1)).squeeze(-1)
    return _affine_3x3(rot, shift)


def _affine_3x3(linear: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(B, 2, 2) and (B, 2) -> (B, 3, 3) with last row (0, 0, 1)."""
    top = torch.cat([linear, shift.unsqueeze(-1)], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 2] = 1
    return torch.cat([top, bottom], dim=-2)


def align_matrix(five_points: torch.Tensor, target_size: Size, face_scale: float = 1.0,
                 template: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 5, 2) landmarks -> (B, 3, 3) similarity onto the template placed in a target_size output.

    `template` (5, 2) is in normalised units ([-1, 1] spans the output; default FIVE_POINT_TEMPLATE);
    `face_scale` < 1 shrinks the face about the output centre (facer's target_face_scale).
    """
    five_points = torch.as_tensor(five_points)
    if not five_points.is_floating_point():
        five_points = five_points.float()
    tpl = (FIVE_POINT_TEMPLATE if template is None else torch.as_tensor(template)).to(five_points)
    dst = (tpl * face_scale + 1) / 2 * _wh(target_size, five_points) - 0.5
    return similarity_matrix(five_points, dst.expand_as(five_points))


def box_matrix(boxes: torch.Tensor, target_size: Size, scale: float = 1.0, square: bool = True) -> torch.Tensor:
    """Boxes (B, 4) x1, y1, x2, y2 -> (B, 3, 3) mapping the box's edges onto the output's edges.

    The crop is centre +- half size * scale (square: both halves = the larger one). FaRL's
    alignment recipe then shrinks the face about the output centre by scale_mu (0.8 for 300W and
    WFLW, 1.0 for AFLW-19) at train and test time: similarity_about_center(size, scale=0.8) @ this.
    """
    boxes = torch.as_tensor(boxes)
    if not boxes.is_floating_point():
        boxes = boxes.float()
    x1, y1, x2, y2 = boxes.unbind(-1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx, ry = (x2 - x1) / 2 * scale, (y2 - y1) / 2 * scale
    if square:
        rx = ry = torch.maximum(rx, ry)
    h, w = hw(target_size)
    sx, sy = w / (2 * rx), h / (2 * ry)
    zero = torch.zeros_like(sx)
    linear = torch.stack([torch.stack([sx, zero], -1), torch.stack([zero, sy], -1)], -2)
    shift = torch.stack([-(cx - rx) * sx - 0.5, -(cy - ry) * sy - 0.5], -1)
    return _affine_3x3(linear, shift)


def similarity_about_center(output_size: Size, angle: torch.Tensor | float = 0.0, scale: torch.Tensor | float = 1.0,
                            shift: torch.Tensor | None = None, batch: int = 1, dtype: torch.dtype = torch.float32,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """(B, 3, 3): rotate by angle (radians) and scale about the output centre, then shift (B, 2) pixels.

    Left-multiply a crop matrix with this to transform the output frame (augmentation, scale_mu).
    """
    angle = torch.as_tensor(angle, dtype=dtype, device=device).expand(batch)
    scale = torch.as_tensor(scale, dtype=dtype, device=device).expand(batch)
    h, w = hw(output_size)
    c = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=dtype, device=device)  # the output's centre pixel
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    t = c - (linear @ c.unsqueeze(-1)).squeeze(-1)
    if shift is not None:
        t = t + shift.to(dtype=dtype, device=device)
    return _affine_3x3(linear, t)


def _check_factor(warp_factor: float) -> float:
    if not 0.0 <= warp_factor <= 1.0:
        raise ValueError(f"warp_factor must be in [0, 1], got {warp_factor}")
    return float(warp_factor)


def _squash(n: torch.Tensor, f: float) -> torch.Tensor:
    """Per-axis tanh on normalised coordinates; written without torch.where so gradients stay finite."""
    if f == 0:
        return n
    excess = (n.abs() - (1 - f)).clamp(min=0)
    return n + n.sign() * (f * torch.tanh(excess / f) - excess)


def _unsquash(m: torch.Tensor, f: float) -> torch.Tensor:
    """Exact inverse of _squash for |m| < 1; the border (|m| >= 1, infinitely far) is clamped."""
    if f == 0:
        return m
    excess = (m.abs() - (1 - f)).clamp(min=0)
    t = (excess / f).clamp(max=1 - 4 * torch.finfo(m.dtype).eps)
    return m + m.sign() * (f * torch.atanh(t) - excess)


def _point_dtype(x: torch.Tensor) -> torch.dtype:
    # Points are few: run the warp in float64 (not on MPS, which lacks it) so that atanh of a point
    # deep in the squashed margin still inverts tanh to well under a pixel.
    return torch.float32 if x.device.type == "mps" else torch.float64


def warp_points(points: torch.Tensor, matrix: torch.Tensor, warp_factor: float, output_size: Size) -> torch.Tensor:
    """Original-image points (B, K, 2) -> their location in the (tanh-)warped output image."""
    f = _check_factor(warp_factor)
    work = _point_dtype(points)
    aligned = apply_matrix(matrix.to(work), points.to(work))
    wh = _wh(output_size, aligned)
    n = _squash((aligned + 0.5) / wh * 2 - 1, f)
    return ((n + 1) / 2 * wh - 0.5).to(points.dtype)


def unwarp_points(points: torch.Tensor, matrix: torch.Tensor, warp_factor: float, output_size: Size) -> torch.Tensor:
    """Points in the warped output (B, K, 2) -> original-image points; the inverse of warp_points."""
    f = _check_factor(warp_factor)
    work = _point_dtype(points)
    wh = _wh(output_size, points.to(work))
    n = _unsquash((points.to(work) + 0.5) / wh * 2 - 1, f)
    aligned = (n + 1) / 2 * wh - 0.5
    return apply_matrix(torch.linalg.inv(matrix.to(work)), aligned).to(points.dtype)


def _pixel_centers(size: Size, like: torch.Tensor) -> torch.Tensor:
    """(h * w, 2) pixel centres (x, y) in row-major order."""
    h, w = hw(size)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=like.dtype, device=like.device),
                            torch.arange(w, dtype=like.dtype, device=like.device), indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2)


def _to_grid(points: torch.Tensor, sampled_size: Size, grid_size: Size) -> torch.Tensor:
    """Pixel points (B, h*w, 2) of an image of sampled_size -> grid_sample grid (B, h, w, 2)."""
    h, w = hw(grid_size)
    return ((points + 0.5) / _wh(sampled_size, points) * 2 - 1).reshape(points.shape[0], h, w, 2)


def _batched(matrix: torch.Tensor) -> torch.Tensor:
    matrix = torch.as_tensor(matrix)
    matrix = matrix if matrix.is_floating_point() else matrix.float()
    return matrix.unsqueeze(0) if matrix.dim() == 2 else matrix


def tanh_warp_grid(matrix: torch.Tensor, warp_factor: float, output_size: Size, input_size: Size) -> torch.Tensor:
    """Grid (B, h, w, 2) that grid_sample(original image, grid) turns into the warped output.

    Each output pixel centre is unwarped (atanh, then the inverse matrix) to the original image.
    """
    f = _check_factor(warp_factor)
    matrix = _batched(matrix)
    centers = _pixel_centers(output_size, matrix).expand(matrix.shape[0], -1, -1)
    wh = _wh(output_size, matrix)
    aligned = (_unsquash((centers + 0.5) / wh * 2 - 1, f) + 1) / 2 * wh - 0.5
    original = apply_matrix(torch.linalg.inv(matrix), aligned)
    return _to_grid(original, input_size, output_size)


def inverse_tanh_warp_grid(matrix: torch.Tensor, warp_factor: float, output_size: Size,
                           input_size: Size) -> torch.Tensor:
    """Grid (B, H, W, 2) over the ORIGINAL image (input_size) pointing into the warped image (output_size).

    grid_sample(warped logits, this grid) puts the logits back on the original image (then argmax).
    """
    f = _check_factor(warp_factor)
    matrix = _batched(matrix)
    centers = _pixel_centers(input_size, matrix).expand(matrix.shape[0], -1, -1)
    aligned = apply_matrix(matrix, centers)
    wh = _wh(output_size, matrix)
    warped = (_squash((aligned + 0.5) / wh * 2 - 1, f) + 1) / 2 * wh - 0.5
    return _to_grid(warped, output_size, input_size)


def warp_images(images: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
                padding_mode: str = "zeros") -> torch.Tensor:
    """grid_sample with align_corners=False. images (B, C, H, W), or (B, H, W) label maps.

    mode="nearest" for label maps: integer inputs come back as the same integer dtype, values
    untouched; outside the source they become 0 (background, as FaRL's outlier_value=0). Warp a
    tensor of ones the same way to get FaRL's valid mask. Bilinear logits with zero padding keep
    their argmax (a positive multiple of in-image values), so zeros are fine for putting them back.
    """
    squeeze = images.dim() == 3
    x = images.unsqueeze(1) if squeeze else images
    dtype = x.dtype
    if not x.is_floating_point():
        if mode != "nearest":
            raise ValueError("integer images (label maps) need mode='nearest'")
        x = x.double() if dtype == torch.int64 else x.float()  # float32 is exact up to 2**24
    out = F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding_mode, align_corners=False)
    if not dtype.is_floating_point:
        out = out.round().to(dtype)
    return out.squeeze(1) if squeeze else out

