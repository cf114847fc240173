"""Linking per-slice detections into 3D boxes, on hand-made detections with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from monailabel_evlf.imaging.aggregation import extend_into_weak_detections, link_slice_detections
from monailabel_evlf.imaging.geometry import VoxelBox


def _det(k: int, a1, b1, a2, b2, label="cyst", score=None, axis=2) -> VoxelBox:
    """A one-slice detection on slice ``k`` along ``axis``; ``(a, b)`` are the remaining axes in order."""
    lo, hi = [a1, b1], [a2, b2]
    lo.insert(axis, k)
    hi.insert(axis, k + 1)
    return VoxelBox(lo=lo, hi=hi, label=label, score=score)


# A lesion on slices 3, 4, 6, 7 (missed on 5); consecutive in-plane IoUs 0.83, 0.69, 0.64.
LESION = [
    _det(3, 10, 10, 20, 20, score=0.6),
    _det(4, 9, 10, 21, 20, score=0.8),
    _det(6, 10, 11, 20, 21, score=1.0),
    _det(7, 11, 11, 19, 19, score=0.6),
]


def _key(box: VoxelBox) -> tuple:
    return (*box.lo.tolist(), *box.hi.tolist(), box.label)


def test_lesion_with_one_missed_slice_becomes_one_box() -> None:
    (box,) = link_slice_detections(LESION, axis=2)
    assert _key(box) == (9, 10, 3, 21, 21, 8, "cyst")  # union in-plane, slices 3..7 with the gap
    assert box.score == pytest.approx(0.75)  # mean of 0.6, 0.8, 1.0, 0.6


def test_median_extent() -> None:
    (box,) = link_slice_detections(LESION, axis=2, extent="median")
    assert _key(box) == (10, 10.5, 3, 20, 20, 8, "cyst")


def test_single_slice_detections_are_dropped_unless_asked_for() -> None:
    stray = _det(12, 40, 40, 45, 45, score=0.99)
    assert [_key(b) for b in link_slice_detections([*LESION, stray], axis=2)] == [(9, 10, 3, 21, 21, 8, "cyst")]
    kept = link_slice_detections([*LESION, stray], axis=2, min_slices=1)
    assert [_key(b) for b in kept] == [(40, 40, 12, 45, 45, 13, "cyst"), (9, 10, 3, 21, 21, 8, "cyst")]


def test_gap_longer_than_allowed_splits_the_track() -> None:
    detections = [_det(k, 10, 10, 20, 20) for k in (0, 1, 4, 5)]
    assert sorted(_key(b) for b in link_slice_detections(detections, axis=2)) == [
        (10, 10, 0, 20, 20, 2, "cyst"),
        (10, 10, 4, 20, 20, 6, "cyst"),
    ]
    (joined,) = link_slice_detections(detections, axis=2, max_gap=2)
    assert _key(joined) == (10, 10, 0, 20, 20, 6, "cyst")


def test_places_are_kept_apart_and_one_lesion_named_two_ways_is_one_box() -> None:
    detections = [_det(k, 10, 10, 20, 20, label="cyst", score=0.9) for k in (0, 1, 2)]
    detections += [_det(k, 10, 10, 20, 20, label="hyperdense lesion", score=0.5) for k in (1, 2)]
    detections += [_det(k, 50, 50, 60, 60, label="cyst") for k in (0, 1)]
    detections += [_det(0, 0, 0, 5, 5), _det(1, 6, 6, 11, 11)]  # neighbours that do not overlap: two strays
    assert sorted(_key(b) for b in link_slice_detections(detections, axis=2)) == [
        (10, 10, 0, 20, 20, 3, "cyst"),
        (50, 50, 0, 60, 60, 2, "cyst"),
    ]


def test_a_track_takes_the_score_weighted_majority_label() -> None:
    detections = [_det(0, 10, 10, 20, 20, label="cyst", score=0.9)]
    detections += [_det(k, 10, 10, 20, 20, label="hyperdense lesion", score=0.6) for k in (1, 2)]
    (box,) = link_slice_detections(detections, axis=2)
    assert _key(box) == (10, 10, 0, 20, 20, 3, "hyperdense lesion")  # 1.2 of votes against 0.9


def test_duplicate_tracks_are_merged_by_3d_nms_keeping_the_better_one() -> None:
    detections = [_det(k, 10, 10, 20, 20, score=0.9) for k in (0, 1, 2)]
    detections += [_det(k, 11, 11, 21, 21, score=0.5) for k in (0, 1, 2)]
    (box,) = link_slice_detections(detections, axis=2)
    assert _key(box) == (10, 10, 0, 20, 20, 3, "cyst") and box.score == pytest.approx(0.9)
    assert len(link_slice_detections(detections, axis=2, nms_threshold=0.9)) == 2


def test_other_slice_axis_and_missing_scores() -> None:
    detections = [_det(k, 2, 3, 4, 5, axis=0) for k in (7, 8)]
    (box,) = link_slice_detections(detections, axis=0)
    np.testing.assert_array_equal(box.lo, [7, 2, 3])
    np.testing.assert_array_equal(box.hi, [9, 4, 5])
    assert box.score == 1.0  # detections without a score count as certain


def test_bad_input_raises_value_error() -> None:
    thick = VoxelBox(lo=(0, 0, 0), hi=(1, 1, 2))
    with pytest.raises(ValueError, match="not one whole slice"):
        link_slice_detections([thick], axis=2)
    with pytest.raises(ValueError, match="extent"):
        link_slice_detections(LESION, axis=2, extent="mean")
    with pytest.raises(ValueError, match="min_slices"):
        link_slice_detections(LESION, axis=2, min_slices=0)
    assert link_slice_detections([], axis=1) == []


# --- hysteresis: a 3D box grows into weak detections that continue it (its faint first / last slices) -------------
BOX = VoxelBox(lo=[10, 10, 5], hi=[20, 20, 8], label="cyst", score=0.7)  # slices 5, 6, 7


def test_box_grows_into_weak_caps_inside_its_section_up_to_max_extend() -> None:
    weak = [
        _det(4, 13, 13, 16, 16, score=0.2),  # cap below, centre (14.5, 14.5) inside: taken
        _det(3, 14, 14, 16, 16, score=0.3),  # the next one down: taken (second slice)
        _det(2, 14, 14, 16, 16, score=0.9),  # a third: over max_extend=2
        _det(8, 30, 30, 34, 34, score=0.9),  # above, but centre outside the section: not taken
    ]
    (grown,) = extend_into_weak_detections([BOX], weak, axis=2, min_score=0.1, max_extend=2)
    assert grown.lo.tolist() == [10, 10, 3] and grown.hi.tolist() == [20, 20, 8]
    assert (grown.label, grown.score) == ("cyst", 0.7)  # extent only: label and score unchanged


def test_weak_detections_below_the_score_or_after_a_gap_do_not_extend() -> None:
    weak = [_det(4, 13, 13, 16, 16, score=0.05), _det(9, 13, 13, 16, 16, score=0.9)]  # too weak; slice 8 missing
    (same,) = extend_into_weak_detections([BOX], weak, axis=2, min_score=0.1)
    assert same.lo.tolist() == BOX.lo.tolist() and same.hi.tolist() == BOX.hi.tolist()
    (none,) = extend_into_weak_detections(
        [BOX], [_det(4, 13, 13, 16, 16, score=0.9)], axis=2, min_score=0.1, max_extend=0
    )
    assert none.lo[2] == 5


def test_extension_works_along_any_axis() -> None:
    box = VoxelBox(lo=[5, 10, 10], hi=[8, 20, 20])
    (grown,) = extend_into_weak_detections([box], [_det(8, 12, 12, 15, 15, score=0.5, axis=0)], axis=0, min_score=0.1)
    assert grown.lo.tolist() == [5, 10, 10] and grown.hi.tolist() == [9, 20, 20]
