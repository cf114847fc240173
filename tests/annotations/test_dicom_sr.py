"""DICOM SR TID 1500: our reports validate and read back; OHIF 3.x rectangle reports read as boxes."""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from monailabel_evlf.annotations.dicom_common import is_model_output, order_slices
from monailabel_evlf.annotations.dicom_sr import SliceFinding, read_sr_boxes, read_sr_summary, write_measurement_report
from monailabel_evlf.imaging.geometry import Box2D

FINDINGS = [
    SliceFinding(k=2, box=Box2D(x1=3, y1=4, x2=10, y2=12), label="cyst", score=0.8, text="Round cyst in the liver."),
    SliceFinding(k=4, box=Box2D(x1=0, y1=0, x2=40, y2=30), label="odd density", score=None, text=""),
    SliceFinding(k=2, box=Box2D(x1=20.5, y1=7.25, x2=26, y2=9), label="nodule", score=0.31, text="Small nodule."),
]


def _save_and_reload(dataset: Dataset, path: Path) -> Dataset:
    dataset.save_as(path, write_like_original=False)
    return pydicom.dcmread(path)


def _walk(item: Dataset):
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


def _named(item: Dataset, value: str) -> bool:
    return "ConceptNameCodeSequence" in item and item.ConceptNameCodeSequence[0].CodeValue == value


@pytest.fixture(scope="module")
def report_path(ct_series, tmp_path_factory) -> Path:
    report = write_measurement_report(
        FINDINGS,
        ct_series,
        diagnosis=["cyst", "nodule"],
        reasoning="A round, sharply marginated hypodense lesion of water density: a cyst.",
        sites=["liver", "", "lung"],
    )
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    report.save_as(path)
    return path


def test_report_passes_dciodvfy(report_path, dciodvfy_errors) -> None:
    assert dciodvfy_errors(report_path) == []


def test_report_reads_back(report_path, ct_series) -> None:
    sr = pydicom.dcmread(report_path)
    back = read_sr_boxes(sr, ct_series)
    assert [(f.k, f.label, f.text) for f in back] == [(f.k, f.label, f.text) for f in FINDINGS]
    for got, want in zip(back, FINDINGS, strict=True):
        assert (got.box.x1, got.box.y1, got.box.x2, got.box.y2) == (want.box.x1, want.box.y1, want.box.x2, want.box.y2)
        assert got.score == (None if want.score is None else pytest.approx(want.score))
        assert got.box.label == want.label
    assert read_sr_summary(sr) == (
        ["cyst", "nodule"],
        "A round, sharply marginated hypodense lesion of water density: a cyst.",
    )


def test_report_references_the_instance_of_slice_k_and_the_series(report_path, ct_series, ct_affine) -> None:
    sr = pydicom.dcmread(report_path)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == ct_series[0].StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series[0].SeriesInstanceUID
    by_uid = {ds.SOPInstanceUID: ds for ds in ct_series}
    groups = [i for i in _walk(sr) if i.ValueType == "CONTAINER" and _named(i, "125007")]
    regions = [i for g in groups for i in g.ContentSequence if i.ValueType == "SCOORD"]  # TID 1410's own
    assert len(regions) == 3
    first = regions[0]
    assert first.GraphicType == "POLYLINE"
    # closed rectangle, (column, row) = edge coordinates: no half-pixel shift
    assert list(first.GraphicData) == [3.0, 4.0, 10.0, 4.0, 10.0, 12.0, 3.0, 12.0, 3.0, 4.0]
    image = by_uid[first.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
    # slice k = 2 sits at z = 30 + 2 * 2.5 mm in the phantom's affine
    np.testing.assert_allclose(image.ImagePositionPatient, (ct_affine @ [0, 0, 2, 1])[:3])


def test_report_codes_area_and_confidence(report_path) -> None:
    sr = pydicom.dcmread(report_path)
    groups = [i for i in _walk(sr) if _named(i, "125007")]
    first = groups[0]
    finding = next(i for i in first.ContentSequence if _named(i, "121071")).ConceptCodeSequence[0]
    assert (finding.CodeValue, finding.CodingSchemeDesignator) == ("367643001", "SCT")  # Cyst
    site = next(i for i in first.ContentSequence if _named(i, "363698007")).ConceptCodeSequence[0]
    assert site.CodeValue == "10200004"  # Liver
    area = next(i for i in first.ContentSequence if _named(i, "42798000")).MeasuredValueSequence[0]
    assert float(area.NumericValue) == pytest.approx(7 * 0.8 * 8 * 0.7)  # 7 columns x 0.8 mm, 8 rows x 0.7 mm
    unknown = next(i for i in groups[1].ContentSequence if _named(i, "121071")).ConceptCodeSequence[0]
    assert unknown.CodeValue == "52988006"  # "odd density" names no concept: Lesion


def test_highdicom_parses_the_report(report_path) -> None:
    sr = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(report_path))
    report = hd.sr.MeasurementReport.from_sequence([sr], is_root=True)
    groups = report.get_planar_roi_measurement_groups()
    assert len(groups) == 3
    assert groups[0].roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    assert groups[0].finding_type.meaning == "Cyst"


