"""DICOM SR TID 1500 Measurement Reports: model findings for OHIF, and OHIF's rectangles back as boxes.

Writing (highdicom): one TID 1410 planar ROI measurement group per finding. Its image region is a closed SCOORD
POLYLINE rectangle (5 points, first = last) on the source instance of slice ``k``, in that instance's pixel
coordinates, which are our edge coordinates (docs/conventions.md). The group carries the finding as a code
(SNOMED CT when the label names one, else "Lesion"), the exact label as a DCM "Comment" TEXT (the item OHIF 3.x
shows and writes as a measurement's label), the finding sentence as "Selected Region Description", the model's
confidence as a DCM "Probability" NUM and the rectangle's area. The Area NUM is also INFERRED FROM a copy of the
rectangle (TID 300): Cornerstone's adapter, through which OHIF hands a rectangle to its RectangleROI tool for a
reader to edit, reads the region of a group's first NUM and fails on a group without one. OHIF shows none of the
text items by itself; the OHIF that this app serves shows them through its configuration (app/ohif.py).
Study-level diagnoses and the model's reasoning go in TID 1500's "Qualitative Evaluations" container as TEXT items.

Reading: any TID 1500 report whose measurement groups hold 2D SCOORD regions, ours or what OHIF 3.x writes for a
RectangleROI. OHIF writes (cornerstone3D ``packages/adapters/src/adapters/Cornerstone3D/RectangleROI.ts`` with
dcmjs ``src/utilities/TID300/Polyline.js``): a Measurement Group with Tracking Identifier
"Cornerstone3DTools@^0.1.0:RectangleROI", optional Finding / Finding Site codes (OHIF 3.x: the typed label as
a Finding Site (SCT 363698007) code of scheme / value ``CORNERSTONEFREETEXT``, older versions as a Finding),
NUM Perimeter and NUM Area each INFERRED FROM the same SCOORD POLYLINE of 5 points (corners 0, 1, 3, 2, 0)
SELECTED FROM the IMAGE, and the label as a DCM "Comment" TEXT (``LabelData.ts``).
Ellipses, circles and freehand polygons are read as their bounding boxes; regions that outline no area (OHIF's
Length and Bidirectional lines, arrows, probes) are skipped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from monailabel_evlf.annotations.dicom_common import (
    anatomy_concept,
    finding_concept,
    is_model_output,
    order_slices,
    slice_uids,
)
from monailabel_evlf.annotations.provenance import MODEL, BoxOrigin, match_origins, model_identity
from monailabel_evlf.imaging.geometry import Box2D, VoxelBox

logger = logging.getLogger(__name__)

QUALITATIVE_EVALUATIONS = CodedConcept(value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations")
DIAGNOSIS = codes.DCM.DifferentialDiagnosisImpression
REASONING = codes.DCM.NarrativeSummary
FINDING_TEXT = codes.DCM.SelectedRegionDescription
CONFIDENCE = codes.DCM.Probability
# what Cornerstone3D's RectangleROI tool writes and OHIF 3.x needs to take a measurement over ("rehydrate") it
OHIF_RECTANGLE_TRACKING = "Cornerstone3DTools@^0.1.0:RectangleROI"
_FREE_TEXT_CODE_VALUES = {"CORNERSTONEFREETEXT", "CS3DTEXT"}  # how OHIF / cornerstone code a typed label


class SliceFinding(NamedTuple):
    """A finding drawn on one slice: slice index ``k``, the box in that slice's pixels (x = column), and text."""

    k: int
    box: Box2D
    label: str
    score: float | None = None
    text: str = ""
    origin: BoxOrigin | None = None  # set by read_sr_boxes: the model's, or a person's (None: not known)


def _rectangle(box: Box2D) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in (box.x1, box.y1, box.x2, box.y2))
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=float)


def _check_box(finding: SliceFinding, image: Dataset, n: int) -> None:
    if not finding.label:
        raise ValueError(f"finding {n}: a finding needs a label")
    box = finding.box
    coords = np.array([box.x1, box.y1, box.x2, box.y2], dtype=float)
    if not np.all(np.isfinite(coords)) or box.x2 <= box.x1 or box.y2 <= box.y1:
        raise ValueError(f"finding {n}: box {coords.tolist()} is empty or not finite")
    if box.x1 < 0 or box.y1 < 0 or box.x2 > image.Columns or box.y2 > image.Rows:
        raise ValueError(
            f"finding {n}: box {coords.tolist()} leaves the {image.Columns} x {image.Rows} image of slice {finding.k}"
        )


