"""The decode stage (pipeline.decode) on real photos: what is stored, its size, orientation and colour,
the refusals (decompression bombs, truncated or non-image bytes), and the perceptual hashes."""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import time

import cv2
import imagehash
import insightface
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from bench.dedupe_images import captioned
from demo.server import bomb_png
from pipeline.build_config import BuildConfig
from pipeline.decode import (CROP_SIDE, CROPS, EXIF_ORIENTATION, HASH_SIDE, HASHES, INNER, INNER_SIDE, TURNS, _grey,
                             _inner_terms, _inner_window, _lanczos, _without_bars, decode_sample, phash, phashes)
from pipeline.near_buckets import INNER_DISTANCE
from pipeline.schema import Sample

T1_JPG = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")  # 1280 x 886 group photo


def encode(pixels: np.ndarray, fmt: str = "JPEG", orientation: int | None = None, **params) -> bytes:
    image = Image.fromarray(pixels)
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        params["exif"] = exif.tobytes()
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def decode(data: bytes, **settings) -> Sample:
    sample = Sample(key="00000000000000", unit=0, input_file="in.parquet", input_row=0,
                    url="https://img.example.com/a.jpg", caption="a photo", content=data)
    decode_sample(sample, BuildConfig(**settings))
    return sample


def pixels(sample: Sample) -> np.ndarray:
    """The stored image, checked to be an RGB JPEG of the recorded size."""
    with Image.open(io.BytesIO(sample.content)) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (sample.width, sample.height)
        return np.asarray(image).astype(np.int16)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def t1_bytes() -> bytes:
    with open(T1_JPG, "rb") as f:
        return f.read()


def test_canonical_jpeg_within_max_side_is_stored_byte_identical() -> None:
    data = encode(skimage.data.astronaut(), quality=90)  # 512 x 512, max side 512
    sample = decode(data, image_max_side=512)
    assert sample.pending
    assert sample.content == data
    assert sample.sha256 == hashlib.sha256(data).hexdigest()
    assert (sample.width, sample.height, sample.original_width, sample.original_height) == (512, 512, 512, 512)


def test_larger_jpeg_is_shrunk_to_max_side(t1_bytes: bytes) -> None:
    sample = decode(t1_bytes, image_max_side=512)
    assert sample.pending and sample.content != t1_bytes
    assert (sample.original_width, sample.original_height) == (1280, 886)
    assert sample.width == 512 and abs(sample.height - 886 * 512 / 1280) <= 1
    original = Image.open(T1_JPG).convert("RGB").resize((sample.width, sample.height), Image.Resampling.LANCZOS)
    assert mean_abs_diff(pixels(sample), np.asarray(original)) < 6


