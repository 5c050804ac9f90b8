"""train/downstream/geometry.py: alignment and box matrices, tanh-warp of points/images and their inverses."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from train.downstream.geometry import (FIVE_POINT_TEMPLATE, align_matrix, apply_matrix, box_matrix, inverse_tanh_warp_grid,
                            similarity_about_center, tanh_warp_grid, unwarp_points, warp_images, warp_points)

H, W, S = 240, 320, 192  # original image (h, w) and the warped output size


def _faces(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-ish five points (a rotated, scaled, shifted template) and their align matrices."""
    g = torch.Generator().manual_seed(seed)
    tpl = (FIVE_POINT_TEMPLATE + 1) / 2 * 100 - 0.5
    angle = torch.rand(batch, generator=g) * 0.8 - 0.4
    scale = 0.7 + torch.rand(batch, generator=g) * 0.6
    shift = torch.rand(batch, 2, generator=g) * torch.tensor([W - 140.0, H - 140.0]) + 20
    pts = apply_matrix(similarity_about_center(100, angle, scale, batch=batch), tpl.expand(batch, 5, 2))
    pts = pts + shift[:, None] + torch.randn(batch, 5, 2, generator=g)  # not an exact similarity
    return pts, align_matrix(pts, S)


def _blob(centers: torch.Tensor, size: tuple[int, int], sigma: float = 1.5) -> torch.Tensor:
    """(B, 1, h, w) Gaussian dots at centers (B, 2) in pixel-centre coordinates."""
    ys, xs = torch.meshgrid(torch.arange(size[0]).float(), torch.arange(size[1]).float(), indexing="ij")
    d2 = (xs - centers[:, 0, None, None]) ** 2 + (ys - centers[:, 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * sigma ** 2)).unsqueeze(1)


