"""FaRL's downstream training augmentations, batched in torch with an explicit torch.Generator.

Geometric: `random_affine` left-multiplies the crop/align matrix with a random similarity about the
output centre, *before* the warp, so image, label map and landmarks all go through one matrix
(train.downstream.geometry) and stay aligned exactly. Photometric ops act on the warped images (B, 3, H, W) in
[0, 1], after the warp, one independent draw per sample; none of them moves pixels, so labels
and landmarks are untouched (occlusion included: an occluded pixel keeps its label, as in FaRL,
where only alignment uses occlusion and the points stay the targets).

Defaults follow FaRL's official configs and its blueprint augmenters (the protocol in
farl.md only names them):
- affine, parsing (LaPa, CelebAMask-HQ): shift U(+-0.01) x min(h, w) (shift_normal: false),
  rotation N(0, 0.314) rad, scale N(1, 0.1) (linear, not log, scale).
- affine, alignment: everything uniform: shift U(+-0.05), rotation U(+-0.174), scale
  U(scale_mu +- 0.1) with scale_mu 0.8 for 300W and WFLW, 1.0 for AFLW-19 (FaRL also applies
  scale_mu, without noise, at test time: geometry.similarity_about_center).
- gray p = 0.1 (ITU-R 601 luma, OpenCV's RGB2GRAY); gamma: one of {0.5, 1, 2} uniformly
  (FaRL's sqrt / identity / square); blur: a box filter of size int(mean(H, W) * U(0, 0.01)),
  applied when > 1 (FaRL's RandomBlur, reflect-101 borders like cv2.blur), not a Gaussian.
- alignment only: occlusion p = 1 (a black rectangle of height U(0.2, 0.8) x H/2 and width that
  +- U(0.2) x W/2 at a uniform centre), then noise with p = 0.5 (blend with uniform noise,
  alpha U(0, 0.5): FaRL's NoiseFusion). Order as FaRL: occlusion, noise, gray, gamma, blur.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from train.downstream.geometry import Size, hw, similarity_about_center


def _rand(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor,
          normal: bool = False) -> torch.Tensor:
    """Uniform [0, 1) or standard normal draws made on the generator's device, then moved to `like`'s.

    Drawing where the generator lives keeps a CPU generator usable (and reproducible) for CUDA data.
    """
    device = generator.device if generator is not None else like.device
    draw = torch.randn if normal else torch.rand
    return draw(tuple(shape), generator=generator, device=device).to(device=like.device, dtype=like.dtype)


def _centered(shape: Sequence[int], sigma: float, normal: bool, generator: torch.Generator | None,
              like: torch.Tensor) -> torch.Tensor:
    """N(0, sigma) or U(-sigma, sigma), blueprint's two ways of reading a sigma."""
    if normal:
        return _rand(shape, generator, like, normal=True) * sigma
    return (_rand(shape, generator, like) * 2 - 1) * sigma


