"""The face filter (pipeline.filter): which samples pass, which faces are kept, and what a rejection says."""

from __future__ import annotations

import pytest

from pipeline.build_config import BuildConfig
from pipeline.filter import face_side, filter_samples
from pipeline.schema import Face, Sample

CONFIG = BuildConfig(min_face_score=0.9, min_face_size=32)


def face(score: float, width: float, height: float, x: float = 10.0, y: float = 20.0) -> Face:
    landmarks = [[x + width * fx, y + height * fy] for fx, fy in [(.3, .4), (.7, .4), (.5, .6), (.35, .8), (.65, .8)]]
    return Face(box=[x, y, x + width, y + height], landmarks=landmarks, score=score)


def sample(*faces: Face) -> Sample:
    return Sample(key="00000000000000", unit=0, input_file="in.parquet", input_row=0, url="https://x/a.jpg",
                  caption="c", content=b"jpeg", faces=list(faces))


def filtered(s: Sample, config: BuildConfig = CONFIG) -> Sample:
    [out] = filter_samples([s], config)
    return out


def test_face_side_is_the_shorter_box_side() -> None:
    assert face_side(face(1.0, 40, 90)) == 40
    assert face_side(face(1.0, 90, 33.5)) == 33.5


def test_face_passing_both_thresholds_keeps_the_sample_pending() -> None:
    out = filtered(sample(face(0.95, 40, 50)))
    assert out.pending and out.content == b"jpeg"
    assert len(out.faces) == 1


@pytest.mark.parametrize("score, side", [(0.9, 50), (0.95, 32)])
def test_thresholds_are_inclusive(score: float, side: float) -> None:
    assert filtered(sample(face(score, side, side + 10))).pending


@pytest.mark.parametrize("score, side", [(0.8999, 50), (0.95, 31.9)])
def test_just_below_a_threshold_is_rejected(score: float, side: float) -> None:
    assert filtered(sample(face(score, side, side + 10))).status == "face_rejected"


def test_no_face_at_all() -> None:
    out = filtered(sample())
    assert out.status == "no_face" and out.content == b"jpeg"  # kept for the report's reject thumbnails


def test_low_score_face_is_rejected_naming_the_best_score() -> None:
    out = filtered(sample(face(0.62, 100, 120), face(0.871, 80, 80)))
    assert out.status == "face_rejected" and out.content == b"jpeg"
    assert "best score 0.87" in out.reason and "(min 0.9)" in out.reason
    assert "2 faces" in out.reason


def test_small_face_is_rejected_naming_the_largest_side() -> None:
    out = filtered(sample(face(0.99, 20, 40), face(0.97, 31, 31)))
    assert out.status == "face_rejected"
    assert "largest side 31px" in out.reason and "(min 32)" in out.reason
    assert "best score 0.99" in out.reason


def test_reason_reports_best_score_and_largest_side_of_different_faces() -> None:
    out = filtered(sample(face(0.99, 10, 10), face(0.6, 200, 150)))  # confident but tiny, big but unsure
    assert out.status == "face_rejected"
    assert "best score 0.99" in out.reason and "largest side 150px" in out.reason


def test_only_passing_faces_are_kept_in_order() -> None:
    good_big, tiny, unsure, good_small = face(0.99, 80, 90), face(0.98, 12, 14), face(0.7, 90, 90), face(0.93, 40, 33)
    out = filtered(sample(good_big, tiny, unsure, good_small))
    assert out.pending
    assert out.faces == [good_big, good_small]


def test_thresholds_come_from_the_config() -> None:
    strict = BuildConfig(min_face_score=0.99, min_face_size=100)
    assert filtered(sample(face(0.98, 120, 120)), strict).status == "face_rejected"
    assert filtered(sample(face(0.995, 99, 120)), strict).status == "face_rejected"
    assert filtered(sample(face(0.995, 100, 120)), strict).pending
    lenient = BuildConfig(min_face_score=0.5, min_face_size=8)
    assert filtered(sample(face(0.6, 10, 10)), lenient).pending


def test_decided_samples_are_left_alone() -> None:
    s = sample(face(0.2, 5, 5))
    s.fail("timeout", "read timed out")
    out = filtered(s)
    assert out.status == "timeout" and out.reason == "read timed out"
    assert len(out.faces) == 1


def test_each_sample_is_judged_on_its_own_faces() -> None:
    samples = filter_samples([sample(face(0.99, 50, 50)), sample(), sample(face(0.5, 50, 50))], CONFIG)
    assert [s.status for s in samples] == [None, "no_face", "face_rejected"]