@pytest.mark.parametrize("ratio", [1.5, 1.9, 2.5])
def test_a_shrink_removes_what_the_smaller_image_cannot_show(ratio: float) -> None:
    """Stripes finer than the stored image's pixels (0.45 cycles a pixel: past its Nyquist limit at
    any of these ratios) must come out nearly flat, not as coarser false stripes (moire). Their
    standard deviation, 70.7 grey levels in, comes out at 8-26 from OpenCV's area filter, 36-42 from
    plain bilinear and 51 from bicubic, which are faster (docs/PERFORMANCE.md, web-like input)."""
    stripes = 127.5 + 100 * np.cos(2 * np.pi * 0.45 * np.arange(960))
    image = np.repeat(np.clip(np.tile(stripes, (96, 1)), 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    sample = decode(encode(image, "PNG"), image_max_side=round(960 / ratio))
    assert sample.width == round(960 / ratio)
    row = pixels(sample)[sample.height // 2, 4:-4, 1].astype(float)
    assert row.std() < 30, f"false stripes of {row.std():.1f} grey levels (the input's: 70.7)"


def test_portrait_image_is_shrunk_by_its_height() -> None:
    portrait = np.ascontiguousarray(np.rot90(skimage.data.coffee()))  # 400 wide, 600 high
    sample = decode(encode(portrait, "PNG"), image_max_side=300)
    assert (sample.width, sample.height) == (200, 300)
    assert (sample.original_width, sample.original_height) == (400, 600)


def test_max_side_zero_keeps_the_size(t1_bytes: bytes) -> None:
    sample = decode(t1_bytes, image_max_side=0)
    assert (sample.width, sample.height) == (1280, 886)
    assert sample.content == t1_bytes  # t1.jpg is already an upright RGB JPEG


def test_png_is_reencoded_as_jpeg() -> None:
    photo = skimage.data.astronaut()
    sample = decode(encode(photo, "PNG"))
    assert sample.content[:2] == b"\xff\xd8"
    assert mean_abs_diff(pixels(sample), photo) < 4


@pytest.mark.parametrize("max_side", [0, 512])
def test_exif_orientation_6_is_stored_upright(max_side: int) -> None:
    upright = skimage.data.coffee()  # 600 wide, 400 high
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # as a camera held sideways stores it: 400 x 600
    data = encode(stored, orientation=6, quality=95)  # 6: rotate 90 degrees clockwise to display
    sample = decode(data, image_max_side=max_side)
    assert sample.pending and sample.content != data
    assert (sample.original_width, sample.original_height) == (600, 400)
    got = pixels(sample)
    assert got.shape[1] > got.shape[0]  # landscape again
    expected = np.asarray(Image.fromarray(upright).resize((sample.width, sample.height), Image.Resampling.LANCZOS))
    assert mean_abs_diff(got, expected) < 6
    assert mean_abs_diff(got, np.asarray(Image.fromarray(upright).rotate(180).resize(
        (sample.width, sample.height)))) > 30  # and not upside down


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_as_pillows_exif_transpose_turns_it(orientation: int) -> None:
    data = encode(skimage.data.coffee(), orientation=orientation, quality=95)
    sample = decode(data, image_max_side=0)
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    got = pixels(sample)
    assert got.shape == expected.shape and mean_abs_diff(got, expected) < 3


def test_a_corrupt_exif_tag_does_not_stop_an_upright_decode() -> None:
    """A Make tag renumbered as XResolution (a rational holding text), as mangled EXIF on the web
    has: ImageOps.exif_transpose raises re-serialising it, though the pixels are fine."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION], exif[0x010F] = 6, "cam"
    raw = exif.tobytes()
    assert raw.count(b"\x01\x0f\x00\x02") == 1  # tag 0x010F, type ASCII, big-endian as Pillow writes it
    stored = np.ascontiguousarray(np.rot90(skimage.data.coffee(), k=1))
    out = io.BytesIO()
    Image.fromarray(stored).save(out, format="JPEG", quality=95, exif=raw.replace(b"\x01\x0f\x00\x02", b"\x01\x1a\x00\x02"))
    with Image.open(io.BytesIO(out.getvalue())) as image, pytest.raises((TypeError, struct.error)):
        ImageOps.exif_transpose(image)
    sample = decode(out.getvalue(), image_max_side=0)
    assert sample.pending and (sample.width, sample.height) == (600, 400)
    assert mean_abs_diff(pixels(sample), skimage.data.coffee()) < 6


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped() -> None:
    grey = skimage.data.camera().astype(np.uint16) * 257  # the same picture over the 16-bit range
    out = io.BytesIO()
    Image.fromarray(grey).save(out, format="PNG")
    with Image.open(io.BytesIO(out.getvalue())) as image:
        assert image.mode.startswith("I")
    sample = decode(out.getvalue())
    assert sample.pending
    assert mean_abs_diff(pixels(sample)[..., 1], skimage.data.camera()) < 3  # clipping made it 254 on average


def test_exif_rotated_large_photo_is_shrunk_and_upright(t1_bytes: bytes) -> None:
    upright = np.asarray(Image.open(T1_JPG).convert("RGB"))
    data = encode(np.ascontiguousarray(np.rot90(upright, k=1)), orientation=6)
    sample = decode(data, image_max_side=512)
    assert (sample.original_width, sample.original_height) == (1280, 886)
    assert sample.width == 512 and abs(sample.height - 354) <= 1
    expected = np.asarray(Image.fromarray(upright).resize((sample.width, sample.height), Image.Resampling.LANCZOS))
    assert mean_abs_diff(pixels(sample), expected) < 8


def test_grayscale_becomes_rgb() -> None:
    gray = skimage.data.camera()
    data = encode(gray, quality=95)
    sample = decode(data)
    assert sample.content != data
    got = pixels(sample)
    assert got.shape == (512, 512, 3)
    assert np.abs(got[..., 0] - got[..., 2]).max() <= 2  # grey stays grey
    assert mean_abs_diff(got[..., 1], gray) < 4


def test_transparent_png_is_flattened_on_white() -> None:
    photo = skimage.data.astronaut()
    alpha = np.full(photo.shape[:2], 255, np.uint8)
    alpha[:, :256] = 0  # left half fully transparent
    sample = decode(encode(np.dstack([photo, alpha]), "PNG"))
    got = pixels(sample)
    assert got[:, :240].min() >= 245  # white, away from JPEG ringing at the edge
    assert mean_abs_diff(got[:, 272:], photo[:, 272:]) < 5


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png()


def test_decompression_bomb_is_refused_from_its_header(bomb: bytes) -> None:
    started = time.perf_counter()
    sample = decode(bomb)
    elapsed = time.perf_counter() - started
    assert sample.status == "image_too_large"
    assert "pixels" in sample.reason
    assert sample.content is None and sample.sha256 is None
    assert elapsed < 1.0  # decoding 900 M pixels would take many seconds and gigabytes


def test_max_image_pixels_is_configurable(t1_bytes: bytes) -> None:
    assert decode(t1_bytes, max_image_pixels=1280 * 886 - 1).status == "image_too_large"
    assert decode(t1_bytes, max_image_pixels=1280 * 886).pending


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg_is_a_decode_error(t1_bytes: bytes, cut: float) -> None:
    for max_side in (0, 512):  # the stored-as-is path and the draft-and-shrink path
        sample = decode(t1_bytes[: int(len(t1_bytes) * cut)], image_max_side=max_side)
        assert sample.status == "decode_error", (max_side, sample.reason)
        assert sample.content is None


@pytest.mark.parametrize("data", [b"<!DOCTYPE html><html><body>Not found</body></html>", b"", b"\xff\xd8\xff"])
def test_non_image_bytes_are_a_decode_error(data: bytes) -> None:
    sample = decode(data)
    assert sample.status == "decode_error"
    assert sample.content is None


def test_sha256_is_of_the_stored_bytes(t1_bytes: bytes) -> None:
    sample = decode(t1_bytes, image_max_side=256)
    assert sample.sha256 == hashlib.sha256(sample.content).hexdigest()
    assert sample.sha256 != hashlib.sha256(t1_bytes).hexdigest()


def test_samples_already_decided_are_left_alone() -> None:
    sample = Sample(key="k", unit=0, input_file="f", input_row=0, url=None, caption=None)
    sample.fail("invalid_url", "no URL")
    decode_sample(sample, BuildConfig())
    after = sample
    assert after.status == "invalid_url" and after.reason == "no URL" and after.sha256 is None


def test_image_over_max_image_pixels_is_refused_by_our_header_check() -> None:
    sample = decode(bomb_png(side=7000))  # 49 M pixels: under PIL's own guard, over our 40 M default
    assert sample.status == "image_too_large" and "7000x7000" in sample.reason


PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "retina", "page")


def skimage_photo(name: str) -> Image.Image:
    """One of scikit-image's photos, or one of insightface's (a name ending in .jpg)."""
    if name.endswith(".jpg"):
        with Image.open(os.path.join(os.path.dirname(T1_JPG), name)) as image:
            return image.convert("RGB")
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


@pytest.mark.parametrize("name", PHOTOS)
def test_phash_is_imagehash_phash_and_crop_hashes_are_the_crops(name: str) -> None:
    """phashes()[0] is imagehash's pHash of the (box-reduced) image and phashes()[i] imagehash's pHash
    of the image cut as CROPS[i] says, to within the bits that rounding the 32 x 32 image flips."""
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    reduced = image.reduce(max(image.size) // HASH_SIDE) if max(image.size) >= 2 * HASH_SIDE else image
    hashes = phashes(image)
    assert len(hashes) == HASHES and len(set(hashes)) > 1 and all(len(h) == 16 for h in hashes)
    width, height = reduced.size
    for (left, top, right, bottom), ours in zip(CROPS, hashes):
        cut = (left * CROP_SIDE * width, top * CROP_SIDE * height,
               width - right * CROP_SIDE * width, height - bottom * CROP_SIDE * height)
        box = tuple(math.ceil(edge - 0.5) for edge in cut)  # the pixels whose centres lie inside
        expected = str(imagehash.phash(reduced.crop(box)))
        assert hamming(ours, expected) <= 4, (name, box)  # textures (brick) reach 4, most are 0-2


@pytest.mark.parametrize("name, cut", [("t1.jpg", (0, 0, 0.02, 0.02)), ("mask_black.jpg", (0.02, 0.02, 0, 0)),
                                       ("rocket", (0, 0, 0.02, 0.02)), ("coffee", (0.025,) * 4)])
def test_a_cropped_copy_is_near_a_crop_hash_but_not_the_phash(name: str, cut: tuple[float, ...]) -> None:
    """The point of the crop hashes: cutting a few per cent off some sides of a real photo moves its
    pHash past the default k = 6, and one of the original's crop hashes stays close."""
    original = skimage_photo(name)
    width, height = original.size
    left, top, right, bottom = cut
    copy = original.crop((round(left * width), round(top * height), width - round(right * width),
                          height - round(bottom * height)))
    copy_hash, own = phashes(copy)[0], phashes(original)
    assert hamming(copy_hash, own[0]) > 6
    assert min(hamming(copy_hash, h) for h in own[1:len(CROPS)]) <= 2


@pytest.mark.parametrize("max_side", [512, 0])
def test_decoded_sample_carries_all_its_hashes(t1_bytes: bytes, max_side: int) -> None:
    """Shrunk (512) or kept as downloaded (0: decoded straight to grey, at a quarter of its size),
    the stored image's hashes are those of its pixels decoded in colour."""
    sample = decode(t1_bytes, image_max_side=max_side)
    assert (sample.content == t1_bytes) == (max_side == 0)
    with Image.open(io.BytesIO(sample.content)) as stored:
        again = phashes(stored.convert("RGB"))  # decode hashed the pixels before their JPEG encoding
    stored_hashes = [sample.phash, *sample.phash_crops, *sample.phash_inner]
    assert len(stored_hashes) == HASHES and all(hamming(a, b) <= 2 for a, b in zip(stored_hashes, again))


def full_row_lanczos(start: float, stop: float, size: int) -> np.ndarray:
    """decode._lanczos as its docstring defines it, over every pixel of the row (it computes only the
    kernel's band)."""
    scale = (stop - start) / 32
    stretch = max(scale, 1.0)
    centres = start + (np.arange(32) + 0.5) * scale
    pixels = np.arange(size) + 0.5
    x = (pixels[None, :] - centres[:, None]) / stretch
    weights = np.sinc(x) * np.sinc(x / 3) * (np.abs(x) < 3) * ((pixels >= start) & (pixels < stop))[None, :]
    return weights / weights.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("size", [1, 2, 7, 31, 32, 33, 64, 127, 128, 255, 256, 300, 511, 1000])
def test_the_resampling_windows_are_the_whole_kernels(size: int) -> None:
    """The windows' band holds every pixel a kernel reaches, for images smaller and larger than 32
    and for each cut a hash makes (crops, the inner part)."""
    for start, stop in [(0, size), (0.02 * size, size), (0, 0.98 * size), (0.02 * size, 0.98 * size),
                        (0.1 * size, 0.84 * size), (0.1 * size, 0.9 * size)]:
        assert np.array_equal(_lanczos(start, stop, size), full_row_lanczos(start, stop, size)), (start, stop)


def whole_image_turns(grey: np.ndarray) -> np.ndarray:
    """_inner_terms as its docstring defines it, in float64: the whole image turned, then the windows."""
    height, width = grey.shape
    scale = INNER_SIDE / max(height, width)
    if scale < 1:
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
        grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)
    left, top, right, bottom = INNER
    rows = _inner_window(height, top, bottom).astype(np.float64)
    columns = _inner_window(width, left, right).astype(np.float64)
    terms = []
    for angle in TURNS:
        turn = cv2.getRotationMatrix2D((width / 2 - 0.5, height / 2 - 0.5), angle, 1.0)
        turned = cv2.warpAffine(grey, turn, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        terms.append((rows @ turned.astype(np.float64) @ columns.T).ravel())
    return np.stack(terms)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "brick", "t1.jpg"])
def test_warping_only_the_inner_part_gives_the_whole_images_terms(name: str) -> None:
    """_inner_terms warps only the part its windows see; the terms are those of the whole image
    turned, at HASH_SIDE, at a small size, and at a strip's shape. OpenCV's warp rounds coordinates to
    1/32 pixel, from the moved origin a little differently: measured <= 6e-5 of the largest term."""
    grey = _grey(skimage_photo(name))
    for part in (grey, grey[:97, :61], grey[:20, :]):
        ours, whole = _inner_terms(part), whole_image_turns(part)
        assert np.abs(ours - whole).max() <= 1e-3 * np.abs(whole).max(), part.shape


def framed(image: Image.Image, bars: tuple[float, float, float, float], fill: str) -> Image.Image:
    """`image` on a larger canvas of `fill`, with bars of these fractions of its width or height
    (left, top, right, bottom), as a page lays a picture out in a frame of another shape."""
    left, top, right, bottom = (round(f * side) for f, side in zip(bars, image.size * 2))
    canvas = Image.new("RGB", (image.width + left + right, image.height + top + bottom), fill)
    canvas.paste(image, (left, top))
    return canvas


@pytest.mark.parametrize("name", ["astronaut", "coffee", "t1.jpg"])
@pytest.mark.parametrize("fill", ["black", "white"])
@pytest.mark.parametrize("bars", [(0, 0.08, 0, 0.08), (0, 0.2, 0, 0.2), (0.12, 0, 0.12, 0)],
                         ids=["letterbox-8%", "letterbox-20%", "pillarbox-12%"])
def test_a_copy_in_letterbox_bars_hashes_as_its_original(name: str, fill: str, bars: tuple[float, ...]) -> None:
    """Bars around a copy move its whole-image pHash by 10-30 bits; without them it is the
    original's to within what JPEG and resizing move (stored as the builder stores both)."""
    original = skimage_photo(name)
    copy = framed(original, bars, fill)
    own, copied = decode(encode(np.asarray(original), quality=95)), decode(encode(np.asarray(copy), quality=75))
    assert hamming(copied.phash, own.phash) <= 3, (hamming(copied.phash, own.phash), phash(copy))
    assert hamming(phash(copy), own.phash) > 6  # what the bars alone do: the copy's pHash as it is


@pytest.mark.parametrize("bars", [(0, 0.1, 0, 0), (0, 0.01, 0, 0.01), (0, 0.05, 0, 0.15), (0.6, 0, 0.6, 0)],
                         ids=["one-side", "under-2%", "unequal", "over-25%"])
@pytest.mark.parametrize("name", ["astronaut", "t1.jpg"])
def test_edges_that_are_no_letterbox_are_hashed_as_they_are(name: str, bars: tuple[float, ...]) -> None:
    """Only two opposite bars of about equal size, 2-25 % of the side each, are cut off: a bar on
    one side (a caption strip, a banner), thin or unequal ones are part of the picture."""
    grey = _grey(framed(skimage_photo(name), bars, "black"))
    assert _without_bars(grey).shape == grey.shape


@pytest.mark.parametrize("name", ["retina", "moon", "hubble_deep_field", "page", "text", "clock"])
def test_photos_with_dark_or_light_edges_of_their_own_are_not_cut(name: str) -> None:
    grey = _grey(skimage_photo(name))
    assert _without_bars(grey).shape == grey.shape


@pytest.mark.parametrize("fill", ["white", "black"])
@pytest.mark.parametrize("name", ["astronaut", "coffee", "t1.jpg"])
def test_a_picture_on_a_margin_cut_a_little_stays_near_its_crop_hashes(name: str, fill: str) -> None:
    """A product shot on white, cut by 2 % at the top: its margins are no longer equal, so they stay
    in its pHash, and the original's crop hashes (of the whole image, margins and all) are near it."""
    original = framed(skimage_photo(name), (0, 0.08, 0, 0.08), fill)
    width, height = original.size
    own = decode(encode(np.asarray(original), quality=95))
    cut = decode(encode(np.asarray(original.crop((0, round(0.02 * height), width, height))), quality=85))
    assert min(hamming(cut.phash, h) for h in [own.phash, *own.phash_crops]) <= 2
    assert hamming(cut.phash, own.phash) > 6  # its own pHash, without the margins, is far


@pytest.mark.parametrize("shape", [(1, 1), (1, 60), (60, 1), (3, 3), (40, 700)])
@pytest.mark.parametrize("level", [0, 255])
def test_an_image_all_black_or_all_white_is_not_cut_and_still_hashes(shape: tuple[int, int], level: int) -> None:
    grey = np.full(shape, float(level))
    assert _without_bars(grey).shape == shape  # every line a bar up to MAX_BAR: the picture itself
    assert len(phashes(Image.fromarray(np.full((*shape, 3), level, np.uint8)))) == HASHES


def whole_image_distance(a: list[str], b: list[str]) -> int:
    """As near_dedupe compares the whole-image hashes: one's pHash against the other's 16, either way."""
    crops = len(CROPS)
    return min(min(hamming(a[0], h) for h in b[:crops]), min(hamming(b[0], h) for h in a[:crops]))


def inner_distance(a: list[str], b: list[str]) -> int:
    """As near_dedupe compares the inner parts: one's as it is against the other's as it is or turned."""
    crops = len(CROPS)
    return min(min(hamming(a[crops], h) for h in b[crops:]), min(hamming(b[crops], h) for h in a[crops:]))


@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket", "brick", "page", "mask_white.jpg"])
@pytest.mark.parametrize("bar", [0.08, 0.14])
def test_a_caption_bar_escapes_the_whole_image_hashes_not_the_inner_part(name: str, bar: float) -> None:
    """A caption over the bottom 8-14 % moves the pHash and every crop hash past k = 6; the inner
    part, which stops 16 % above the bottom, stays where it was."""
    original, copy = phashes(skimage_photo(name)), phashes(captioned(skimage_photo(name), bar))
    assert whole_image_distance(copy, original) > BuildConfig().near_duplicate_distance
    assert inner_distance(copy, original) <= INNER_DISTANCE


@pytest.mark.parametrize("name", ["astronaut", "camera", "coffee", "chelsea", "retina", "t1.jpg"])
def test_a_copy_turned_up_to_5_degrees_is_near_a_turned_inner_hash(name: str) -> None:
    """Turned either way, between the angles of TURNS too, its corners filled black or white: the
    inner part is within INNER_DISTANCE of one of the original's (the whole-image hashes of such
    copies are 0-14 bits away; bench.dedupe_quality's turn family)."""
    photo = skimage_photo(name)
    original = phashes(photo)
    for angle in (-5, -4, -2, -1, 1.5, 2.5, 3.5, 5):
        for fill in ("black", "white"):
            copy = phashes(photo.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=fill))
            assert inner_distance(copy, original) <= INNER_DISTANCE, (angle, fill)


