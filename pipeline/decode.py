"""Stage 3, decode: check, orient and (re-)encode each downloaded image.

Hand-written on PIL because img2dataset's Resizer decodes before it checks the size (no
header-first decompression-bomb guard) and ignores EXIF orientation. What is stored is
always an upright RGB JPEG: the downloaded bytes themselves when they already are one and
fit `image_max_side`, else a re-encoding.
"""

from __future__ import annotations

import hashlib
import io

import imagehash

from PIL import Image, ImageOps

from pipeline.build_config import BuildConfig
from pipeline.schema import Sample

EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # the ones that swap width and height
HASH_SIDE = 256  # pHash looks at 32 x 32 pixels: decoding a kept original at >= 256 px is enough


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency flattened onto white (as img2dataset does)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def phash_hex(image: Image.Image) -> str:
    """64-bit perceptual hash as 16 hex digits (imagehash's own string form).

    pHash looks at 32 x 32 pixels; a big image is first reduced by box averaging to about
    HASH_SIDE, which costs a third of resizing it whole and moves the hash by at most 2 bits.
    """
    factor = max(image.size) // HASH_SIDE
    return str(imagehash.phash(image.reduce(factor) if factor > 1 else image))


def decode_image(data: bytes, config: BuildConfig) -> tuple[bytes, int, int, int, int, str]:
    """(stored JPEG bytes, width, height, original width, original height, phash). Raises ValueError."""
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
        scale = (max_side if shrink else HASH_SIDE) / max(width, height)
        if image.format == "JPEG" and (shrink or canonical) and scale < 1:
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale, far faster. A kept original is only checked
            # (every byte is still read, so truncation shows) and hashed, for which HASH_SIDE is plenty.
            image.draft("RGB", (int(image.size[0] * scale) + 1, int(image.size[1] * scale) + 1))
        image.load()  # a truncated or corrupt file fails here
        if canonical:
            return data, width, height, width, height, phash_hex(image)
        image = _to_rgb(ImageOps.exif_transpose(image))
        if shrink:
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=config.jpeg_quality)
        return out.getvalue(), image.width, image.height, width, height, phash_hex(image)


def decode_samples(samples: list[Sample], config: BuildConfig) -> list[Sample]:
    for sample in samples:
        if not sample.pending:
            continue
        try:
            stored, sample.width, sample.height, sample.original_width, sample.original_height, sample.phash = \
                decode_image(sample.content, config)
        except OverflowError as err:
            sample.fail("image_too_large", str(err))
            continue
        except Image.DecompressionBombError:  # PIL refuses past twice its own limit, before our check
            sample.fail("image_too_large", f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels: PIL's bomb guard")
            continue
        except Image.UnidentifiedImageError:
            sample.fail("decode_error", "not a recognised image format")
            continue
        except (OSError, ValueError, SyntaxError) as err:
            sample.fail("decode_error", f"{type(err).__name__}: {err}"[:300])
            continue
        sample.content = stored
        sample.sha256 = hashlib.sha256(stored).hexdigest()
    return samples
