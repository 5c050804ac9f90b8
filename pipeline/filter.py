"""Stage 5, filter: keep an image when at least one face passes the score and size thresholds.

Defaults (BuildConfig): score >= 0.9 and a box whose shorter side is >= 32 original pixels.
LAION-Face never published its thresholds; 0.9 is RetinaFace's customary cut and 32 px is
about the smallest face that still shows eyes and mouth once a crop is resized for training.
Only passing faces are kept in the metadata.
"""

from __future__ import annotations

from pipeline.build_config import BuildConfig
from pipeline.schema import Face, Sample


def face_side(face: Face) -> float:
    x1, y1, x2, y2 = face.box
    return min(x2 - x1, y2 - y1)


def filter_samples(samples: list[Sample], config: BuildConfig) -> list[Sample]:
    for sample in samples:
        if not sample.pending:
            continue
        found = sample.faces
        sample.faces = [f for f in found if f.score >= config.min_face_score and face_side(f) >= config.min_face_size]
        if sample.faces:
            continue
        if not found:
            sample.fail("no_face", "the detector found no face", keep_content=True)
        else:
            best = max(found, key=lambda f: f.score)
            biggest = max(found, key=face_side)
            sample.fail("face_rejected", f"{len(found)} faces, none passing: best score {best.score:.2f} "
                                         f"(min {config.min_face_score}), largest side {face_side(biggest):.0f}px "
                                         f"(min {config.min_face_size})", keep_content=True)
    return samples
