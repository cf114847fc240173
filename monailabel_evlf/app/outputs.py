"""Grounding result -> the file a client asked for: Slicer ROI markups, NIfTI label map, DICOM SR / SEG, or none.

DICOM objects reference the source series, so they need a DICOM source (a DICOMweb datastore, or a local DICOM
folder); with a DICOMweb datastore they are stored back through STOW-RS for OHIF and the result JSON names them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pydicom
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore

from monailabel_evlf.annotations import formats
from monailabel_evlf.inference import VolumeResult

logger = logging.getLogger(__name__)


def temp_path(suffix: str) -> Path:
    """A fresh temp file; MONAI Label removes result files once they are sent."""
    handle, name = tempfile.mkstemp(suffix=suffix, prefix="evlf-")
    os.close(handle)
    return Path(name)


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
    fmt = formats.for_output(output)
    if fmt is None:
        return None, {}
    boxes = result.voxel_boxes
    annotation = formats.Annotation(
        boxes=boxes,
        volume=volume,
        texts=[result.box_reasoning(n) for n in range(len(boxes))],
        diagnosis=result.labels,
        reasoning=result.reasoning,
        algorithm_name=result.model_id[:64],
        algorithm_version=adapter_version,
    )
    if fmt.write is not None:
        path = temp_path(fmt.suffixes[0])
        return str(path), fmt.write(annotation, path)
    # DICOM outputs reference the source series and are stored back when the datastore is DICOMweb
    if not boxes:
        return None, {"dicom": None, "note": f"no finding: no {output} written"}
    annotation.series = _source_series(volume)
    dataset = fmt.encode(annotation)
    stored = store_dicom(datastore, dataset)
    if stored is not None:
        return None, {"dicom": stored}
    path = temp_path(fmt.suffixes[0])
    dataset.save_as(str(path))
    return str(path), {"dicom": {"stored": None, "sop_instance_uid": str(dataset.SOPInstanceUID)}}