def _text(name: CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _region_of(box: Box2D, image: Dataset, relationship: hd.sr.RelationshipTypeValues) -> hd.sr.ScoordContentItem:
    """The rectangle as an SCOORD POLYLINE SELECTED FROM its image."""
    region = hd.sr.ScoordContentItem(
        name=codes.DCM.ImageRegion,
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_rectangle(box),
        relationship_type=relationship,
    )
    region.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.ImageContentItem(
                name=codes.DCM.SourceOfMeasurement,
                referenced_sop_class_uid=image.SOPClassUID,
                referenced_sop_instance_uid=image.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.SELECTED_FROM,
            )
        ]
    )
    return region


def _measurement_group(
    n: int, finding: SliceFinding, image: Dataset, site: str, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_rectangle(finding.box),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=image.SOPClassUID, referenced_sop_instance_uid=image.SOPInstanceUID
        ),
    )
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    box = finding.box
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Area,
            value=float((box.x2 - box.x1) * column_spacing * (box.y2 - box.y1) * row_spacing),
            unit=codes.UCUM.SquareMillimeter,
        )
    ]
    if finding.score is not None:
        measurements.append(hd.sr.Measurement(name=CONFIDENCE, value=float(finding.score), unit=codes.UCUM.NoUnits))
    site_concept = anatomy_concept(site) if site else None
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier=OHIF_RECTANGLE_TRACKING, uid=generate_uid()),
        referenced_region=region,
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        finding_type=finding_concept(finding.label),
        finding_sites=[hd.sr.FindingSite(site_concept)] if site_concept else None,
        algorithm_id=algorithm,
        measurements=measurements,
    )
    # OHIF takes a rectangle over for editing through Cornerstone's adapter, which reads the region of the group's
    # first NUM (TID 300: NUM INFERRED FROM SCOORD), not the TID 1410 region above it: the Area NUM gets a copy.
    area = next(item for item in group[0].ContentSequence if item.ValueType == "NUM")
    inferred_from = _region_of(finding.box, image, hd.sr.RelationshipTypeValues.INFERRED_FROM)
    area.ContentSequence = hd.sr.ContentSequence([inferred_from])
    group[0].ContentSequence.append(_text(codes.DCM.Comment, finding.label))
    if finding.text:
        group[0].ContentSequence.append(_text(FINDING_TEXT, finding.text))
    return group