def test_explicit_slice_order_maps_k(ct_series, tmp_path) -> None:
    reversed_uids = [ds.SOPInstanceUID for ds in order_slices(ct_series)][::-1]
    report = write_measurement_report(FINDINGS[:1], ct_series, slice_uid_order=reversed_uids)
    sr = _save_and_reload(report, tmp_path / "sr.dcm")
    assert read_sr_boxes(sr, reversed_uids)[0].k == 2
    assert read_sr_boxes(sr, ct_series)[0].k == 3  # slice 2 counted from the other end of 6


@pytest.mark.parametrize(
    ("finding", "message"),
    [
        (SliceFinding(k=6, box=Box2D(x1=0, y1=0, x2=1, y2=1), label="x"), "outside the series"),
        (SliceFinding(k=0, box=Box2D(x1=0, y1=0, x2=41, y2=1), label="x"), "leaves the 40 x 30 image"),
        (SliceFinding(k=0, box=Box2D(x1=5, y1=0, x2=5, y2=1), label="x"), "empty"),
        (SliceFinding(k=0, box=Box2D(x1=0, y1=0, x2=1, y2=1), label=""), "needs a label"),
    ],
)
def test_bad_findings_raise_value_error(ct_series, finding, message) -> None:
    with pytest.raises(ValueError, match=message):
        write_measurement_report([finding], ct_series)


def test_reading_something_else_raises_value_error(ct_series) -> None:
    with pytest.raises(ValueError, match="not a DICOM SR"):
        read_sr_boxes(ct_series[0], ct_series)
    not_tid1500 = Dataset()
    not_tid1500.Modality = "SR"
    not_tid1500.ContentSequence = []
    with pytest.raises(ValueError, match="Imaging Measurements"):
        read_sr_boxes(not_tid1500, ct_series)


# --- What OHIF 3.x writes -------------------------------------------------------------------------------------
# Built after cornerstone3D packages/adapters/src/adapters/Cornerstone3D/RectangleROI.ts (polyline of the handle
# corners 0, 1, 3, 2, 0 in image coordinates, top-left corner of the top-left pixel = (0, 0), worldToImageCoords.ts),
# dcmjs src/utilities/TID300/Polyline.js and TID300Measurement.js (tracking identifier, finding, NUM Perimeter and
# NUM Area each INFERRED FROM the SCOORD that is SELECTED FROM the IMAGE), TID1500MeasurementReport.js (report,
# image library, evidence) and cornerstone3D adapters LabelData.ts (the label as a DCM 121106 Comment TEXT).


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _item(relationship: str, value_type: str, name: Dataset | None = None, **values) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    if name is not None:
        item.ConceptNameCodeSequence = [name]
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _sop_reference(image: Dataset) -> Dataset:
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
    return reference


