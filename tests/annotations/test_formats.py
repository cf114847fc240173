"""The annotation format registry: every grounding output has one format that writes it and reads it back, and a
file is recognised by its name (and, for ``.dcm``, its DICOM Modality) the same way for reading and for checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monailabel_evlf.annotations import formats
from monailabel_evlf.annotations.dicom_common import order_slices
from monailabel_evlf.app.config import OUTPUTS
from monailabel_evlf.imaging.geometry import VoxelBox
from monailabel_evlf.imaging.volume import Volume, save_like

BOXES = [
    VoxelBox(lo=np.array([3.0, 4.0, 1.0]), hi=np.array([10.0, 12.0, 4.0]), label="cyst", score=0.9),
    VoxelBox(lo=np.array([20.0, 5.0, 2.0]), hi=np.array([25.0, 9.0, 6.0]), label="hyperdense lesion", score=0.6),
]


@pytest.fixture
def annotation(ct_series, ct_affine) -> formats.Annotation:
    ordered = order_slices(ct_series)
    shape = (int(ordered[0].Columns), int(ordered[0].Rows), len(ordered))
    volume = Volume(
        np.zeros(shape, np.float32), ct_affine, meta={"sop_instance_uids": [ds.SOPInstanceUID for ds in ordered]}
    )
    return formats.Annotation(
        boxes=BOXES,
        volume=volume,
        texts=["Round, water-dense.", ""],
        diagnosis=["cyst", "hyperdense lesion"],
        reasoning="Two findings.",
        series=ct_series,
    )


def _saved(fmt: formats.AnnotationFormat, annotation: formats.Annotation, folder: Path) -> Path:
    path = folder / f"label{fmt.suffixes[0]}"
    if fmt.write is not None:
        fmt.write(annotation, path)
    else:
        fmt.encode(annotation).save_as(str(path))
    return path


def test_every_grounding_output_but_json_has_one_format() -> None:
    assert formats.for_output("json") is None
    assert sorted(f.output for f in formats.FORMATS) == sorted(o for o in OUTPUTS if o != "json")
    assert all((f.write is None) != (f.encode is None) for f in formats.FORMATS)  # a file, or a DICOM dataset
    with pytest.raises(ValueError, match="unknown output"):
        formats.for_output("png")


@pytest.mark.parametrize("output", ["markups", "labelmap", "dicom_seg"])
def test_written_boxes_read_back_exactly(annotation, tmp_path, output) -> None:
    fmt = formats.for_output(output)
    path = _saved(fmt, annotation, tmp_path)
    assert formats.format_of(path) is fmt
    names = {1: "cyst", 2: "hyperdense lesion"} if output == "labelmap" else None
    got = sorted(formats.read_boxes(path, annotation.volume, names), key=lambda b: b.label)
    assert [b.label for b in got] == ["cyst", "hyperdense lesion"]
    for box, expected in zip(got, BOXES, strict=True):
        np.testing.assert_allclose(box.lo, expected.lo, atol=1e-6)
        np.testing.assert_allclose(box.hi, expected.hi, atol=1e-6)


def test_sr_rectangle_is_the_box_on_its_central_slice(annotation, tmp_path) -> None:
    path = _saved(formats.DICOM_SR, annotation, tmp_path)
    assert formats.format_of(path) is formats.DICOM_SR
    got = sorted(formats.read_boxes(path, annotation.volume), key=lambda b: b.label)
    for box, expected in zip(got, BOXES, strict=True):
        k = np.floor((expected.lo[2] + expected.hi[2]) / 2)  # slices 1..3 -> 2, slices 2..5 -> 4
        np.testing.assert_allclose(box.lo, [*expected.lo[:2], k], atol=1e-6)
        np.testing.assert_allclose(box.hi, [*expected.hi[:2], k + 1], atol=1e-6)
        assert box.label == expected.label and box.score == pytest.approx(expected.score)
    finding = formats.box_to_slice_finding(BOXES[0], "why")
    assert (finding.k, finding.text) == (2, "why")
    assert formats.slice_finding_to_box(finding).hi.tolist() == [10.0, 12.0, 3.0]


def test_dicom_formats_need_the_dicom_series(annotation, tmp_path) -> None:
    path = _saved(formats.DICOM_SEG, annotation, tmp_path)
    on_a_volume_file = Volume(annotation.volume.array, annotation.volume.affine)
    with pytest.raises(ValueError, match="loaded from the DICOM series"):
        formats.read_boxes(path, on_a_volume_file)
    image = save_like(on_a_volume_file.array, on_a_volume_file, tmp_path / "image.nii.gz")
    with pytest.raises(formats.LabelRefused, match="needs a DICOM study") as caught:
        formats.check_label(path, formats.LabelCheck(str(image), ["cyst"]))
    assert caught.value.status == 422


def test_files_no_format_reads_are_refused_by_name_or_modality(ct_series, tmp_path) -> None:
    ct = tmp_path / "ct.dcm"
    ct_series[0].save_as(str(ct))
    with pytest.raises(formats.LabelRefused, match="must be an SR or SEG, got modality 'CT'") as caught:
        formats.format_of(ct)
    assert caught.value.status == 422
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"DICM?")
    with pytest.raises(formats.LabelRefused, match="unreadable DICOM label"):
        formats.format_of(garbage)
    with pytest.raises(formats.LabelRefused, match=r"unsupported label format 'notes\.txt'") as caught:
        formats.format_of(tmp_path / "notes.txt")
    assert caught.value.status == 415
    for fmt in formats.FORMATS:  # the message names every suffix there is
        assert all(suffix in str(caught.value) for suffix in fmt.suffixes)
    assert formats.label_suffix("CASE.NII.GZ") == ".nii.gz"