def _peak(image: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Sub-pixel peak (x, y) of each (1, h, w) image: centroid of a small window around the argmax."""
    out = []
    for im in image[:, 0]:
        i, j = divmod(int(im.argmax()), im.shape[1])
        y0, x0 = max(i - radius, 0), max(j - radius, 0)
        win = im[y0:i + radius + 1, x0:j + radius + 1]
        win = (win - win.min()).clamp(min=0)
        ys, xs = torch.meshgrid(torch.arange(win.shape[0]).float() + y0, torch.arange(win.shape[1]).float() + x0,
                                indexing="ij")
        out.append(torch.stack([(xs * win).sum() / win.sum(), (ys * win).sum() / win.sum()]))
    return torch.stack(out)


@pytest.mark.parametrize("warp_factor", [0.0, 0.8, 1.0])
def test_warp_then_unwarp_points_round_trips_within_half_a_pixel(warp_factor: float) -> None:
    _, matrix = _faces(6)
    g = torch.Generator().manual_seed(1)
    points = torch.rand(6, 500, 2, generator=g) * torch.tensor([W, H]) - 0.5  # all over the image
    warped = warp_points(points, matrix, warp_factor, S)
    assert warped.dtype == points.dtype and warped.shape == points.shape
    assert (unwarp_points(warped, matrix, warp_factor, S) - points).abs().max() < 0.5
    if warp_factor > 0:  # the tanh squashes the whole plane into the output image
        assert warped.min() > -0.5 and warped.max() < S - 0.5
    # and the other way round: output pixels -> original -> output
    out = torch.rand(6, 500, 2, generator=g) * (S - 1)
    assert (warp_points(unwarp_points(out, matrix, warp_factor, S), matrix, warp_factor, S) - out).abs().max() < 0.5


def test_warp_points_is_differentiable_and_finite() -> None:
    pts, _ = _faces(2)
    pts = pts.clone().requires_grad_(True)
    matrix = align_matrix(pts, S)
    centre = torch.full((2, 1, 2), (S - 1) / 2)  # n = 0 exactly, where sign() has no gradient
    warped = warp_points(torch.cat([pts, unwarp_points(centre, matrix.detach(), 0.8, S)], 1), matrix, 0.8, S)
    warped.square().sum().backward()
    assert torch.isfinite(pts.grad).all() and pts.grad.abs().sum() > 0


def test_align_matrix_maps_the_template_onto_itself() -> None:
    size = (256, 200)  # (h, w), non-square on purpose
    target = (FIVE_POINT_TEMPLATE + 1) / 2 * torch.tensor([200.0, 256.0]) - 0.5
    matrix = align_matrix(target.expand(3, 5, 2), size)
    assert torch.allclose(matrix, torch.eye(3).expand(3, 3, 3), atol=1e-5)
    # and a similarity copy of the template is mapped back exactly onto it
    moved = apply_matrix(similarity_about_center(size, 0.3, 1.7, torch.tensor([[10.0, -4.0]])), target)
    assert torch.allclose(apply_matrix(align_matrix(moved, size), moved), target, atol=1e-3)
    # numpy input works too (data workers)
    assert align_matrix(np.asarray(target)[None], size).shape == (1, 3, 3)


def test_box_matrix_maps_box_corners_to_output_corners() -> None:
    boxes = torch.tensor([[10.0, 20.0, 110.0, 70.0], [-5.5, 3.25, 40.0, 90.0]])
    corners = boxes.view(2, 2, 2)  # (x1, y1), (x2, y2)
    edges = torch.tensor([[-0.5, -0.5], [S - 0.5, 127.5]])  # output (h, w) = (128, S)
    assert torch.allclose(apply_matrix(box_matrix(boxes, (128, S), square=False), corners),
                          edges.expand(2, 2, 2), atol=1e-4)
    # square: centre +- the larger half size * scale, centre to centre
    matrix = box_matrix(boxes[:1], S, scale=1.25)
    square = torch.tensor([[[-2.5, -17.5], [122.5, 107.5]]])  # centre (60, 45), half 50 * 1.25
    assert torch.allclose(apply_matrix(matrix, square), torch.tensor([[[-0.5, -0.5], [S - 0.5, S - 0.5]]]), atol=1e-4)


@pytest.mark.parametrize("warp_factor", [0.0, 0.8])
def test_dot_lands_where_warp_points_says(warp_factor: float) -> None:
    pts, matrix = _faces(4, seed=3)
    # dots on the landmarks (inside the face) and one halfway out to the aligned crop's border,
    # where a 0.8 warp is already strongly non-linear
    edge = unwarp_points(torch.full((4, 1, 2), S * 0.9), matrix, 0.0, S)
    for centers in (pts[:, 0], pts[:, 4], (pts[:, 2] + edge[:, 0]) / 2):
        warped = warp_images(_blob(centers, (H, W)), tanh_warp_grid(matrix, warp_factor, S, (H, W)))
        expected = warp_points(centers[:, None], matrix, warp_factor, S)[:, 0]
        assert (_peak(warped) - expected).norm(dim=-1).max() < 1.0


def test_warp_then_inverse_warp_restores_a_smooth_image_in_the_face_region() -> None:
    _, matrix = _faces(2, seed=5)
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    image = torch.stack([0.5 + 0.4 * torch.sin(xs / 23) * torch.cos(ys / 17), (xs + ys) / (H + W),
                         0.5 + 0.3 * torch.cos((xs - ys) / 31)])[None].expand(2, 3, H, W)
    for warp_factor in (0.0, 0.8):
        warped = warp_images(image, tanh_warp_grid(matrix, warp_factor, S, (H, W)))
        back = warp_images(warped, inverse_tanh_warp_grid(matrix, warp_factor, S, (H, W)))
        assert back.shape == image.shape
        # face region: original pixels inside the aligned crop, a pixel away from its border
        aligned = apply_matrix(matrix, torch.stack([xs, ys], -1).reshape(1, -1, 2)).reshape(2, H, W, 2)
        face = ((aligned > 1) & (aligned < S - 2)).all(-1)
        assert face.sum() > 1000
        err = (back - image).abs().amax(1)[face]
        assert err.mean() < 0.01 and err.max() < 0.05


def test_nearest_mode_keeps_label_values() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 11, (2, H, W), generator=g)
    _, matrix = _faces(2)
    warped = warp_images(labels, tanh_warp_grid(matrix, 0.8, S, (H, W)), mode="nearest")
    assert warped.dtype == torch.int64 and warped.shape == (2, S, S)
    assert set(warped.unique().tolist()) <= set(range(11))
    # a crop of the whole image to its own size is the identity, label for label
    whole = box_matrix(torch.tensor([[-0.5, -0.5, W - 0.5, H - 0.5]]), (H, W), square=False)
    same = warp_images(labels[:1], tanh_warp_grid(whole, 0.0, (H, W), (H, W)), mode="nearest")
    assert torch.equal(same, labels[:1])
    with pytest.raises(ValueError):
        warp_images(labels, tanh_warp_grid(matrix, 0.8, S, (H, W)))  # bilinear on labels


def test_plain_crop_matches_cv2_warp_affine() -> None:
    _, matrix = _faces(1, seed=7)
    rng = np.random.default_rng(0)
    image = rng.random((H // 8, W // 8, 3)).astype(np.float32)
    image = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], (H, W),
                                                       mode="bilinear")[0].permute(1, 2, 0))
    ours = warp_images(torch.from_numpy(image).permute(2, 0, 1)[None], tanh_warp_grid(matrix, 0.0, S, (H, W)))
    theirs = cv2.warpAffine(image, matrix[0].double().numpy()[:2], (S, S), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    diff = np.abs(ours[0].permute(1, 2, 0).numpy() - theirs)[2:-2, 2:-2]
    assert diff.max() < 0.02  # cv2 quantises bilinear weights to 1/32


def test_unbatched_matrix_and_non_square_output() -> None:
    _, matrix = _faces(1)
    grid = tanh_warp_grid(matrix[0], 0.8, (160, 128), (H, W))
    assert grid.shape == (1, 160, 128, 2)
    inverse = inverse_tanh_warp_grid(matrix[0], 0.8, (160, 128), (H, W))
    assert inverse.shape == (1, H, W, 2) and inverse.abs().max() < 1  # all of the image lands inside
    with pytest.raises(ValueError):
        warp_points(torch.zeros(1, 1, 2), matrix, 1.5, S)