def _ohif_group(
    image: Dataset, graphic_type: str, points: list[float], label: str | None, legacy: bool, site_scheme: str = ""
) -> Dataset:
    scoord = _item(
        "INFERRED FROM",
        "SCOORD",
        GraphicType=graphic_type,
        GraphicData=points,
        ContentSequence=[_item("SELECTED FROM", "IMAGE", ReferencedSOPSequence=[_sop_reference(image)])],
    )

    def num(name: Dataset, unit: Dataset, value: float) -> Dataset:
        measured = Dataset()
        measured.MeasurementUnitsCodeSequence, measured.NumericValue = [unit], value
        return _item("CONTAINS", "NUM", name, MeasuredValueSequence=[measured], ContentSequence=[scoord])

    tool = "RectangleROI" if graphic_type == "POLYLINE" else "EllipticalROI"
    content = [
        _item("HAS OBS CONTEXT", "TEXT", _code("112039", "DCM", "Tracking Identifier"),
              TextValue=f"Cornerstone3DTools@^0.1.0:{tool}"),
        _item("HAS OBS CONTEXT", "UIDREF", _code("112040", "DCM", "Tracking Unique Identifier"), UID=generate_uid()),
    ]  # fmt: skip
    if legacy and label:  # OHIF before LabelData.ts: the label as a free-text finding code
        content.append(
            _item("CONTAINS", "CODE", _code("121071", "DCM", "Finding"),
                  ConceptCodeSequence=[_code("CORNERSTONEFREETEXT", "CORNERSTONEJS", label)])
        )  # fmt: skip
    if site_scheme and label:  # OHIF 3.x "Create SR": the typed label as a free-text Finding Site code
        value = "CORNERSTONEFREETEXT" if site_scheme == "CORNERSTONEJS" else label[:16]
        content.append(
            _item("HAS CONCEPT MOD", "CODE", _code("363698007", "SCT", "Finding Site"),
                  ConceptCodeSequence=[_code(value, site_scheme, label)])
        )  # fmt: skip
    if graphic_type == "POLYLINE":
        content.append(num(_code("131191004", "SCT", "Perimeter"), _code("mm", "UCUM", "mm"), 31.5))
    content.append(num(_code("G-A166", "SRT", "Area"), _code("mm2", "UCUM", "mm2"), 52.4))
    if label and not legacy and not site_scheme:
        content.append(_item("CONTAINS", "TEXT", _code("121106", "DCM", "Comment"), TextValue=label))
    return _item("CONTAINS", "CONTAINER", _code("125007", "DCM", "Measurement Group"),
                 ContinuityOfContent="SEPARATE", ContentSequence=content)  # fmt: skip


def ohif_sr(
    series: list[Dataset],
    groups: list[tuple[int, str, list[float], str | None]],
    legacy=False,
    site_scheme: str = "",
    sop_class: str = "1.2.840.10008.5.1.4.1.1.88.34",
) -> Dataset:
    """An SR as OHIF 3.x exports it; ``groups`` are (slice k, graphic type, graphic data, label).

    ``site_scheme`` puts the label in a free-text Finding Site code of that scheme (OHIF 3.10's "Create SR", which
    writes Enhanced SR ``...88.22``) instead of a Comment. Built by hand after the dcmjs / cornerstone adapter
    sources, not exported from a running OHIF."""
    ordered = order_slices(series)
    source = ordered[0]
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPClassUID = sop_class
    sr.SOPClassUID = sop_class  # Comprehensive 3D SR by default
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.SpecificCharacterSet = "ISO_IR 192"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # fmt: skip
        setattr(sr, keyword, getattr(source, keyword))
    sr.Modality, sr.SeriesInstanceUID, sr.SeriesNumber, sr.SeriesDescription = "SR", generate_uid(), 4700, "Research"
    sr.ReferencedPerformedProcedureStepSequence = []
    sr.Manufacturer, sr.InstanceNumber = "dcmjs", 1
    sr.ContentDate, sr.ContentTime = "20240102", "101010"
    sr.ValueType, sr.ContinuityOfContent = "CONTAINER", "SEPARATE"
    sr.ConceptNameCodeSequence = [_code("126000", "DCM", "Imaging Measurement Report")]
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "1500"
    sr.ContentTemplateSequence = [template]
    sr.CompletionFlag, sr.VerificationFlag = "COMPLETE", "UNVERIFIED"
    sr.PerformedProcedureCodeSequence = []
    referenced = [ordered[k] for k, *_ in groups]
    library = [_item("CONTAINS", "IMAGE", ReferencedSOPSequence=[_sop_reference(image)]) for image in referenced]
    language = _item("HAS CONCEPT MOD", "CODE", _code("121049", "DCM", "Language of Content Item and Descendants"),
                     ConceptCodeSequence=[_code("eng", "RFC5646", "English")])  # fmt: skip
    sr.ContentSequence = [
        language,
        _item("HAS OBS CONTEXT", "PNAME", _code("121008", "DCM", "Person Observer Name"), PersonName="unknown^unknown"),
        _item("HAS CONCEPT MOD", "CODE", _code("121058", "DCM", "Procedure reported"),
              ConceptCodeSequence=[_code("1", "99dcmjs", "Unknown procedure")]),
        _item("CONTAINS", "CONTAINER", _code("111028", "DCM", "Image Library"), ContinuityOfContent="SEPARATE",
              ContentSequence=[_item("CONTAINS", "CONTAINER", _code("126200", "DCM", "Image Library Group"),
                                     ContinuityOfContent="SEPARATE", ContentSequence=library)]),
        _item("CONTAINS", "CONTAINER", _code("126010", "DCM", "Imaging Measurements"), ContinuityOfContent="SEPARATE",
              ContentSequence=[_ohif_group(ordered[k], kind, data, label, legacy, site_scheme)
                                   for k, kind, data, label in groups]),
    ]  # fmt: skip
    evidence = []
    for image in referenced:
        series_item = Dataset()
        series_item.SeriesInstanceUID, series_item.ReferencedSOPSequence = (
            image.SeriesInstanceUID,
            [_sop_reference(image)],
        )
        study_item = Dataset()
        study_item.StudyInstanceUID, study_item.ReferencedSeriesSequence = image.StudyInstanceUID, [series_item]
        evidence.append(study_item)
    sr.CurrentRequestedProcedureEvidenceSequence = evidence
    return sr