def write_measurement_report(
    findings: Sequence[SliceFinding],
    series_datasets: Sequence[Dataset],
    *,
    diagnosis: Sequence[str] = (),
    reasoning: str = "",
    sites: Sequence[str] | None = None,
    slice_uid_order: Sequence[str] | None = None,
    algorithm_name: str = "EVLF",
    algorithm_version: str = "0",
    series_number: int = 9001,
    series_description: str = "EVLF findings",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR (``...88.33``) TID 1500 Measurement Report of ``findings`` on the source series.

    Comprehensive SR, not Comprehensive 3D SR: OHIF 3.x sends ``...88.34`` to a 3D handler that draws nothing on
    a slice. Each group's Tracking Identifier is the one Cornerstone's RectangleROI tool writes, so OHIF can hand
    the rectangle to that tool for a reader to edit; the group's Algorithm Identification (model id, adapter
    version) and the Device observer keep the provenance.

    ``findings[i].k`` is the slice index: the instance at position ``k`` of ``slice_uid_order`` (e.g.
    ``Volume.meta["sop_instance_uids"]``) or, by default, of :func:`order_slices`. ``sites`` are organ names per
    finding (finding sites when they name a SNOMED CT concept). Boxes must lie inside their image.
    Save with ``report.save_as(path)``.
    """
    if sites is not None and len(sites) != len(findings):
        raise ValueError(f"got {len(sites)} sites for {len(findings)} findings")
    ordered = order_slices(series_datasets)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in ordered}
    uids = list(slice_uid_order) if slice_uid_order is not None else list(by_uid)
    if unknown := [uid for uid in uids if uid not in by_uid]:
        raise ValueError(f"slice_uid_order names {len(unknown)} instances not in the series, e.g. {unknown[0]}")
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    groups = []
    for n, finding in enumerate(findings):
        if not 0 <= finding.k < len(uids):
            raise ValueError(f"finding {n}: slice {finding.k} is outside the series' {len(uids)} slices")
        image = by_uid[uids[finding.k]]
        _check_box(finding, image, n)
        groups.append(_measurement_group(n, finding, image, sites[n] if sites else "", algorithm))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=algorithm_name, model_name=algorithm_version
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion
        if ordered[0].Modality == "CT"
        else codes.DCM.ImagingProcedure,
        imaging_measurements=groups,
    )
    evaluations = [_text(DIAGNOSIS, label) for label in diagnosis]
    if reasoning:
        evaluations.append(_text(REASONING, reasoning))
    if evaluations:
        container = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        container.ContentSequence = hd.sr.ContentSequence(evaluations)
        report[0].ContentSequence.append(container)
    return hd.sr.ComprehensiveSR(
        evidence=ordered,
        content=report[0],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer="monailabel-evlf",
        series_description=series_description,
        is_complete=True,
    )


def _items(dataset: Dataset) -> Iterator[Dataset]:
    yield from dataset.get("ContentSequence", [])


def _walk(dataset: Dataset) -> Iterator[Dataset]:
    for item in _items(dataset):
        yield item
        yield from _walk(item)


def _is(item: Dataset, code: CodedConcept | Code) -> bool:
    names = item.get("ConceptNameCodeSequence", [])
    return bool(names) and (names[0].CodeValue, names[0].CodingSchemeDesignator) == (
        code.value,
        code.scheme_designator,
    )


def _region_bounds(item: Dataset) -> np.ndarray | None:
    """``[x1, y1, x2, y2]`` of a 2D SCOORD region; ``None`` for points."""
    data = np.asarray(item.get("GraphicData", []), dtype=float)
    if data.size % 2 or not np.all(np.isfinite(data)):
        raise ValueError(f"an SR {item.get('GraphicType')} region has malformed GraphicData {data.tolist()}")
    points = data.reshape(-1, 2)
    kind = item.GraphicType
    if kind in ("POLYLINE", "POLYGON") and len(points) >= 3:
        lo, hi = points.min(axis=0), points.max(axis=0)
    elif kind == "ELLIPSE" and len(points) == 4:
        center = points[:2].mean(axis=0)
        # half-axes a (major) and b (minor); an ellipse's half extent along x is sqrt(a_x^2 + b_x^2)
        half = np.sqrt((points[0] - center) ** 2 + (points[2] - center) ** 2)
        lo, hi = center - half, center + half
    elif kind == "CIRCLE" and len(points) == 2:
        radius = float(np.linalg.norm(points[1] - points[0]))
        lo, hi = points[0] - radius, points[0] + radius
    else:
        return None
    return np.concatenate([lo, hi])


def _group_text(group: Dataset) -> tuple[str, float | None, str]:
    label = text = ""
    finding_meaning = free_label = ""
    score = None
    for item in _items(group):
        if item.ValueType == "TEXT" and _is(item, codes.DCM.Comment):
            label = label or str(item.TextValue)
        elif item.ValueType == "TEXT" and _is(item, FINDING_TEXT):
            text = str(item.TextValue)
        elif item.ValueType == "CODE" and (_is(item, codes.DCM.Finding) or _is(item, codes.SCT.FindingSite)):
            concept = item.ConceptCodeSequence[0]
            free_text = {str(concept.get("CodeValue", "")), str(concept.get("CodingSchemeDesignator", ""))}
            if free_text & _FREE_TEXT_CODE_VALUES:  # a label typed into OHIF / Cornerstone
                free_label = free_label or str(concept.CodeMeaning)
            elif _is(item, codes.DCM.Finding) and not finding_meaning:
                finding_meaning = str(concept.CodeMeaning)
        elif item.ValueType == "NUM" and _is(item, CONFIDENCE) and item.get("MeasuredValueSequence"):
            score = float(item.MeasuredValueSequence[0].NumericValue)
    return label or free_label or finding_meaning, score, text


def _measurement_groups(sr: Dataset) -> list[Dataset]:
    if sr.get("Modality") != "SR" or "ContentSequence" not in sr:
        raise ValueError("not a DICOM SR document (Modality SR with a content tree expected)")
    containers = [i for i in _walk(sr) if i.ValueType == "CONTAINER" and _is(i, codes.DCM.ImagingMeasurements)]
    if not containers:
        raise ValueError("the SR has no 'Imaging Measurements' container; is it a TID 1500 Measurement Report?")
    return [
        i for c in containers for i in _items(c) if i.ValueType == "CONTAINER" and _is(i, codes.DCM.MeasurementGroup)
    ]


def read_sr_boxes(
    sr_dataset: Dataset, series: Sequence[Dataset] | Sequence[str], model_report: Dataset | None = None
) -> list[SliceFinding]:
    """Every 2D region of a TID 1500 report (ours or OHIF's) as ``(k, Box2D, label, score, text, origin)``.

    ``series`` gives the slice order: the source series' datasets (ordered by :func:`order_slices`) or the
    SOPInstanceUID of each slice ``k`` (``Volume.meta["sop_instance_uids"]``). Regions on instances outside
    this series are skipped with a warning, as are 3D (SCOORD3D) regions; regions without an image reference
    raise ``ValueError``.

    ``origin`` (:mod:`~monailabel_evlf.annotations.provenance`): in a report this package wrote, every box is
    the model's (with its group's model id and adapter version). In anyone else's report (OHIF's "Create SR"),
    given ``model_report`` (the study's newest AI SR), a box is "model, unchanged" when that report has a box
    with the same label on the same instance with IoU >= 0.99, else "human"; without ``model_report`` it is
    ``None`` (nothing in such a report links a box back to the model).
    """
    k_of = {uid: k for k, uid in enumerate(slice_uids(series))}
    ours = is_model_output(sr_dataset)
    findings = []
    for group in _measurement_groups(sr_dataset):
        label, score, text = _group_text(group)
        origin = BoxOrigin(MODEL, *model_identity(group), iou=1.0) if ours else None
        seen = set()
        for item in _walk(group):
            if item.ValueType == "SCOORD3D":
                logger.warning("skipping a SCOORD3D region: only regions drawn on an image are read")
            if item.ValueType != "SCOORD":
                continue
            if (bounds := _region_bounds(item)) is None:
                # OHIF's Length, Bidirectional axes (2-point polylines), ArrowAnnotate and Probe (points)
                logger.warning(
                    "skipping a %s region of %d numbers (%r): it outlines no area, so it is no box",
                    item.GraphicType,
                    len(item.get("GraphicData", [])),
                    label,
                )
                continue
            images = [i for i in _items(item) if i.ValueType == "IMAGE"]
            if not images:
                raise ValueError("an SR region (SCOORD) has no IMAGE it was selected from")
            uid = str(images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if (uid, tuple(bounds)) in seen:  # OHIF repeats the region under Perimeter and Area
                continue
            seen.add((uid, tuple(bounds)))
            if uid not in k_of:
                logger.warning("skipping a region on instance %s, which is not in this series", uid)
                continue
            x1, y1, x2, y2 = (float(v) for v in bounds)
            box = Box2D(x1=x1, y1=y1, x2=x2, y2=y2, label=label, score=score)
            findings.append(SliceFinding(k=k_of[uid], box=box, label=label, score=score, text=text, origin=origin))
    if model_report is not None and not ours:
        model_findings = read_sr_boxes(model_report, series)
        name, version = model_identity(model_report)
        origins = match_origins([_slab(f) for f in findings], [_slab(f) for f in model_findings], name, version)
        findings = [f._replace(origin=o) for f, o in zip(findings, origins, strict=True)]
    return findings


def _slab(finding: SliceFinding) -> VoxelBox:
    """A rectangle on slice ``k`` as the one-slice voxel box it outlines (what provenance compares)."""
    box = finding.box
    return VoxelBox(lo=(box.x1, box.y1, finding.k), hi=(box.x2, box.y2, finding.k + 1), label=finding.label)


def read_sr_summary(sr_dataset: Dataset) -> tuple[list[str], str]:
    """The study-level ``(diagnoses, reasoning)`` TEXT items of a report written by :func:`write_measurement_report`."""
    diagnosis, reasoning = [], ""
    for item in _walk(sr_dataset):
        if item.ValueType == "CONTAINER" and _is(item, QUALITATIVE_EVALUATIONS):
            for text in _items(item):
                if text.ValueType == "TEXT" and _is(text, DIAGNOSIS):
                    diagnosis.append(str(text.TextValue))
                elif text.ValueType == "TEXT" and _is(text, REASONING):
                    reasoning = str(text.TextValue)
    return diagnosis, reasoning
