"""Label maps: the half-voxel rule on known boxes, box <-> label map round trips, NIfTI affines, clear errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monailabel_evlf.annotations.labelmaps import (
    boxes_to_labelmap,
    label_values,
    labelmap_to_boxes,
    load_labelmap,
    save_labelmap,
)
from monailabel_evlf.imaging.geometry import VoxelBox


def _vbox(lo, hi, label="cyst") -> VoxelBox:
    return VoxelBox(lo=np.asarray(lo, dtype=float), hi=np.asarray(hi, dtype=float), label=label)


def test_integer_box_fills_exactly_lo_to_hi() -> None:
    labelmap, names = boxes_to_labelmap([_vbox((1, 2, 3), (3, 4, 5))], (6, 6, 6))
    expected = np.zeros((6, 6, 6), dtype=np.int16)
    expected[1:3, 2:4, 3:5] = 1
    np.testing.assert_array_equal(labelmap, expected)
    assert names == {1: "cyst"}


def test_fractional_box_takes_voxels_whose_centre_is_inside() -> None:
    # Centres are at n + 0.5: [0.6, 2.5) holds only the centre 1.5; [0.4, 2.6) holds 0.5, 1.5 and 2.5.
    labelmap, _ = boxes_to_labelmap([_vbox((0.6, 0.4, 0), (2.5, 2.6, 1))], (4, 4, 1))
    assert np.argwhere(labelmap[:, :, 0]).tolist() == [[1, 0], [1, 1], [1, 2]]


def test_nested_box_stays_visible_and_labels_get_their_values() -> None:
    big, small = _vbox((0, 0, 0), (8, 8, 8), "organ"), _vbox((2, 2, 2), (4, 4, 4), "nodule")
    labelmap, names = boxes_to_labelmap([small, big], (8, 8, 8), values={"organ": 1, "nodule": 7})
    assert names == {1: "organ", 7: "nodule"}
    assert labelmap[3, 3, 3] == 7 and labelmap[0, 0, 0] == 1
    assert np.count_nonzero(labelmap == 7) == 8


def test_box_partly_outside_is_clipped_and_wholly_outside_raises() -> None:
    labelmap, _ = boxes_to_labelmap([_vbox((-3, -3, 0), (2, 2, 1))], (4, 4, 1))
    assert np.count_nonzero(labelmap) == 4
    with pytest.raises(ValueError, match="covers no voxel"):
        boxes_to_labelmap([_vbox((5, 5, 0), (7, 7, 1))], (4, 4, 1))


def test_label_values_follow_first_appearance() -> None:
    assert label_values(["b", "a", "b", "c"]) == {"b": 1, "a": 2, "c": 3}


def test_components_give_one_box_each_with_names_and_min_voxels() -> None:
    labelmap = np.zeros((10, 10, 4), dtype=np.int16)
    labelmap[1:3, 1:4, 0:2] = 2
    labelmap[6:9, 6:7, 1:4] = 2
    labelmap[5, 0, 0] = 3  # a stray click
    boxes = labelmap_to_boxes(labelmap, {2: "cyst", 3: "nodule"}, min_voxels=2)
    assert [(np.asarray(b.lo).tolist(), np.asarray(b.hi).tolist(), b.label) for b in boxes] == [
        ([1, 1, 0], [3, 4, 2], "cyst"),
        ([6, 6, 1], [9, 7, 4], "cyst"),
    ]
    assert labelmap_to_boxes(labelmap)[-1].label == "3"


@st.composite
def separated_boxes(draw):
    """Up to 4 boxes in their own octant-like cells of a 16^3 grid, so no two touch."""
    cells = draw(st.lists(st.tuples(*[st.integers(0, 1)] * 3), min_size=1, max_size=4, unique=True))
    boxes = []
    for n, cell in enumerate(cells):
        lo = [c * 8 + draw(st.integers(0, 3)) for c in cell]
        hi = [a + draw(st.integers(1, 4)) for a in lo]
        boxes.append(_vbox(lo, hi, label=draw(st.sampled_from(["cyst", "nodule", f"kind {n}"]))))
    return boxes


@settings(max_examples=40, deadline=None)
@given(boxes=separated_boxes())
def test_boxes_labelmap_boxes_round_trip(boxes) -> None:
    labelmap, names = boxes_to_labelmap(boxes, (16, 16, 16))
    back = labelmap_to_boxes(labelmap, names)
    key = lambda b: (tuple(map(float, b.lo)), tuple(map(float, b.hi)), b.label)  # noqa: E731
    assert sorted(map(key, back)) == sorted(map(key, boxes))


def test_nifti_keeps_the_image_affine_stored_as_ras(tmp_path: Path) -> None:
    affine_lps = np.array([[0.0, 0.9, 0.0, -12.0], [-0.8, 0.0, 0.0, 40.0], [0.0, 0.0, 2.0, 7.5], [0, 0, 0, 1]])
    labelmap, _ = boxes_to_labelmap([_vbox((1, 1, 1), (3, 2, 2))], (5, 4, 3))
    path = save_labelmap(labelmap, affine_lps, tmp_path / "label.nii.gz")
    on_disk = nib.load(str(path))
    np.testing.assert_allclose(on_disk.affine, np.diag([-1, -1, 1, 1]) @ affine_lps)
    assert on_disk.header.get_intent()[0] == "label"
    data, affine = load_labelmap(path)
    np.testing.assert_array_equal(data, labelmap)
    np.testing.assert_allclose(affine, affine_lps)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: boxes_to_labelmap([_vbox((0, 0, 0), (1, 1, 1))], (4, 4)), "3D"),
        (lambda: boxes_to_labelmap([_vbox((0, 0, 0), (1, 1, 1), "x")], (4, 4, 4), {"y": 1}), "no label value"),
        (lambda: boxes_to_labelmap([_vbox((0, 0, 0), (1, 1, 1))], (4, 4, 4), {"cyst": 0}), "1..32767"),
        (lambda: labelmap_to_boxes(np.zeros((4, 4))), "3D"),
        (lambda: labelmap_to_boxes(np.full((2, 2, 2), 0.5)), "integers"),
    ],
)
def test_bad_input_raises_value_error(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()
