"""Aligned-face pHashes: a face warped by its five landmarks onto ArcFace's template and pHashed.
Crops, bars, greyscale, recompression and small turns around a face leave it where the template
puts it, so copies that the whole-image pHashes miss keep their face hash (docs/PERFORMANCE.md,
'Near-copies as the web makes them'); --exclude-images compares it (pipeline.face_overlaps).

A detector's landmarks move by a few pixels between copies of one photo, which alone moves the hash
by 10+ bits. So before hashing, the landmarks are looked at again (FaceHasher.refined): in a crop
already aligned by them (upright, the face at one scale whatever the photo's size) and in its
mirror, averaged, twice. A reference image is also hashed with its alignment moved a little
(JITTERS), as a copy's refined landmarks still wander by a pixel or two.

Each face is hashed in three VIEWS, since no one alignment survives every copy (measured per view
by bench.face_hash_quality): aligned by the refined landmarks (what crops, bars and turns leave in
place); aligned by the detector's own, which a bar over the face does not move while it pulls the
zoomed-in second looks; and the upper part of the latter, down to halfway between the nose tip
and the mouth, which a caption bar, a mask or a hand over the mouth leaves as it was.

Each alignment also gets a check hash (check_hash): 64 bits say too little to tell people apart
among thousands of faces, so a pHash match is only a candidate until the longer hash agrees.
"""

from __future__ import annotations

import functools
import io

import cv2
import numpy as np
from PIL import Image
from scipy.fft import dctn

from pipeline.decode import phash
from pipeline.detect import RetinaFaceDetector
from pipeline.schema import Sample

FACE_SIDE = 64  # pHash looks at 32 x 32 pixels; a 64-px face keeps eyes, nose and mouth apart
# ArcFace's five landmarks in its 112 x 112 crop (eyes, nose tip, mouth corners), at FACE_SIDE
ARCFACE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                    [70.7299, 92.2041]], np.float32) * (FACE_SIDE / 112)
JITTER_PX = 2.0
# (dx, dy in JITTER_PX, scale) of a reference's alignment: where a copy's landmarks still wander
JITTERS = ((0.0, 0.0, 1.0), (-1.0, 0.0, 1.0), (1.0, 0.0, 1.0), (0.0, -1.0, 1.0), (0.0, 1.0, 1.0), (0.0, 0.0, 0.94),
           (0.0, 0.0, 1.06))
# A pHash match counts only when the check hashes (CHECK_TERMS x CHECK_TERMS DCT terms, 144 bits) of
# the same two alignments are within CHECK_DISTANCE too: on the pHash alone 1-3 of ~6,300 pairs of
# distinct LFW faces come within 6 bits, with the check none; copies up to 10 % crops stay within it
# (bench.face_hash_quality).
CHECK_TERMS, CHECK_DISTANCE = 12, 24
REFINE_SIDE = 192  # the second look's crop; the face (ArcFace's 112-px crop) fills 1 / REFINE_CONTEXT of it
REFINE_CONTEXT = 1.5  # measured: 2 and 3 let the background move the landmarks (bench.face_hash_quality)
REFINE_ROUNDS = 2
MIRRORED = [1, 0, 2, 4, 3]  # landmarks of a mirrored face: left and right eyes and mouth corners swap
VIEWS = ("aligned", "as found", "upper part as found")
UPPER_ROWS = int((ARCFACE[2, 1] + ARCFACE[3:, 1].mean()) / 2)  # 46 of FACE_SIDE: halfway from nose tip to mouth


