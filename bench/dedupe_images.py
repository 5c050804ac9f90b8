"""The photos of bench.dedupe_quality and the near-copies it makes of them; no downloads: the
photos are the ones installed packages ship (scikit-image's data, insightface's test images)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

TILE = 128
MIN_TILE_STD = 10.0
KINDS = ("jpeg", "resize", "crop", "brightness_contrast", "resize+jpeg", "all", "mirror", "mirror+resize+jpeg",
         # copies as the web makes them (issue 14): bigger crops, frames, turns, captions, recompression
         "crop10", "crop15", "letterbox", "rotate", "grey", "text", "recompress3", "crop10+text+recompress3",
         "letterbox+grey+recompress3")
WEB_CROPS = {"crop10": (0.03, 0.10), "crop15": (0.10, 0.15)}  # per cut side, on one to four sides
RESAMPLERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS, Image.Resampling.BOX)

# scikit-image's real photographs (cat() is chelsea(); stereo_motorcycle's right view is the left
# one shifted, so only the left one is used; colorwheel, logo, horse, checkerboard... are drawings)
SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "page", "moon", "coins", "brick", "grass", "gravel", "clock", "cell", "text",
                  "microaneurysms", "motorcycle")
INSIGHTFACE_PHOTOS = ("t1.jpg", "Tom_Hanks_54745.png", "mask_black.jpg", "mask_blue.jpg", "mask_green.jpg",
                      "mask_white.jpg")


def load_photos() -> dict[str, Image.Image]:
    import insightface
    import skimage.data as data
    photos = {}
    for name in SKIMAGE_PHOTOS:
        array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        photos[name] = Image.fromarray(array).convert("RGB")
    folder = Path(insightface.__file__).parent / "data" / "images"
    for name in INSIGHTFACE_PHOTOS:
        with Image.open(folder / name) as image:
            photos[name.rsplit(".", 1)[0]] = ImageOps.exif_transpose(image).convert("RGB")
    return photos


def load_lfw() -> dict[str, Image.Image]:
    import skimage.data as data
    faces = data.lfw_subset()
    return {f"lfw_{'face' if i < 100 else 'background'}_{i:03d}":
            Image.fromarray(np.round(a * 255).astype(np.uint8)).convert("RGB") for i, a in enumerate(faces)}


def cut_tiles(photos: dict[str, Image.Image]) -> tuple[dict[str, Image.Image], int]:
    tiles, flat = {}, 0
    for name, image in photos.items():
        width, height = image.size
        if min(width, height) < 2 * TILE:
            continue
        for y in range(0, height - TILE + 1, TILE):
            for x in range(0, width - TILE + 1, TILE):
                tile = image.crop((x, y, x + TILE, y + TILE))
                if np.asarray(tile.convert("L"), dtype=np.float32).std() < MIN_TILE_STD:
                    flat += 1
                    continue
                tiles[f"{name}@{x},{y}"] = tile
    return tiles, flat


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def transform(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[bytes, dict]:
    """A near-copy of `image` as JPEG bytes, and the parameters drawn."""
    params: dict = {}
    parts = {"all": ("crop", "brightness_contrast", "resize", "jpeg")}.get(kind, kind.split("+"))
    if "mirror" in parts:
        image = ImageOps.mirror(image)
    if "crop" in parts:
        width, height = image.size
        left, top, right, bottom = rng.uniform(0, 0.025, 4)
        box = (round(left * width), round(top * height), width - round(right * width), height - round(bottom * height))
        image = image.crop(box)
        params["crop_x"], params["crop_y"] = float(left + right), float(top + bottom)
    if "brightness_contrast" in parts:
        params["brightness"], params["contrast"] = (float(v) for v in rng.uniform(0.9, 1.1, 2))
        image = ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(params["brightness"])).enhance(
            params["contrast"])
    if "resize" in parts:
        params["scale"] = scale = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        resample = RESAMPLERS[rng.integers(len(RESAMPLERS))]
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    image = web_transform(image, parts, rng, params)
    params["quality"] = int(rng.integers(40, 96)) if "jpeg" in parts else params.get("quality", 95)
    return jpeg(image, params["quality"]), params


def caption_height(height: int, share: float) -> int:
    return max(8, round(height * share))


def captioned(image: Image.Image, share: float) -> Image.Image:
    """`image` with a black caption bar, white text on it, over the bottom `share` of its height."""
    image, bar_height = image.copy(), caption_height(image.height, share)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, image.height - bar_height, image.width, image.height), fill="black")
    draw.text((bar_height // 3, image.height - bar_height * 0.8), "www.example.com | photo of the day",
              fill="white", font_size=max(6, bar_height // 2))
    return image


def web_transform(image: Image.Image, parts: tuple[str, ...] | list[str], rng: np.random.Generator,
                  params: dict) -> Image.Image:
    """The web-like kinds: crops of 3-15 % on one to four sides, letterbox bars, a turn of 1-5
    degrees with filled corners, greyscale, a caption bar with text, three JPEG rounds."""
    for kind, (low, high) in WEB_CROPS.items():
        if kind in parts:
            width, height = image.size
            cuts = np.zeros(4)
            sides = rng.choice(4, size=int(rng.integers(1, 5)), replace=False)
            cuts[sides] = rng.uniform(low, high, len(sides))
            left, top, right, bottom = cuts
            image = image.crop((round(left * width), round(top * height), width - round(right * width),
                                height - round(bottom * height)))
            params["sides_cut"], params["largest_cut"] = len(sides), float(cuts.max())
    fill = ("black", "white")[int(rng.integers(2))]
    if "letterbox" in parts:  # bars on two opposite sides, 5-20 % of the other dimension each
        width, height = image.size
        bar = rng.uniform(0.05, 0.20)
        wide = bool(rng.integers(2))
        size = (width, round(height * (1 + 2 * bar))) if wide else (round(width * (1 + 2 * bar)), height)
        framed = Image.new("RGB", size, fill)
        framed.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
        image, params["bar"] = framed, float(bar)
    if "rotate" in parts:
        params["angle"] = angle = float(rng.uniform(1, 5) * rng.choice([-1, 1]))
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=fill)
    if "grey" in parts:
        image = image.convert("L").convert("RGB")
    if "text" in parts:  # a caption bar across the bottom, 8-14 % of the height
        share = rng.uniform(0.08, 0.14)
        image = captioned(image, share)
        params["caption_bar"] = caption_height(image.height, share) / image.height
    if "recompress3" in parts:  # two rounds here, the third when the copy is saved
        qualities = [int(q) for q in rng.integers(60, 91, 3)]
        for quality in qualities[:2]:
            image = Image.open(io.BytesIO(jpeg(image, quality))).convert("RGB")
        params["quality"] = qualities[2]
    return image