# RectangleROI handles are [top-left, top-right, bottom-left, bottom-right]; the polyline goes 0, 1, 3, 2, 0.
OHIF_RECTANGLE = [5.5, 6.0, 17.25, 6.0, 17.25, 20.0, 5.5, 20.0, 5.5, 6.0]


def test_ohif_fixture_is_a_valid_sr(ct_series, tmp_path, dciodvfy_errors) -> None:
    path = tmp_path / "ohif.dcm"
    ohif_sr(ct_series, [(1, "POLYLINE", OHIF_RECTANGLE, "nodule")]).save_as(path, write_like_original=False)
    assert dciodvfy_errors(path) == []


def test_reads_ohif_rectangle_with_comment_label(ct_series, tmp_path) -> None:
    sr = _save_and_reload(ohif_sr(ct_series, [(1, "POLYLINE", OHIF_RECTANGLE, "nodule")]), tmp_path / "ohif.dcm")
    (finding,) = read_sr_boxes(sr, ct_series)  # the region repeated under Perimeter and Area counts once
    assert finding.k == 1 and finding.label == "nodule" and finding.score is None and finding.text == ""
    assert (finding.box.x1, finding.box.y1, finding.box.x2, finding.box.y2) == (5.5, 6.0, 17.25, 20.0)


@pytest.mark.filterwarnings("ignore:The value length")  # OHIF's 19-character code value breaks the SH limit
def test_reads_legacy_ohif_free_text_label_and_ellipses(ct_series, tmp_path) -> None:
    ellipse = [10.0, 15.0, 20.0, 15.0, 15.0, 12.0, 15.0, 18.0]  # major axis end points, then minor axis end points
    groups = [(0, "POLYLINE", OHIF_RECTANGLE, "cyst"), (5, "ELLIPSE", ellipse, "mass")]
    sr = _save_and_reload(ohif_sr(ct_series, groups, legacy=True), tmp_path / "ohif.dcm")
    rectangle, oval = read_sr_boxes(sr, ct_series)
    assert (rectangle.k, rectangle.label) == (0, "cyst")
    assert (oval.k, oval.label) == (5, "mass")
    assert (oval.box.x1, oval.box.y1, oval.box.x2, oval.box.y2) == (10.0, 12.0, 20.0, 18.0)


