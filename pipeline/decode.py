"""Stage 3, decode: check, orient and (re-)encode each downloaded image.

Hand-written on PIL because img2dataset's Resizer decodes before it checks the size (no
header-first decompression-bomb guard) and ignores EXIF orientation. What is stored is
always an upright RGB JPEG: the downloaded bytes themselves when they already are one and
fit `image_max_side`, else a re-encoding.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math

import cv2
import numpy as np
from PIL import Image

from pipeline.build_config import BuildConfig
from pipeline.schema import Sample

EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # the ones that swap width and height
# EXIF orientation -> the transpose that shows the image upright, as ImageOps.exif_transpose maps them;
# not that function itself: it re-serialises the EXIF block, which raises on corrupt tags (common
# on the web) though the pixels are fine, and the stored JPEG carries no EXIF anyway
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
HASH_SIDE = 256  # pHash looks at 32 x 32 pixels: decoding a kept original at >= 256 px is enough
CROP_SIDE = 0.02  # the crop hashes cut 2% off a side
# (left, top, right, bottom) cut or not: the whole image first, then its 15 crops
CROPS = tuple(tuple((mask >> side) & 1 for side in range(4)) for mask in range(16))
# The inner part, (left, top, right, bottom) cut: where web copies put a caption or a watermark
# (the bottom) and the corners a turn fills stay outside it. Hashed as it is and as if turned by
# each of TURNS' other angles (degrees), so that a copy turned a few degrees is near one of them.
INNER = (0.10, 0.10, 0.10, 0.16)
TURNS = (0.0, -4.8, -3.6, -2.4, -1.2, 1.2, 2.4, 3.6, 4.8)
FLAT_INNER = 2  # grey levels: an inner part within this of flat has no inner hashes (all 0)
INNER_SIDE = 128  # the inner part is turned at about this size (turned copies caught: 64 px 0.92, 128 0.995)
HASHES = len(CROPS) + len(TURNS)  # what phashes returns: own, 15 crops, inner part as it is and turned


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency flattened onto white (as img2dataset does), and 16-bit greyscale
    scaled to 8 bits (PIL's convert clips its values at 255, which turns most of an image white)."""
    if image.mode.startswith("I"):  # I;16 variants and I (32-bit), as 16-bit PNGs and TIFFs open
        values = np.asarray(image, dtype=np.int64)
        if values.max(initial=0) > 255:
            values = np.clip(values, 0, 65535) >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


LOW_DCT = 2 * np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)  # scipy's DCT-II, 8 terms


def _lanczos(start: float, stop: float, size: int) -> np.ndarray:
    """(32, size): PIL's Lanczos (a = 3) resampling to 32 values of the pixels of a row whose
    centres lie in [start, stop), as if those pixels had been cut out first (the kernel stops at
    the cut, as it does at the edge of a cropped copy, rather than reaching past it)."""
    scale = (stop - start) / 32
    stretch = max(scale, 1.0)  # downscaling widens the kernel: it averages, as PIL does
    centres = start + (np.arange(32) + 0.5) * scale
    # each value's kernel spans 6 x stretch pixels: only that band is computed (sinc over the whole
    # row was 5 x the work, and a build meets each new image size once per worker, ~1 ms a size)
    first = np.clip(np.floor(centres - 3 * stretch - 0.5).astype(int), 0, size)
    band = min(size, int(np.ceil(6 * stretch)) + 2)
    first = np.minimum(first, size - band)
    pixels = first[:, None] + np.arange(band)[None, :]
    x = (pixels + 0.5 - centres[:, None]) / stretch
    inside = (np.abs(x) < 3) & (pixels + 0.5 >= start) & (pixels + 0.5 < stop)
    band_weights = np.where(inside, np.sinc(x) * np.sinc(x / 3), 0.0)
    weights = np.zeros((32, size))
    np.put_along_axis(weights, pixels, band_weights, axis=1)
    return weights / weights.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=1024)  # images come in few sizes; the windows cost ~4 x the product
def _crop_terms(size: int) -> np.ndarray:
    """(32, size): the 8 lowest DCT terms of the whole row, cut at the start, at the end, at both;
    in float32, as _grey is (a third faster than float64, and the hashes' medians are not that close)."""
    cut = CROP_SIDE * size
    return np.concatenate([LOW_DCT @ _lanczos(start * cut, size - end * cut, size)
                           for start, end in ((0, 0), (1, 0), (0, 1), (1, 1))]).astype(np.float32)


BAR_LEVEL = 24  # a bar's pixels are all within this of black (or of white): JPEG's ringing included
MIN_BAR, MAX_BAR = 0.02, 0.25  # of a side, each of two opposite bars; web letterboxes add 5-20 %
BAR_MISMATCH = 0.01  # of a side: letterbox bars are centred, so opposite ones match within this


