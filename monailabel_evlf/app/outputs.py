"""Grounding result -> the file a client asked for: Slicer ROI markups, NIfTI label map, DICOM SR / SEG, or none.

DICOM objects reference the source series, so they need a DICOM source (a DICOMweb datastore, or a local DICOM
folder); with a DICOMweb datastore they are stored back through STOW-RS for OHIF and the result JSON names them.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from fastapi import HTTPException

from monailabel_evlf.annotations.dicom_seg import write_segmentation
from monailabel_evlf.annotations.dicom_sr import SliceFinding, write_measurement_report
from monailabel_evlf.annotations.labelmaps import boxes_to_labelmap, label_values, save_labelmap
from monailabel_evlf.annotations.slicer_markups import write_roi_markups
from monailabel_evlf.imaging.geometry import Box2D, VoxelBox
from monailabel_evlf.inference import VolumeResult

logger = logging.getLogger(__name__)


def temp_path(suffix: str) -> Path:
    """A fresh temp file; MONAI Label removes result files once they are sent."""
    handle, name = tempfile.mkstemp(suffix=suffix, prefix="evlf-")
    os.close(handle)
    return Path(name)


def _box_description(result: VolumeResult, number: int) -> str:
    """What a reader sees on the ROI: the label and the model's reasoning for that box."""
    box = result.voxel_boxes[number]
    reasoning = result.box_reasoning(number)
    return f"{box.label or 'finding'}: {reasoning}" if reasoning else box.label or "finding"


def central_slice_finding(box: VoxelBox, reasoning: str = "") -> SliceFinding:
    """A 3D box as one SR rectangle on its central slice ``k`` (DICOM pixel (column, row) = voxel (i, j))."""
    k = math.floor((float(box.lo[2]) + float(box.hi[2])) / 2)
    rect = Box2D(
        float(box.lo[0]), float(box.lo[1]), float(box.hi[0]), float(box.hi[1]), label=box.label, score=box.score
    )
    return SliceFinding(k=k, box=rect, label=box.label or "finding", score=box.score, text=reasoning)


def _source_series(volume) -> list[pydicom.Dataset]:
    source = Path(volume.meta.get("source", ""))
    if not source.is_dir() or not volume.meta.get("sop_instance_uids"):
        raise HTTPException(422, "DICOM SR / SEG output needs a DICOM source series (DICOMweb or a DICOM folder)")
    wanted = set(volume.meta["sop_instance_uids"])
    datasets = []
    for path in sorted(source.rglob("*")):
        if path.is_file():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=False)
            except pydicom.errors.InvalidDicomError:
                continue
            if str(ds.get("SOPInstanceUID", "")) in wanted:
                datasets.append(ds)
    return datasets


def store_dicom(datastore, dataset: pydicom.Dataset) -> dict[str, Any] | None:
    """STOW-RS ``dataset`` when the datastore is DICOMweb; ``None`` otherwise."""
    from monailabel.datastore.dicom import DICOMWebDatastore

    if not isinstance(datastore, DICOMWebDatastore):
        return None
    # MONAI Label's DICOMWebDatastore keeps its dicomweb-client as ``_client`` and has no public store call
    datastore._client.store_instances(datasets=[dataset])
    return {
        "stored": "stow-rs",
        "study_instance_uid": str(dataset.StudyInstanceUID),
        "series_instance_uid": str(dataset.SeriesInstanceUID),
        "sop_instance_uid": str(dataset.SOPInstanceUID),
    }


def write_output(
    output: str, result: VolumeResult, volume, datastore, adapter_version: str
) -> tuple[str | None, dict[str, Any]]:
    """The result file for ``output`` (``None`` when the answer is JSON only) and extra result-JSON fields."""
    boxes = result.voxel_boxes
    if output == "json":
        return None, {}
    if output == "markups":
        path = temp_path(".json")
        descriptions = [_box_description(result, n) for n in range(len(boxes))]
        write_roi_markups(result.world_boxes, path, descriptions=descriptions)
        return str(path), {}
    if output == "labelmap":
        if boxes:
            values = label_values([b.label or "finding" for b in boxes])
            labelmap, names = boxes_to_labelmap(boxes, volume.array.shape, values)
        else:
            labelmap, names = np.zeros(volume.array.shape, dtype=np.int16), {}
        path = temp_path(".nii.gz")
        save_labelmap(labelmap, volume.affine, path)
        return str(path), {"label_names": {str(k): v for k, v in names.items()}}
    # DICOM outputs
    if not boxes:
        return None, {"dicom": None, "note": f"no finding: no {output} written"}
    series = _source_series(volume)
    order = list(volume.meta["sop_instance_uids"])
    model_id = result.model_id
    if output == "dicom_sr":
        findings = [central_slice_finding(b, result.box_reasoning(n)) for n, b in enumerate(boxes)]
        dataset = write_measurement_report(
            findings,
            series,
            diagnosis=result.labels,
            reasoning=result.reasoning,
            slice_uid_order=order,
            algorithm_name=model_id[:64],
            algorithm_version=adapter_version,
        )
    else:
        dataset = write_segmentation(
            boxes, series, slice_uid_order=order, algorithm_name=model_id[:64], algorithm_version=adapter_version
        )
    stored = store_dicom(datastore, dataset)
    if stored is not None:
        return None, {"dicom": stored}
    path = temp_path(".dcm")
    dataset.save_as(str(path))
    return str(path), {"dicom": {"stored": None, "sop_instance_uid": str(dataset.SOPInstanceUID)}}