def test_circles_and_freehand_are_boxes_lines_and_points_are_skipped(ct_series, tmp_path, caplog) -> None:
    """OHIF's other 2D tools: CircleROI (CIRCLE: centre, a point on the circle) and PlanarFreehandROI (closed
    POLYLINE) outline areas; Length (2-point POLYLINE) and ArrowAnnotate / Probe (POINT) do not."""
    freehand = [10.0, 10.0, 14.0, 8.0, 18.0, 12.0, 15.0, 17.0, 11.0, 15.0, 10.0, 10.0]
    groups = [(0, "CIRCLE", [20.0, 15.0, 23.0, 19.0], "cyst"), (2, "POLYLINE", freehand, "mass"),
              (3, "POLYLINE", [5.0, 5.0, 9.0, 9.0], "length"), (4, "POINT", [7.0, 7.0], "arrow")]  # fmt: skip
    sr = _save_and_reload(ohif_sr(ct_series, groups), tmp_path / "ohif.dcm")
    with caplog.at_level(logging.WARNING):
        circle, polygon = read_sr_boxes(sr, ct_series)
    assert (circle.k, circle.label) == (0, "cyst")
    assert (circle.box.x1, circle.box.y1, circle.box.x2, circle.box.y2) == (15.0, 10.0, 25.0, 20.0)  # radius 5
    assert (polygon.k, polygon.label) == (2, "mass")
    assert (polygon.box.x1, polygon.box.y1, polygon.box.x2, polygon.box.y2) == (10.0, 8.0, 18.0, 17.0)
    assert "skipping a POLYLINE region of 4 numbers ('length')" in caplog.text
    assert "skipping a POINT region of 2 numbers ('arrow')" in caplog.text


ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"


@pytest.mark.filterwarnings("ignore:The value length")
@pytest.mark.parametrize("scheme", ["CORNERSTONEJS", "CORNERSTONEFREETEXT"])
def test_reads_enhanced_sr_label_from_free_text_finding_site(ct_series, tmp_path, scheme) -> None:
    ellipse = [10.0, 15.0, 20.0, 15.0, 15.0, 12.0, 15.0, 18.0]
    groups = [(2, "POLYLINE", OHIF_RECTANGLE, "cyst"), (4, "ELLIPSE", ellipse, "hemorrhage")]
    sr = ohif_sr(ct_series, groups, site_scheme=scheme, sop_class=ENHANCED_SR)
    sr = _save_and_reload(sr, tmp_path / "ohif.dcm")
    assert sr.SOPClassUID == ENHANCED_SR
    rectangle, oval = read_sr_boxes(sr, ct_series)
    assert (rectangle.k, rectangle.label, rectangle.box.x1, rectangle.box.y2) == (2, "cyst", 5.5, 20.0)
    assert (oval.k, oval.label, oval.box.x1, oval.box.y1) == (4, "hemorrhage", 10.0, 12.0)


def test_a_coded_finding_site_organ_is_not_taken_for_the_label(ct_series, tmp_path) -> None:
    sr = ohif_sr(ct_series, [(1, "POLYLINE", OHIF_RECTANGLE, None)])
    group = next(i for i in _walk(sr) if i.ValueType == "CONTAINER" and _named(i, "125007"))
    group.ContentSequence.append(
        _item("HAS CONCEPT MOD", "CODE", _code("363698007", "SCT", "Finding Site"),
              ConceptCodeSequence=[_code("10200004", "SCT", "Liver")])
    )  # fmt: skip
    (finding,) = read_sr_boxes(_save_and_reload(sr, tmp_path / "ohif.dcm"), ct_series)
    assert finding.label == ""


def test_regions_on_other_series_are_skipped_with_a_warning(ct_series, tmp_path, caplog) -> None:
    sr = ohif_sr(ct_series, [(1, "POLYLINE", OHIF_RECTANGLE, "nodule")])
    scoords = [i for i in _walk(sr) if i.ValueType == "SCOORD"]
    for scoord in scoords:
        scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    with caplog.at_level(logging.WARNING):
        assert read_sr_boxes(sr, ct_series) == []
    assert "not in this series" in caplog.text
    for scoord in scoords:
        scoord.ContentSequence = []
    with pytest.raises(ValueError, match="no IMAGE"):
        read_sr_boxes(sr, ct_series)
    for scoord in scoords:
        scoord.GraphicData = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="malformed GraphicData"):
        read_sr_boxes(sr, ct_series)