def _bar(lines: np.ndarray) -> int:
    """How many of `lines` (rows from an edge inwards) are all black, or all white, from the first."""
    if not len(lines):
        return 0
    if lines[0].max() <= BAR_LEVEL:
        flat = lines.max(axis=1) <= BAR_LEVEL
    elif lines[0].min() >= 255 - BAR_LEVEL:
        flat = lines.min(axis=1) >= 255 - BAR_LEVEL
    else:  # most photos: their edge is no bar
        return 0
    return int(flat.size if flat.all() else flat.argmin())


def _without_bars(grey: np.ndarray) -> np.ndarray:
    """The image without letterbox (or pillarbox) bars: two opposite black or white bars of about
    equal size, each 2-25 % of the side. Edges of any other shape stay, so that nothing but such
    bars moves where a hash starts (measured: a looser rule, any flat rows at any edge, lost recall
    on photos with flat edges of their own, bench.dedupe_quality's clock and cell)."""
    for axis in (0, 1):
        lines = grey if axis == 0 else grey.T
        size, most = lines.shape[0], int(lines.shape[0] * MAX_BAR)
        first, last = _bar(lines[:most]), _bar(lines[::-1][:most])
        if (MIN_BAR * size <= min(first, last) and max(first, last) < most  # a run to MAX_BAR: the picture's own
                and abs(first - last) <= max(2, BAR_MISMATCH * size)):
            grey = grey[first:size - last] if axis == 0 else grey[:, first:size - last]
    return grey


def _grey(image: Image.Image) -> np.ndarray:
    """The image in grey levels, a big one box-reduced to about HASH_SIDE first."""
    factor = max(image.size) // HASH_SIDE
    return np.asarray(image.convert("L").reduce(max(factor, 1)), dtype=np.float32)


def _whole_terms(grey: np.ndarray) -> np.ndarray:
    """The 8 x 8 lowest DCT terms of the whole image (the first 8 rows of _crop_terms: no cut)."""
    return (_crop_terms(grey.shape[0])[:8] @ grey @ _crop_terms(grey.shape[1])[:8].T).ravel()


@functools.lru_cache(maxsize=1024)
def _inner_window(size: int, start: float, end: float) -> np.ndarray:
    """(8, size): the 8 lowest DCT terms of a row's part that starts and ends these fractions in, in
    float32 as the warped image is (float64 made each product convert the image: 14 % of _inner_terms' time)."""
    return (LOW_DCT @ _lanczos(start * size, size - end * size, size)).astype(np.float32)


def _inner_terms(grey: np.ndarray) -> np.ndarray:
    """(len(TURNS), 64): the 8 x 8 lowest DCT terms of the INNER part of `grey` as it is and turned
    about its centre by each angle (OpenCV's warp, then the part's windows as _crop_terms takes a
    crop's: a turn is not separable into row and column windows, as a crop is)."""
    height, width = grey.shape
    scale = INNER_SIDE / max(height, width)
    if scale < 1:  # ~4 x fewer pixels to warp: half the cost of the inner hashes at 256 px
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
        grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)
    left, top, right, bottom = INNER
    first_row, end_row = _window_span(height, top, bottom)
    first_column, end_column = _window_span(width, left, right)
    part = grey[first_row:end_row, first_column:end_column]  # the pixels the part's windows see
    if not part.size or np.ptp(part) <= FLAT_INNER:  # its terms would be rounding noise, the same for any such image
        return np.zeros((len(TURNS), 64))  # hashed as 0, which near_buckets leaves out (a pHash has 32 bits set)
    rows = _inner_window(height, top, bottom)[:, first_row:end_row]
    columns = _inner_window(width, left, right)[:, first_column:end_column]
    centre = (width / 2 - 0.5, height / 2 - 0.5)
    terms = []
    for angle in TURNS:
        # only the part is warped (41 % fewer pixels than the whole): the turn's matrix moved by its corner
        turn = cv2.getRotationMatrix2D(centre, angle, 1.0) - [[0, 0, first_column], [0, 0, first_row]]
        turned = part if angle == 0 else cv2.warpAffine(grey, turn, part.shape[::-1], flags=cv2.INTER_LINEAR,
                                                        borderMode=cv2.BORDER_REPLICATE)
        terms.append((rows @ turned @ columns.T).ravel())
    return np.stack(terms)


def _window_span(size: int, start: float, end: float) -> tuple[int, int]:
    """[first, stop) of the pixels whose centres lie in a row's part that starts and ends these
    fractions in: where _inner_window is not zero."""
    return max(0, math.ceil(start * size - 0.5)), min(size, math.ceil(size - end * size - 0.5))


def _hex(low: np.ndarray) -> list[str]:
    """Per row of 64 DCT terms, its pHash: the terms above their median, as 16 hex digits."""
    bits = low > np.median(low, axis=1, keepdims=True)
    return [bytes(row).hex() for row in np.packbits(bits, axis=1)]


