"""Per-box provenance of a reader's correction: boxes left as the model drew them vs boxes a person drew or changed.

Real SR objects on both sides: the AI SR is written by our own writer on the ``ct_series`` CT, the reader's SR is
the one OHIF 3.10 wrote on that same series (tests/annotations/data/ohif-3.10-rectangle-ellipse.dcm, see
test_dicom_sr.py for how it was made) or a variant of it with its rectangle moved, as a reader dragging it would.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from monailabel_evlf.annotations import formats
from monailabel_evlf.annotations.dicom_common import order_slices
from monailabel_evlf.annotations.dicom_seg import write_segmentation
from monailabel_evlf.annotations.dicom_sr import SliceFinding, read_sr_boxes, write_measurement_report
from monailabel_evlf.annotations.provenance import HUMAN, MODEL, BoxOrigin, match_origins, model_identity, summary
from monailabel_evlf.imaging.geometry import Box2D, VoxelBox
from monailabel_evlf.imaging.volume import Volume
from tests.annotations.test_dicom_sr import OHIF_310_SR

pytestmark = pytest.mark.filterwarnings("ignore:The value length")  # OHIF's CORNERSTONEFREETEXT code values

# What the model "drew" before the reader opened the study in OHIF: the rectangle OHIF's fixture holds (as the
# fixture script meant to draw it; OHIF's mouse put it about 0.03 px off), a cyst elsewhere on slice 4 (the
# reader drew their own ellipse instead), and a nodule the reader deleted.
AI_FINDINGS = [
    SliceFinding(k=1, box=Box2D(x1=5.5, y1=6.0, x2=17.25, y2=20.0), label="ring-enhancing lesion", score=0.9),
    SliceFinding(k=4, box=Box2D(x1=25.0, y1=3.0, x2=33.0, y2=9.0), label="cyst", score=0.7),
    SliceFinding(k=3, box=Box2D(x1=30.0, y1=20.0, x2=36.0, y2=26.0), label="nodule", score=0.4),
]


def _ai_sr(ct_series, findings=AI_FINDINGS) -> Dataset:
    report = write_measurement_report(findings, ct_series, algorithm_name="evlf-qwen-test", algorithm_version="v0003")
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(report)))


def _bytes(dataset: Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    dataset.save_as(buffer, write_like_original=False)
    return buffer.getvalue()


def _moved(sr: Dataset, dx: float) -> Dataset:
    """The OHIF SR with its rectangle dragged ``dx`` columns to the right (every copy of it: Perimeter and Area)."""
    moved = copy.deepcopy(sr)
    stack = list(moved.ContentSequence)
    while stack:
        item = stack.pop()
        if item.ValueType == "SCOORD" and item.GraphicType == "POLYLINE":
            data = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
            data[:, 0] += dx
            item.GraphicData = data.ravel().tolist()
        stack.extend(item.get("ContentSequence", []))
    return moved


def test_our_own_sr_is_the_model_s_box_by_box(ct_series) -> None:
    findings = read_sr_boxes(_ai_sr(ct_series), ct_series)
    assert [f.origin for f in findings] == [BoxOrigin(MODEL, "evlf-qwen-test", "v0003", 1.0)] * 3


def test_ohif_sr_without_the_ai_sr_says_nothing_about_origin(ct_series) -> None:
    assert [f.origin for f in read_sr_boxes(pydicom.dcmread(OHIF_310_SR), ct_series)] == [None, None]


def test_ohif_sr_boxes_left_as_the_model_drew_them_are_the_model_s(ct_series) -> None:
    ai = _ai_sr(ct_series)
    assert model_identity(ai) == ("evlf-qwen-test", "v0003")
    rectangle, ellipse = read_sr_boxes(pydicom.dcmread(OHIF_310_SR), ct_series, model_report=ai)
    # the rectangle the reader took over and left alone: the model's, with its model id and adapter version
    assert (rectangle.origin.source, rectangle.origin.model, rectangle.origin.adapter_version) == (
        MODEL,
        "evlf-qwen-test",
        "v0003",
    )
    assert 0.99 <= rectangle.origin.iou < 1.0  # OHIF's mouse drift of ~0.03 px is not a change
    # the ellipse the reader drew on slice 4 where the model put its cyst elsewhere: a person's
    assert ellipse.origin == BoxOrigin(HUMAN, iou=0.0)
    assert summary([rectangle.origin, ellipse.origin]) == (
        "2 boxes: 1 left as the model drew them (evlf-qwen-test v0003), 1 drawn or changed by a reader"
    )


def test_a_moved_or_relabelled_box_is_a_person_s(ct_series) -> None:
    ai = _ai_sr(ct_series)
    moved, _ = read_sr_boxes(_moved(pydicom.dcmread(OHIF_310_SR), dx=2.0), ct_series, model_report=ai)
    assert moved.origin.source == HUMAN and 0.5 < moved.origin.iou < 0.99  # still overlaps, but it was moved
    relabelled = [AI_FINDINGS[0]._replace(label="cyst"), *AI_FINDINGS[1:]]
    same_place, _ = read_sr_boxes(pydicom.dcmread(OHIF_310_SR), ct_series, model_report=_ai_sr(ct_series, relabelled))
    assert same_place.origin == BoxOrigin(HUMAN, iou=0.0)  # the model called it a cyst; the reader did not


def test_a_box_on_another_slice_is_a_person_s(ct_series) -> None:
    elsewhere = [AI_FINDINGS[0]._replace(k=2), *AI_FINDINGS[1:]]
    rectangle, _ = read_sr_boxes(pydicom.dcmread(OHIF_310_SR), ct_series, model_report=_ai_sr(ct_series, elsewhere))
    assert rectangle.origin.source == HUMAN


def test_each_model_box_vouches_for_one_box_only() -> None:
    model = [VoxelBox(lo=(0, 0, 0), hi=(10, 10, 1), label="Cyst")]
    copies = [VoxelBox(lo=(0, 0, 0), hi=(10, 10, 1), label=label) for label in ("cyst ", "cyst")]
    origins = match_origins(copies, model, "m", "v1")
    assert [o.source for o in origins] == [MODEL, HUMAN]  # labels compare case- and space-insensitively
    assert match_origins([], model) == [] and match_origins(copies[:1], [])[0] == BoxOrigin(HUMAN)


@pytest.fixture
def volume(ct_series, ct_affine) -> Volume:
    ordered = order_slices(ct_series)
    shape = (int(ordered[0].Columns), int(ordered[0].Rows), len(ordered))
    uids = [str(ds.SOPInstanceUID) for ds in ordered]
    return Volume(np.zeros(shape, np.float32), ct_affine, meta={"sop_instance_uids": uids})


def test_box_origins_of_a_saved_correction_file(ct_series, volume, tmp_path) -> None:
    """What the DICOMweb datastore reports per box: the reader's SR file against the study's AI SR."""
    path = tmp_path / "reader.dcm"
    _moved(pydicom.dcmread(OHIF_310_SR), dx=0.0).save_as(path, write_like_original=False)
    pairs = formats.box_origins(path, volume, _ai_sr(ct_series))
    assert [(box.label, origin.source) for box, origin in pairs] == [("ring-enhancing lesion", MODEL), ("cyst", HUMAN)]
    assert [o.source for _, o in formats.box_origins(path, volume, None)] == [HUMAN, HUMAN]  # no AI output at all


def test_a_seg_correction_is_compared_with_the_ai_seg_in_3d(ct_series, volume, tmp_path) -> None:
    kept = VoxelBox(lo=(3, 4, 1), hi=(10, 12, 4), label="cyst")
    changed = VoxelBox(lo=(20, 5, 2), hi=(25, 9, 6), label="hyperdense lesion")
    uids = volume.meta["sop_instance_uids"]
    written = write_segmentation(
        [kept, changed], ct_series, slice_uid_order=uids, algorithm_name="evlf-qwen-test", algorithm_version="v0003"
    )
    ai = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(written)))  # as the DICOMweb server hands it back
    assert model_identity(ai) == ("evlf-qwen-test", "v0003")
    grown = VoxelBox(lo=(20, 5, 2), hi=(25, 9, 5), label="hyperdense lesion")  # the reader took a slice off
    reader = write_segmentation([kept, grown], ct_series, slice_uid_order=uids, manual=True)
    reader.save_as(tmp_path / "reader.dcm")
    got = {box.label: origin for box, origin in formats.box_origins(tmp_path / "reader.dcm", volume, ai)}
    assert got["cyst"] == BoxOrigin(MODEL, "evlf-qwen-test", "v0003", 1.0)
    assert got["hyperdense lesion"].source == HUMAN and got["hyperdense lesion"].iou == pytest.approx(0.75)
