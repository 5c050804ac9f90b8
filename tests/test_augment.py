"""train/downstream/augment.py: reproducible, range-preserving photometric ops and a label-exact random affine."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from train.downstream.augment import (ALIGNMENT_300W_WFLW, ALIGNMENT_AFLW19, PARSING, Augment, box_blur, random_affine,
                           random_blur, random_gamma, random_gray, random_noise, random_occlusion)
from train.downstream.geometry import align_matrix, apply_matrix, tanh_warp_grid, warp_images, warp_points

S = 128


def _images(b: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, S, S, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


OPS = {
    "gray": lambda x, g: random_gray(x, 0.5, generator=g),
    "gamma": lambda x, g: random_gamma(x, generator=g),
    "blur": lambda x, g: random_blur(x, 0.05, generator=g),
    "occlusion": lambda x, g: random_occlusion(x, 0.7, generator=g),
    "occlusion_noise": lambda x, g: random_occlusion(x, 1.0, fill="noise", generator=g),
    "noise": lambda x, g: random_noise(x, 0.5, generator=g),
    "augment_parsing": lambda x, g: Augment(PARSING).images(x, g),
    "augment_alignment": lambda x, g: Augment(ALIGNMENT_300W_WFLW).images(x, g),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_fixed_generator_same_output_and_shape_dtype_range_kept(name: str) -> None:
    op, images = OPS[name], _images()
    a, b = op(images, _gen()), op(images, _gen())
    assert torch.equal(a, b)
    assert a.shape == images.shape and a.dtype == images.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, images)  # 6 samples: some are changed
    assert not torch.equal(a, op(images, _gen(2)))  # and the draws depend on the seed
    assert torch.equal(images, _images())  # input untouched


def test_ops_keep_float64() -> None:
    images = _images(3).double()
    assert Augment(ALIGNMENT_AFLW19).images(images, _gen()).dtype == torch.float64


def test_gray_makes_channels_equal_for_chosen_samples_only() -> None:
    images = _images(8)
    out = random_gray(images, 1.0, generator=_gen())
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    assert torch.allclose(out[:, 0], 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])
    assert torch.equal(random_gray(images, 0.0, generator=_gen()), images)
    mixed = random_gray(images, 0.5, generator=_gen(3))
    gray = (mixed[:, 0] == mixed[:, 1]).flatten(1).all(1)
    assert 0 < gray.sum() < 8 and torch.equal(mixed[~gray], images[~gray])


def test_gamma_one_is_identity_and_choices_are_exact() -> None:
    images = _images()
    assert torch.equal(random_gamma(images, (1.0,), generator=_gen()), images)
    out = random_gamma(images, generator=_gen())
    for i in range(len(images)):
        assert any(torch.allclose(out[i], images[i] ** g) for g in (0.5, 1.0, 2.0))


def test_box_blur_matches_cv2_blur() -> None:
    image = np.random.default_rng(0).random((40, 50, 3)).astype(np.float32)
    for k in (2, 3, 4, 5):
        ours = box_blur(torch.from_numpy(image).permute(2, 0, 1)[None], k)[0].permute(1, 2, 0).numpy()
        assert np.allclose(ours, cv2.blur(image, (k, k)), atol=1e-5), k


def test_blur_size_zero_and_occlusion_zero_p_are_identities() -> None:
    images = _images()
    assert torch.equal(random_blur(images, 0.0, generator=_gen()), images)
    assert torch.equal(random_occlusion(images, 0.0, generator=_gen()), images)
    assert torch.equal(random_noise(images, 0.0, generator=_gen()), images)


def test_occlusion_is_one_black_rectangle_of_farl_size() -> None:
    images = _images(16) * 0.5 + 0.25  # never exactly 0 by chance
    out = random_occlusion(images, 1.0, generator=_gen())
    for im in out:
        black = (im == 0).all(0)
        rows, cols = black.any(1).nonzero()[:, 0], black.any(0).nonzero()[:, 0]
        assert black.sum() == len(rows) * len(cols)  # a filled axis-aligned rectangle
        assert len(rows) <= 0.4 * S + 1 and len(cols) <= 0.5 * S + 1


def test_random_affine_zero_sigmas_is_identity() -> None:
    matrix = torch.tensor([[1.3, 0.2, -5.0], [-0.2, 1.3, 7.0], [0.0, 0.0, 1.0]]).expand(4, 3, 3)
    out = random_affine(matrix, S, 0.0, 0.0, 0.0, generator=_gen())
    assert torch.allclose(out, matrix, atol=1e-6)
    for normal in (True, False):
        out = random_affine(matrix, S, 0.0, 0.0, 0.0, shift_normal=normal, rot_normal=normal,
                            scale_normal=normal, generator=_gen())
        assert torch.allclose(out, matrix, atol=1e-6)
    assert torch.allclose(random_affine(matrix[0], S, 0.0, 0.0, 0.0), matrix[0], atol=1e-6)  # unbatched


def test_random_affine_is_a_similarity_about_the_centre_with_the_right_spread() -> None:
    eye = torch.eye(3).expand(4000, 3, 3)
    out = random_affine(eye, S, 0.01, 0.314, 0.1, generator=_gen())
    assert torch.equal(out, random_affine(eye, S, generator=_gen()))  # defaults = parsing protocol
    a, b = out[:, 0, 0], out[:, 1, 0]
    assert torch.allclose(out[:, 1, 1], a) and torch.allclose(out[:, 0, 1], -b)  # rotation + uniform scale
    angle, scale = torch.atan2(b, a), torch.hypot(a, b)
    assert abs(angle.std() - 0.314) < 0.02 and abs(scale.std() - 0.1) < 0.01 and abs(scale.mean() - 1) < 0.01
    centre = torch.full((1, 1, 2), (S - 1) / 2)
    shift = apply_matrix(out, centre.expand(4000, 1, 2))[:, 0] - centre[0]
    assert shift.abs().max() <= 0.01 * S + 1e-4 and shift.abs().max() > 0.009 * S  # uniform +-0.01 * size
    al = random_affine(eye, S, 0.05, 0.174, 0.1, scale_mu=0.8, shift_normal=False, rot_normal=False,
                       scale_normal=False, generator=_gen())
    al_scale = torch.hypot(al[:, 0, 0], al[:, 1, 0])
    assert al_scale.min() >= 0.7 - 1e-5 and al_scale.max() <= 0.9 + 1e-5


def test_landmarks_follow_the_augmented_matrix_into_the_warped_image() -> None:
    """The dot test: a dot drawn at a landmark lands where warp_points(new matrix) says."""
    h, w = 150, 170
    g = _gen(4)
    five = torch.tensor([[60.0, 60.0], [110.0, 62.0], [85.0, 85.0], [66.0, 110.0], [104.0, 111.0]])
    matrix = align_matrix(five.expand(3, 5, 2) + torch.randn(3, 5, 2, generator=g) * 3, S)
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    dot = torch.tensor([73.3, 91.6])  # somewhere on the face
    image = torch.exp(-((xs - dot[0]) ** 2 + (ys - dot[1]) ** 2) / (2 * 1.5 ** 2))[None, None].expand(3, 1, h, w)
    for warp_factor, config in ((0.8, PARSING), (0.0, ALIGNMENT_300W_WFLW)):
        augmented = Augment(config).matrix(matrix, S, generator=g)
        assert not torch.allclose(augmented, matrix)
        warped = warp_images(image, tanh_warp_grid(augmented, warp_factor, S, (h, w)))[:, 0]
        expected = warp_points(dot.expand(3, 1, 2), augmented, warp_factor, S)[:, 0]
        for im, e in zip(warped, expected):
            i, j = divmod(int(im.argmax()), S)
            win = im[i - 2:i + 3, j - 2:j + 3]
            win = win - win.min()
            yy, xx = torch.meshgrid(torch.arange(i - 2, i + 3).float(), torch.arange(j - 2, j + 3).float(),
                                    indexing="ij")
            peak = torch.stack([(xx * win).sum(), (yy * win).sum()]) / win.sum()
            assert (peak - e).norm() < 1.0