def test_report_is_comprehensive_sr_with_cornerstone_tracking(report_path) -> None:
    """OHIF 3.x draws Comprehensive SR (not 3D SR) regions on their slice and takes over Cornerstone's own ids."""
    sr = pydicom.dcmread(report_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    groups = [i for i in _walk(sr) if i.ValueType == "CONTAINER" and _named(i, "125007")]
    trackers = [str(i.TextValue) for g in groups for i in g.ContentSequence if _named(i, "112039")]
    assert trackers and set(trackers) == {"Cornerstone3DTools@^0.1.0:RectangleROI"}
    algorithms = [str(i.TextValue) for g in groups for i in _walk(g) if _named(i, "111001")]  # Algorithm Name
    assert len(algorithms) == len(groups)


def test_each_group_s_first_num_is_inferred_from_its_rectangle(report_path) -> None:
    """What Cornerstone's adapter needs to hand a rectangle to OHIF's RectangleROI tool (getSetupMeasurementData
    reads the SCOORD under the group's first NUM): the same rectangle on the same image as the group's region."""
    sr = pydicom.dcmread(report_path)
    groups = [i for i in _walk(sr) if i.ValueType == "CONTAINER" and _named(i, "125007")]
    for group in groups:
        first_num = next(i for i in group.ContentSequence if i.ValueType == "NUM")
        (inferred,) = first_num.ContentSequence
        region = next(i for i in group.ContentSequence if i.ValueType == "SCOORD")
        assert (inferred.RelationshipType, inferred.ValueType) == ("INFERRED FROM", "SCOORD")
        assert list(inferred.GraphicData) == list(region.GraphicData)
        (image,) = inferred.ContentSequence
        assert image.RelationshipType == "SELECTED FROM"
        assert (
            image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        )


def test_our_sr_is_model_output_and_ohif_sr_is_a_correction(report_path, ct_series) -> None:
    assert is_model_output(pydicom.dcmread(report_path))
    assert not is_model_output(ohif_sr(ct_series, [(1, "POLYLINE", OHIF_RECTANGLE, "cyst")], sop_class=ENHANCED_SR))


# --- What OHIF 3.10 really writes -----------------------------------------------------------------------------
# tests/annotations/data/ohif-3.10-rectangle-ellipse.dcm was made by OHIF itself, not by hand: OHIF 3.10 as the
# monailabel wheel serves it, in headless Chromium, drawing with the mouse on the `ct_series` CT above (same seed,
# same UIDs) and pressing "Create SR"; `python -m tests.e2e.make_ohif_sr_fixture` (tests/e2e/) made it and makes
# it again. What it drew: a RectangleROI from pixel (5.5, 6) to (17.25, 20) on slice 1 labelled
# "ring-enhancing lesion", and an EllipticalROI dragged from its centre (14, 14) to (20, 18) on slice 4 labelled
# "cyst". Mouse positions land on screen pixels, about 0.03 image pixels apart at that zoom.
OHIF_310_SR = Path(__file__).parent / "data" / "ohif-3.10-rectangle-ellipse.dcm"


@pytest.mark.filterwarnings("ignore:The value length")  # OHIF's CORNERSTONEFREETEXT code values
def test_reads_the_sr_ohif_3_10_wrote(ct_series) -> None:
    sr = pydicom.dcmread(OHIF_310_SR)
    assert sr.SOPClassUID == ENHANCED_SR and not is_model_output(sr)
    rectangle, ellipse = read_sr_boxes(sr, ct_series)
    # the label is the free-text Finding Site's CodeMeaning, whole (21 characters; a code value holds 16)
    assert (rectangle.k, rectangle.label, rectangle.score, rectangle.text) == (1, "ring-enhancing lesion", None, "")
    got = [rectangle.box.x1, rectangle.box.y1, rectangle.box.x2, rectangle.box.y2]
    assert got == pytest.approx([5.5, 6.0, 17.25, 20.0], abs=0.1)
    assert (ellipse.k, ellipse.label) == (4, "cyst")
    got = [ellipse.box.x1, ellipse.box.y1, ellipse.box.x2, ellipse.box.y2]
    assert got == pytest.approx([8.0, 10.0, 20.0, 18.0], abs=0.1)  # centre (14, 14), half-axes 6 and 4