def test_inner_parts_of_distinct_photos_are_far_apart() -> None:
    """The inner hashes of ten different photos, as they are and turned, are nowhere near each other:
    what keeps INNER_DISTANCE from merging distinct images (bench.dedupe_quality counts them)."""
    hashes = [phashes(skimage_photo(name)) for name in (*PHOTOS, "t1.jpg", "mask_white.jpg")]
    closest = min(inner_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:])
    assert closest > 3 * INNER_DISTANCE


@pytest.mark.parametrize("size", [(400, 400), (640, 480)])
def test_an_inner_part_without_detail_gets_no_inner_hashes(size: tuple[int, int]) -> None:
    """A flat inner part's DCT terms are rounding noise, the same for every such picture whatever
    its border holds: two different pictures on one flat ground would match at 0 bits. Its inner
    hashes are 0 (no pHash is: it sets 32 bits), which near_buckets leaves out."""
    ground = Image.new("RGB", size, (30, 30, 30))
    framed = [captioned(ground, 0.12), ImageOps.mirror(captioned(ground.rotate(180), 0.14))]
    for picture in framed:
        sample = decode(encode(np.asarray(picture), quality=85))
        assert sample.phash_inner == ["0" * 16] * len(TURNS)
        assert all(int(h, 16).bit_count() == 32 for h in [sample.phash, *sample.phash_crops])
    assert all(int(h, 16) for h in phashes(skimage_photo("coffee"))[len(CROPS):])