def random_affine(matrix: torch.Tensor, output_size: Size, shift_sigma: float = 0.01, rot_sigma: float = 0.314,
                  scale_sigma: float = 0.1, *, scale_mu: float = 1.0, shift_normal: bool = False,
                  rot_normal: bool = True, scale_normal: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, 3) -> random similarity about the output centre @ matrix (defaults: FaRL's parsing).

    shift is a fraction of min(h, w) per axis, rotation in radians, scale multiplicative
    (scale_mu + noise, kept >= 0.05 so a freak draw cannot flip or collapse the crop).
    """
    squeeze = matrix.dim() == 2
    matrix = matrix.unsqueeze(0) if squeeze else matrix
    b = matrix.shape[0]
    h, w = hw(output_size)
    shift = _centered((b, 2), shift_sigma, shift_normal, generator, matrix) * min(h, w)
    angle = _centered((b,), rot_sigma, rot_normal, generator, matrix)
    scale = (scale_mu + _centered((b,), scale_sigma, scale_normal, generator, matrix)).clamp(min=0.05)
    out = similarity_about_center(output_size, angle, scale, shift, batch=b, dtype=matrix.dtype,
                                  device=matrix.device) @ matrix
    return out.squeeze(0) if squeeze else out


def _chosen(images: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, 1, 1, 1) bool: which samples an op with probability p applies to."""
    return (_rand((images.shape[0],), generator, images) < p).view(-1, 1, 1, 1)


def random_gray(images: torch.Tensor, p: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability p per sample, replace RGB by its luma in all three channels."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    gray = (images * weights).sum(1, keepdim=True).expand_as(images)
    return torch.where(_chosen(images, p, generator), gray, images)


def random_gamma(images: torch.Tensor, gammas: Sequence[float] = (0.5, 1.0, 2.0),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """x ** gamma with gamma drawn uniformly from `gammas` per sample (clamped to [0, 1] first, as FaRL)."""
    choice = (_rand((images.shape[0],), generator, images) * len(gammas)).long().clamp(max=len(gammas) - 1)
    gamma = torch.tensor(list(gammas), dtype=images.dtype, device=images.device)[choice].view(-1, 1, 1, 1)
    return images.clamp(0, 1).pow(gamma)


def box_blur(image: torch.Tensor, k: int) -> torch.Tensor:
    """cv2.blur(image, (k, k)) for (N, C, H, W): anchor at k // 2, reflect-101 borders."""
    before, after = k // 2, k - 1 - k // 2
    padded = F.pad(image, (before, after, before, after), mode="reflect")  # torch's reflect = cv2's reflect-101
    return F.avg_pool2d(padded, k, stride=1)


def random_blur(images: torch.Tensor, max_fraction: float = 0.01, p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """FaRL's RandomBlur: box blur of size int(mean(H, W) * U(0, max_fraction)) when that is > 1."""
    h, w = images.shape[-2:]
    sizes = (_rand((images.shape[0],), generator, images) * ((h + w) / 2 * max_fraction)).long()
    sizes = torch.where(_chosen(images, p, generator).view(-1), sizes, torch.zeros_like(sizes))
    out = images.clone()
    for i, k in enumerate(sizes.tolist()):  # kernel sizes differ per sample; batches are small
        if k > 1:
            out[i:i + 1] = box_blur(images[i:i + 1].clamp(0, 1), min(k, h - 1, w - 1))
    return out


def random_occlusion(images: torch.Tensor, p: float = 1.0, height_range: tuple[float, float] = (0.2, 0.8),
                     width_delta: float = 0.2, fill: str = "constant", value: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability p, cover a random rectangle (FaRL's RandomOcclusion sizes) with `value` or noise.

    Height r_h * H / 2 with r_h ~ U(height_range), width (r_h + U(+-width_delta)) * W / 2, centre
    uniform over the image, clipped to it. fill="constant" (FaRL: 0) or "noise" (uniform [0, 1)).
    Labels/landmarks are not changed (see the module docstring).
    """
    b, c, h, w = images.shape
    r = _rand((b, 4), generator, images)
    rh = height_range[0] + r[:, 0] * (height_range[1] - height_range[0])
    rw = rh + (r[:, 1] * 2 - 1) * width_delta
    half_h, half_w = (rh * h / 4).view(-1, 1, 1), (rw * w / 4).view(-1, 1, 1)
    cy, cx = (r[:, 2] * (h - 1)).view(-1, 1, 1), (r[:, 3] * (w - 1)).view(-1, 1, 1)
    ys = torch.arange(h, device=images.device, dtype=images.dtype).view(1, -1, 1)
    xs = torch.arange(w, device=images.device, dtype=images.dtype).view(1, 1, -1)
    inside = ((ys - cy).abs() <= half_h) & ((xs - cx).abs() <= half_w)  # (B, H, W)
    mask = inside.unsqueeze(1) & _chosen(images, p, generator)
    if fill == "noise":
        filler = _rand(images.shape, generator, images)
    elif fill == "constant":
        filler = torch.full_like(images, value)
    else:
        raise ValueError(f"fill must be 'constant' or 'noise', got {fill!r}")
    return torch.where(mask, filler, images)


def random_noise(images: torch.Tensor, p: float = 0.5, max_alpha: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability p, blend with uniform noise: (1 - a) x + a U[0, 1), a ~ U(0, max_alpha) (NoiseFusion)."""
    alpha = _rand((images.shape[0],), generator, images).view(-1, 1, 1, 1) * max_alpha
    alpha = torch.where(_chosen(images, p, generator), alpha, torch.zeros_like(alpha))
    return (1 - alpha) * images + alpha * _rand(images.shape, generator, images)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the training augmentations; defaults are FaRL's face parsing."""

    shift_sigma: float = 0.01
    rot_sigma: float = 0.314
    scale_sigma: float = 0.1
    scale_mu: float = 1.0
    shift_normal: bool = False
    rot_normal: bool = True
    scale_normal: bool = True
    gray_p: float = 0.1
    gammas: tuple[float, ...] = (0.5, 1.0, 2.0)
    blur_max_fraction: float = 0.01
    occlusion_p: float = 0.0
    noise_p: float = 0.0


PARSING = AugmentConfig()
ALIGNMENT_300W_WFLW = AugmentConfig(shift_sigma=0.05, rot_sigma=0.174, scale_sigma=0.1, scale_mu=0.8,
                                    shift_normal=False, rot_normal=False, scale_normal=False,
                                    occlusion_p=1.0, noise_p=0.5)
ALIGNMENT_AFLW19 = replace(ALIGNMENT_300W_WFLW, scale_mu=1.0)


class Augment:
    """The training augmentations of one config: `matrix` before the warp, `images` after it."""

    def __init__(self, config: AugmentConfig = PARSING):
        self.config = config

    def matrix(self, matrix: torch.Tensor, output_size: Size, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.config
        return random_affine(matrix, output_size, c.shift_sigma, c.rot_sigma, c.scale_sigma, scale_mu=c.scale_mu,
                             shift_normal=c.shift_normal, rot_normal=c.rot_normal, scale_normal=c.scale_normal,
                             generator=generator)

    def images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.config
        if c.occlusion_p > 0:
            images = random_occlusion(images, c.occlusion_p, generator=generator)
        if c.noise_p > 0:
            images = random_noise(images, c.noise_p, generator=generator)
        images = random_gray(images, c.gray_p, generator=generator)
        images = random_gamma(images, c.gammas, generator=generator)
        return random_blur(images, c.blur_max_fraction, generator=generator)
