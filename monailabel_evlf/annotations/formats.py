"""One record per annotation format: which files are it, how the app writes boxes in it, reads it back and checks it.

3D Slicer ROI markups JSON, label maps (NIfTI / NRRD), DICOM SR (TID 1500 rectangles) and DICOM SEG: the grounding
output (``app/outputs.py``), the label reader of the train task (``app/labels.py``) and the datastore's upload
checks (``app/datastore.py``) look a format up here instead of each dispatching on file suffixes. SR and SEG share
``.dcm`` and are told apart by the DICOM Modality. All boxes are voxel boxes in the image's edge coordinates
(docs/conventions.md), so every format reads into the same training samples.

A label the app cannot use raises :class:`LabelRefused` (a ``ValueError``) carrying the HTTP status the datastore
answers with, so a reader that only wants boxes sees a ``ValueError`` and an upload gets a 4xx with the reason.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from fastapi import HTTPException
from pydicom import Dataset

from monailabel_evlf.annotations.dicom_seg import read_segmentation_boxes, write_segmentation
from monailabel_evlf.annotations.dicom_sr import SliceFinding, read_sr_boxes, write_measurement_report
from monailabel_evlf.annotations.labelmaps import boxes_to_labelmap, label_values, labelmap_to_boxes, save_labelmap
from monailabel_evlf.annotations.provenance import HUMAN, BoxOrigin, match_origins, model_identity
from monailabel_evlf.annotations.slicer_markups import read_roi_markups, write_roi_markups
from monailabel_evlf.app.security import Limits, check_volume_file
from monailabel_evlf.imaging.geometry import Box2D, VoxelBox, voxel_box_to_world, world_box_to_voxel
from monailabel_evlf.imaging.volume import Volume, load_volume

_AFFINE_ATOL_MM = 1e-3


class LabelRefused(ValueError):
    """A label the app cannot use; ``status`` is the HTTP answer to an upload of it (422, or 413 for size)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Annotation:
    """What a writer gets: boxes on the image grid, each box's reasoning, the study's answer and provenance."""

    boxes: Sequence[VoxelBox]
    volume: Volume
    texts: Sequence[str] = ()  # the model's reasoning for each box (empty: none)
    diagnosis: Sequence[str] = ()
    reasoning: str = ""
    algorithm_name: str = "EVLF"
    algorithm_version: str = "0"
    series: Sequence[Dataset] = ()  # the DICOM source instances; SR / SEG reference them

    def text(self, number: int) -> str:
        return self.texts[number] if number < len(self.texts) else ""


@dataclass(frozen=True)
class LabelCheck:
    """What an uploaded label is checked against: its image and the app's findings (``targets``)."""

    image_path: str  # a volume file, a DICOM series folder, or "" when the image is not at hand
    targets: Sequence[str]
    limits: Limits = field(default_factory=Limits)

    @cached_property
    def image(self) -> Volume | None:
        """The image when it is a volume file (loaded only by the checks that compare geometry)."""
        return load_volume(self.image_path) if self.image_path and os.path.isfile(self.image_path) else None


@dataclass(frozen=True)
class AnnotationFormat:
    """A format the app writes (grounding ``output``) and reads back as a label.

    File formats have ``write`` (an :class:`Annotation` to a path; returns extra result-JSON fields), DICOM
    formats ``encode`` (an :class:`Annotation` as a dataset the caller stores through STOW-RS or saves).
    ``read`` gives a saved label's voxel boxes on ``volume`` (``names``: label-map values -> label names);
    ``check`` raises :class:`LabelRefused` unless training can use the label on its image."""

    output: str  # the grounding task's ``output`` value
    title: str  # for messages
    suffixes: tuple[str, ...]  # file-name endings; the first is the one the app writes
    read: Callable[[Path, Volume, Mapping[int, str] | None], list[VoxelBox]]
    check: Callable[[Path, LabelCheck], None]
    write: Callable[[Annotation, Path], dict[str, Any]] | None = None
    encode: Callable[[Annotation], Dataset] | None = None
    modality: str | None = None  # DICOM Modality: tells formats sharing ``.dcm`` apart
    decode: Callable[[Dataset, Volume], list[VoxelBox]] | None = None  # DICOM formats: ``read`` of a dataset


