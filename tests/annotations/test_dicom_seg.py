"""DICOM SEG of boxes: validates, sits on the right source frames, reads back to the same boxes."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from monailabel_evlf.annotations.dicom_common import is_model_output, order_slices
from monailabel_evlf.annotations.dicom_seg import read_segmentation_boxes, write_segmentation
from monailabel_evlf.imaging.geometry import VoxelBox


def _vbox(lo, hi, label) -> VoxelBox:
    return VoxelBox(lo=np.asarray(lo, dtype=float), hi=np.asarray(hi, dtype=float), label=label)


BOXES = [
    _vbox((3, 4, 1), (10, 12, 3), "cyst"),
    _vbox((20, 5, 2), (25, 9, 6), "cyst"),
    _vbox((5, 6, 2), (8, 9, 3), "nodule"),  # overlaps the first cyst: segments may overlap
]


def _key(box: VoxelBox) -> tuple:
    return tuple(map(float, box.lo)), tuple(map(float, box.hi)), box.label


@pytest.fixture(scope="module")
def seg_path(ct_series, tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    write_segmentation(BOXES, ct_series).save_as(path)
    return path


def test_segmentation_passes_dciodvfy(seg_path, dciodvfy_errors) -> None:
    assert dciodvfy_errors(seg_path) == []


def test_segmentation_reads_back_to_the_boxes(seg_path, ct_series) -> None:
    back = read_segmentation_boxes(pydicom.dcmread(seg_path), ct_series)
    assert sorted(map(_key, back)) == sorted(map(_key, BOXES))


def test_segments_carry_labels_and_codes(seg_path) -> None:
    seg = pydicom.dcmread(seg_path)
    segments = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert segments == {"cyst": "367643001", "nodule": "27925004"}


def test_frames_sit_on_the_source_instance_of_slice_k(seg_path, ct_series) -> None:
    seg = pydicom.dcmread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series[0].SeriesInstanceUID
    k_of = {ds.SOPInstanceUID: k for k, ds in enumerate(order_slices(ct_series))}
    frames = seg.pixel_array
    nodule_number = next(s.SegmentNumber for s in seg.SegmentSequence if s.SegmentLabel == "nodule")
    nodule_frames = []
    for n, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        if group.SegmentIdentificationSequence[0].ReferencedSegmentNumber != nodule_number:
            continue
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        nodule_frames.append(k_of[source])
        # rows run along j, columns along i: the nodule covers i 5..7, j 6..8
        assert np.argwhere(frames[n]).min(axis=0).tolist() == [6, 5]
        assert np.argwhere(frames[n]).max(axis=0).tolist() == [8, 7]
    assert nodule_frames == [2]


def test_explicit_slice_order(ct_series, tmp_path) -> None:
    reversed_uids = [ds.SOPInstanceUID for ds in order_slices(ct_series)][::-1]
    path = tmp_path / "seg.dcm"
    write_segmentation(BOXES[2:], ct_series, slice_uid_order=reversed_uids).save_as(path)
    seg = pydicom.dcmread(path)
    assert [_key(b) for b in read_segmentation_boxes(seg, reversed_uids)] == [_key(BOXES[2])]
    (mirrored,) = read_segmentation_boxes(seg, ct_series)
    assert (mirrored.lo[2], mirrored.hi[2]) == (3, 4)  # slice 2 of 6 counted from the other end


@pytest.mark.parametrize(
    ("boxes", "message"),
    [
        ([], "at least one box"),
        ([_vbox((0, 0, 0), (1, 1, 1), "")], "1..64 characters"),
        ([_vbox((0, 0, 0), (1, 1, 1), "x" * 65)], "1..64 characters"),
        ([_vbox((50, 50, 0), (60, 60, 1), "far")], "covers no voxel"),
    ],
)
def test_bad_boxes_raise_value_error(ct_series, boxes, message) -> None:
    with pytest.raises(ValueError, match=message):
        write_segmentation(boxes, ct_series)


def test_reading_something_else_raises_value_error(ct_series) -> None:
    with pytest.raises(ValueError, match="not a DICOM SEG"):
        read_segmentation_boxes(ct_series[0], ct_series)
    with pytest.raises(ValueError, match="not in the series"):
        write_segmentation(BOXES, ct_series, slice_uid_order=["1.2.3"])


def test_manual_segmentation_is_a_correction_and_validates(ct_series, tmp_path, dciodvfy_errors) -> None:
    """A correction saved through the app is MANUAL (no algorithm); the model's own SEG is AUTOMATIC."""
    path = tmp_path / "manual.dcm"
    write_segmentation(BOXES, ct_series, manual=True).save_as(path)
    assert dciodvfy_errors(path) == []
    manual = pydicom.dcmread(path)
    assert {s.SegmentAlgorithmType for s in manual.SegmentSequence} == {"MANUAL"}
    assert not is_model_output(manual)
    assert is_model_output(write_segmentation(BOXES, ct_series))
    assert sorted(map(_key, read_segmentation_boxes(manual, ct_series))) == sorted(map(_key, BOXES))