def _similarity(points: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    matrix, _ = cv2.estimateAffinePartial2D(points.astype(np.float32), target.astype(np.float32), method=cv2.LMEDS)
    return matrix


def _aligned(rgb: np.ndarray, points: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """The FACE_SIDE-pixel face with `points` moved onto `target`; None where they are all on one point."""
    matrix = _similarity(points, target)
    if matrix is None:
        return None
    return cv2.warpAffine(rgb, matrix, (FACE_SIDE, FACE_SIDE), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


class FaceHasher:
    """Face hashes of images, its second looks taken by `detector`: RetinaFace at REFINE_SIDE,
    whichever detector found the faces first."""

    def __init__(self, detector: RetinaFaceDetector):
        self.detector = detector
        self.template = ARCFACE * (REFINE_SIDE / REFINE_CONTEXT / FACE_SIDE) + REFINE_SIDE * (1 - 1 / REFINE_CONTEXT) / 2

    def refined(self, rgb: np.ndarray, landmarks: list[list[float]]) -> np.ndarray:
        """The landmarks as the second looks see them; the first ones where a look finds no face."""
        points = np.asarray(landmarks, np.float32)
        for _ in range(REFINE_ROUNDS):
            matrix = _similarity(points, self.template)
            if matrix is None:  # every landmark on one point: nothing to align
                return points
            crop = cv2.warpAffine(rgb, matrix, (REFINE_SIDE, REFINE_SIDE), flags=cv2.INTER_AREA,
                                  borderMode=cv2.BORDER_REPLICATE)
            seen = []
            for mirrored, faces in zip((False, True), self.detector([crop, np.ascontiguousarray(crop[:, ::-1])])):
                if faces:  # the face nearest the centre, where the alignment put it
                    face = min(faces, key=lambda f: np.hypot(f.box[0] + f.box[2] - REFINE_SIDE,
                                                             f.box[1] + f.box[3] - REFINE_SIDE))
                    found = np.array(face.landmarks, np.float32)
                    if mirrored:
                        found[:, 0] = REFINE_SIDE - found[:, 0]
                        found = found[MIRRORED]
                    seen.append(found)
            if not seen:
                return points
            inverse = cv2.invertAffineTransform(matrix)
            points = (np.mean(seen, axis=0) @ inverse[:, :2].T + inverse[:, 2]).astype(np.float32)
        return points

    def hashes(self, rgb: np.ndarray, landmarks: list[list[float]],
               jitters=JITTERS[:1]) -> list[list[tuple[str, str]]]:
        """For each of VIEWS, per alignment in `jitters`, its pHash (16 hex digits) and check hash
        (36); [] where the landmarks align nothing (all on one point)."""
        found = np.asarray(landmarks, np.float32)
        refined = self.refined(rgb, found)
        views: list[list[tuple[str, str]]] = [[] for _ in VIEWS]
        for dx, dy, scale in jitters:
            target = (ARCFACE - FACE_SIDE / 2) * scale + FACE_SIDE / 2 + np.array([dx, dy], np.float32) * JITTER_PX
            by_refined, by_found = _aligned(rgb, refined, target), _aligned(rgb, found, target)
            if by_refined is None or by_found is None:
                return []
            for view, pixels in zip(views, (by_refined, by_found, by_found[:UPPER_ROWS])):
                view.append((phash(Image.fromarray(pixels)), check_hash(pixels)))
        return views

    def hash_samples(self, samples: list[Sample]) -> list[Sample]:
        """Set `phashes` and `check_hashes` (one a view) on every face of every pending sample (the
        faces the filter kept), from its stored image (the landmarks are in original pixels)."""
        for sample in samples:
            if not sample.pending or not sample.faces:
                continue
            with Image.open(io.BytesIO(sample.content)) as image:
                rgb = np.asarray(image.convert("RGB"))
            sx, sy = sample.width / sample.original_width, sample.height / sample.original_height
            for face in sample.faces:
                views = self.hashes(rgb, [[x * sx, y * sy] for x, y in face.landmarks])
                face.phashes = [view[0][0] for view in views] or None
                face.check_hashes = [view[0][1] for view in views] or None
        return samples


def check_hash(pixels: np.ndarray) -> str:
    """A pHash with more terms: the CHECK_TERMS x CHECK_TERMS lowest DCT terms of the grey face
    above their median, as 36 hex digits."""
    grey = np.asarray(Image.fromarray(pixels).convert("L"), np.float64)
    terms = dctn(grey, norm="ortho")[:CHECK_TERMS, :CHECK_TERMS].ravel()
    return np.packbits(terms > np.median(terms)).tobytes().hex()


@functools.cache
def shared_face_hasher() -> FaceHasher:
    """One per process: Ray's workers keep their processes, so the RetinaFace session loads once each."""
    return FaceHasher(RetinaFaceDetector(REFINE_SIDE, use_gpu=False))