# -- 3D Slicer ROI markups JSON ----------------------------------------------------------------------------------


def _write_markups(annotation: Annotation, path: Path) -> dict[str, Any]:
    """One ROI per box on the image grid; the description is what a Slicer user reads: label and reasoning."""
    affine = annotation.volume.affine
    descriptions = []
    for n, box in enumerate(annotation.boxes):
        label = box.label or "finding"
        descriptions.append(f"{label}: {annotation.text(n)}" if annotation.text(n) else label)
    write_roi_markups([voxel_box_to_world(b, affine) for b in annotation.boxes], path, descriptions=descriptions)
    return {}


def _read_markups(path: Path, volume: Volume, names: Mapping[int, str] | None = None) -> list[VoxelBox]:
    return [world_box_to_voxel(box, volume.affine) for box in read_roi_markups(path)]


def _check_markups(path: Path, against: LabelCheck) -> None:
    limits, targets, image = against.limits, against.targets, against.image
    if path.stat().st_size > limits.max_json_bytes:
        raise LabelRefused(f"markups JSON larger than {limits.max_json_bytes} bytes", 413)
    try:
        boxes = read_roi_markups(path)
    except (ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as exc:
        raise LabelRefused(f"malformed 3D Slicer markups JSON: {exc}") from None
    if len(boxes) > limits.max_rois:
        raise LabelRefused(f"{len(boxes)} ROIs in one label; the limit is {limits.max_rois}")
    known = {t.lower(): t for t in targets}
    for n, box in enumerate(boxes, 1):
        if not box.label or box.label.strip().lower() not in known:
            raise LabelRefused(f"ROI {n} has finding label {box.label!r}; name each ROI one of: {', '.join(targets)}")
        if np.any(box.size <= 0):
            raise LabelRefused(f"ROI {n} ({box.label}) has zero size {box.size.tolist()}")
        if image is not None:
            voxel = world_box_to_voxel(box, image.affine)
            if np.any(np.asarray(voxel.hi) <= 0) or np.any(np.asarray(voxel.lo) >= np.asarray(image.shape)):
                raise LabelRefused(f"ROI {n} ({box.label}) lies outside the image")


MARKUPS = AnnotationFormat(
    output="markups",
    title="3D Slicer ROI markups",
    suffixes=(".json",),
    write=_write_markups,
    read=_read_markups,
    check=_check_markups,
)


# -- label maps (NIfTI / NRRD on the image grid) -----------------------------------------------------------------


def _write_labelmap(annotation: Annotation, path: Path) -> dict[str, Any]:
    """Each box filled with its label's value; the result JSON names the values."""
    shape = annotation.volume.array.shape
    boxes = annotation.boxes
    if boxes:
        labelmap, names = boxes_to_labelmap(boxes, shape, label_values([b.label or "finding" for b in boxes]))
    else:
        labelmap, names = np.zeros(shape, dtype=np.int16), {}
    save_labelmap(labelmap, annotation.volume.affine, path)
    return {"label_names": {str(k): v for k, v in names.items()}}


def _read_labelmap(path: Path, volume: Volume, names: Mapping[int, str] | None = None) -> list[VoxelBox]:
    labelmap = load_volume(path, dtype="int16")
    if labelmap.shape != volume.shape:
        raise ValueError(f"label map {path.name} has shape {labelmap.shape}, the image {volume.shape}")
    return labelmap_to_boxes(labelmap.array, names)


def _check_labelmap(path: Path, against: LabelCheck) -> None:
    targets, image = against.targets, against.image
    try:
        check_volume_file(path, against.limits)
    except HTTPException as exc:
        raise LabelRefused(f"unreadable label map: {exc.detail}", exc.status_code) from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        kind = nib.load(path).header.get_data_dtype().kind
        if kind not in "iub":
            raise LabelRefused("a label map must hold integers (its data type is floating point)")
    try:
        label = load_volume(path, dtype=np.float64)
    except Exception as exc:  # ITK raises RuntimeError on corrupt files, ValueError on non-3D
        raise LabelRefused(f"unreadable label map ({type(exc).__name__})") from None
    values = label.array
    if not np.array_equal(values, np.round(values)):
        raise LabelRefused("a label map must hold integers")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > len(targets):
        raise LabelRefused(f"label values must lie in 0..{len(targets)} (one per finding), got {low:g}..{high:g}")
    if image is not None:
        if label.shape != image.shape:
            raise LabelRefused(f"label map shape {label.shape} does not match the image's {image.shape}")
        if not np.allclose(label.affine, image.affine, atol=_AFFINE_ATOL_MM):
            raise LabelRefused("label map geometry (origin, spacing, directions) does not match the image")


LABELMAP = AnnotationFormat(
    output="labelmap",
    title="a label map",
    suffixes=(".nii.gz", ".nii", ".nrrd"),
    write=_write_labelmap,
    read=_read_labelmap,
    check=_check_labelmap,
)


# -- DICOM SR and SEG (they reference the source series, so they need a DICOM image) ------------------------------


def _slice_uids(volume: Volume) -> list[str]:
    uids = volume.meta.get("sop_instance_uids")
    if not uids:
        raise ValueError("a DICOM SR / SEG label needs its image loaded from the DICOM series it references")
    return list(uids)


def _check_dicom(path: Path, against: LabelCheck) -> None:
    # the Modality was read to find this format; what is left is whether the image can be referenced at all
    if not os.path.isdir(against.image_path):
        raise LabelRefused("a DICOM SR / SEG label needs a DICOM study; this image is a volume file")


def box_to_slice_finding(box: VoxelBox, reasoning: str = "") -> SliceFinding:
    """A 3D box as one SR rectangle on its central slice ``k`` (DICOM pixel (column, row) = voxel (i, j))."""
    k = math.floor((float(box.lo[2]) + float(box.hi[2])) / 2)
    rect = Box2D(
        float(box.lo[0]), float(box.lo[1]), float(box.hi[0]), float(box.hi[1]), label=box.label, score=box.score
    )
    return SliceFinding(k=k, box=rect, label=box.label or "finding", score=box.score, text=reasoning)


def slice_finding_to_box(finding: SliceFinding) -> VoxelBox:
    """An SR rectangle on instance ``k`` as the voxel box it outlines: one slice thick (the inverse of
    :func:`box_to_slice_finding` in-plane; the SR does not say how far a finding reaches through the slices)."""
    box = finding.box
    return VoxelBox(
        lo=(box.x1, box.y1, finding.k),
        hi=(box.x2, box.y2, finding.k + 1),
        label=finding.label or None,
        score=finding.score,
    )


def _encode_sr(annotation: Annotation) -> Dataset:
    findings = [box_to_slice_finding(b, annotation.text(n)) for n, b in enumerate(annotation.boxes)]
    return write_measurement_report(
        findings,
        annotation.series,
        diagnosis=annotation.diagnosis,
        reasoning=annotation.reasoning,
        slice_uid_order=_slice_uids(annotation.volume),
        algorithm_name=annotation.algorithm_name,
        algorithm_version=annotation.algorithm_version,
    )


def _decode_sr(dataset: Dataset, volume: Volume) -> list[VoxelBox]:
    return [slice_finding_to_box(f) for f in read_sr_boxes(dataset, _slice_uids(volume))]


def _read_sr(path: Path, volume: Volume, names: Mapping[int, str] | None = None) -> list[VoxelBox]:
    return _decode_sr(pydicom.dcmread(path), volume)


def _encode_seg(annotation: Annotation) -> Dataset:
    return write_segmentation(
        annotation.boxes,
        annotation.series,
        slice_uid_order=_slice_uids(annotation.volume),
        algorithm_name=annotation.algorithm_name,
        algorithm_version=annotation.algorithm_version,
    )


def _decode_seg(dataset: Dataset, volume: Volume) -> list[VoxelBox]:
    return read_segmentation_boxes(dataset, _slice_uids(volume))


def _read_seg(path: Path, volume: Volume, names: Mapping[int, str] | None = None) -> list[VoxelBox]:
    return _decode_seg(pydicom.dcmread(path), volume)


DICOM_SR = AnnotationFormat(
    output="dicom_sr",
    title="a DICOM SR",
    suffixes=(".dcm",),
    modality="SR",
    encode=_encode_sr,
    decode=_decode_sr,
    read=_read_sr,
    check=_check_dicom,
)
DICOM_SEG = AnnotationFormat(
    output="dicom_seg",
    title="a DICOM SEG",
    suffixes=(".dcm",),
    modality="SEG",
    encode=_encode_seg,
    decode=_decode_seg,
    read=_read_seg,
    check=_check_dicom,
)

FORMATS: tuple[AnnotationFormat, ...] = (MARKUPS, LABELMAP, DICOM_SR, DICOM_SEG)


# -- lookups -----------------------------------------------------------------------------------------------------


def for_output(output: str) -> AnnotationFormat | None:
    """The format of a grounding ``output`` value; ``None`` for "json" (the answer is the result JSON alone)."""
    if output == "json":
        return None
    for fmt in FORMATS:
        if fmt.output == output:
            return fmt
    raise ValueError(f"unknown output {output!r}; one of json, {', '.join(f.output for f in FORMATS)}")


def label_suffix(name: str | os.PathLike[str]) -> str:
    """The suffix by which a file name is a label format; :class:`LabelRefused` with 415 for anything else (the
    upload rule of :mod:`monailabel_evlf.app.security`: 415 for a format not read at all, 422 for a bad file)."""
    lowered = Path(name).name.lower()
    for fmt in FORMATS:
        for suffix in fmt.suffixes:
            if lowered.endswith(suffix):
                return suffix
    files = ", ".join(f"{f.title} ({', '.join(f.suffixes)})" for f in FORMATS if f.modality is None)
    dicom = " / ".join(str(f.modality) for f in FORMATS if f.modality)
    raise LabelRefused(f"unsupported label format {Path(name).name[:80]!r}; use {files} or a DICOM {dicom} (.dcm)", 415)


def format_of(path: str | os.PathLike[str]) -> AnnotationFormat:
    """The format of a label file: by its suffix, and for ``.dcm`` by the DICOM Modality in its header."""
    suffix = label_suffix(path)
    candidates = [f for f in FORMATS if suffix in f.suffixes]
    if len(candidates) == 1:
        return candidates[0]
    try:
        modality = pydicom.dcmread(path, stop_before_pixels=True).get("Modality")
    except Exception:  # pydicom raises several error types on truncated files
        raise LabelRefused("unreadable DICOM label") from None
    return for_modality(modality)


def read_boxes(path: str | os.PathLike[str], volume: Volume, names: Mapping[int, str] | None = None) -> list[VoxelBox]:
    """The voxel boxes of a saved label of any format on ``volume``; ``ValueError`` when it cannot be read."""
    return format_of(path).read(Path(path), volume, names)


def for_modality(modality: str | None) -> AnnotationFormat:
    """The DICOM format of a Modality (``SR`` / ``SEG``); :class:`LabelRefused` for any other."""
    for fmt in FORMATS:
        if fmt.modality is not None and fmt.modality == modality:
            return fmt
    wanted = " or ".join(str(f.modality) for f in FORMATS if f.modality)
    raise LabelRefused(f"a DICOM label must be an {wanted}, got modality {modality!r}")


def box_origins(
    path: str | os.PathLike[str], volume: Volume, model_output: Dataset | None
) -> list[tuple[VoxelBox, BoxOrigin]]:
    """Each box of a correction with its origin (:mod:`~monailabel_evlf.annotations.provenance`): "model" when
    ``model_output`` (the newest AI SR / SEG of the study) has it with the same label at IoU >= 0.99 on the same
    slices, with that output's model id and adapter version, else "human" (all of them without a model output)."""
    boxes = read_boxes(path, volume)
    if model_output is None:
        return [(box, BoxOrigin(HUMAN)) for box in boxes]
    model_boxes = for_modality(model_output.get("Modality")).decode(model_output, volume)
    origins = match_origins(boxes, model_boxes, *model_identity(model_output))
    return list(zip(boxes, origins, strict=True))


def check_label(path: str | os.PathLike[str], against: LabelCheck) -> AnnotationFormat:
    """The label's format once it passed that format's checks; :class:`LabelRefused` with the reason otherwise."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise LabelRefused("the label file is empty")
    fmt = format_of(path)
    fmt.check(path, against)
    return fmt