def phashes(image: Image.Image) -> list[str]:
    """64-bit perceptual hashes, 16 hex digits each (HASHES of them): the image's own pHash, then
    those of its 15 crops that cut CROP_SIDE off one to four sides, then its INNER part's as it is
    and as if turned by each of TURNS' other angles.

    A cropped copy of an image lies within a few bits of one of its crop hashes while its own
    pHash can be 16+ bits away, so near_dedupe compares a pHash with the other image's 16.
    pHash as imagehash.phash defines it (greyscale, Lanczos resampling to 32 x 32, DCT-II, the
    8 x 8 lowest terms above their median), computed by hand because the 16 hashes then cost one
    matrix product: resampling and DCT are linear, so each crop's 8 x 8 terms are
    (DCT rows x vertical window) @ image @ (DCT rows x horizontal window)^T, and the 4 vertical and
    4 horizontal windows combine into all 16 crops. Unlike imagehash, the 32 x 32 image is not
    rounded to bytes first, so a hash can differ from imagehash's by a few bits (0-2 on most
    photos, up to 4 on textures). A big image is first box-reduced to about HASH_SIDE, which moves
    the hash by about as much.

    The image's own pHash is of it without its letterbox bars (_without_bars), so that a copy framed
    by them hashes as its original does; its crop hashes stay those of the whole image, so that a
    copy whose bars a crop made unequal (a product shot on white, cut a little) is still near one.

    The inner part's hashes (of the image without its bars too) are compared only with each other's
    (near_buckets): a copy with a caption bar over its bottom, or turned a few degrees with filled
    corners, moves its own pHash and every crop's by 10-20 bits, but not its inner part's.
    """
    grey = _grey(image)
    terms = (_crop_terms(grey.shape[0]) @ grey @ _crop_terms(grey.shape[1]).T).reshape(4, 8, 4, 8)
    low = np.stack([terms[top + 2 * bottom, :, left + 2 * right, :]
                    for left, top, right, bottom in CROPS]).reshape(len(CROPS), 64)
    content = _without_bars(grey)
    if content.shape != grey.shape:
        low[0] = _whole_terms(content)
    return _hex(np.concatenate([low, _inner_terms(content)]))


def phash(image: Image.Image) -> str:
    """One pHash of the whole image, as it is (no bars cut, no crops): for pictures whose edges are
    their own, such as an aligned face."""
    return _hex(_whole_terms(_grey(image))[None])[0]


def _shrink(image: Image.Image, max_side: int) -> Image.Image:
    """The longer side brought down to max_side by OpenCV's area filter, as img2dataset resizes:
    2.4-2.7 x faster than PIL's Lanczos here (no SIMD in PIL's resize), and as free of aliasing."""
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return Image.fromarray(cv2.resize(np.asarray(image), size, interpolation=cv2.INTER_AREA))


def decode_image(data: bytes, config: BuildConfig) -> tuple[bytes, int, int, int, int, list[str]]:
    """(stored JPEG bytes, width, height, original width, original height, phashes). Raises ValueError."""
    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        width, height = image.size
        if width * height > config.max_image_pixels:
            raise OverflowError(f"{width}x{height} pixels exceeds max_image_pixels {config.max_image_pixels}")
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        if orientation in ROTATED_ORIENTATIONS:
            width, height = height, width
        max_side = config.image_max_side
        shrink = bool(max_side) and max(width, height) > max_side
        canonical = image.format == "JPEG" and image.mode == "RGB" and orientation == 1 and not shrink
        scale = min(1.0, (max_side if shrink else HASH_SIDE) / max(width, height))
        if image.format == "JPEG" and (shrink or canonical):
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale, far faster. A kept original is only checked
            # (every byte is still read, so truncation shows) and hashed, for which HASH_SIDE is
            # plenty, and grey, which skips the colour planes (0.78 -> 0.55 ms a web JPEG).
            image.draft("L" if canonical else "RGB",
                        (int(image.size[0] * scale) + 1, int(image.size[1] * scale) + 1))
        image.load()  # a truncated or corrupt file fails here
        if canonical:
            return data, width, height, width, height, phashes(image)
        image = _to_rgb(image.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else image)
        if shrink:
            image = _shrink(image, max_side)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=config.jpeg_quality)
        return out.getvalue(), image.width, image.height, width, height, phashes(image)


def decode_sample(sample: Sample, config: BuildConfig) -> None:
    """A downloaded sample's stored image, sizes and hashes; or its failure status."""
    if not sample.pending:
        return
    try:
        stored, sample.width, sample.height, sample.original_width, sample.original_height, hashes = \
            decode_image(sample.content, config)
    except OverflowError as err:
        sample.fail("image_too_large", str(err))
        return
    except Image.DecompressionBombError:  # PIL refuses past twice its own limit, before our check
        sample.fail("image_too_large", f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels: PIL's bomb guard")
        return
    except Image.UnidentifiedImageError:
        sample.fail("decode_error", "not a recognised image format")
        return
    except Exception as err:  # PIL raises many types for a corrupt file (struct.error, TypeError from bad EXIF, ...)
        sample.fail("decode_error", f"{type(err).__name__}: {err}"[:300])
        return
    sample.content, sample.phash = stored, hashes[0]
    sample.phash_crops, sample.phash_inner = hashes[1:len(CROPS)], hashes[len(CROPS):]
    sample.sha256 = hashlib.sha256(stored).hexdigest()
