"""Request and label checks in front of MONAI Label's datastores.

MONAI Label's ``save_label`` copies whatever bytes arrive into the datastore, and an unknown model or image ends
as an opaque 500. The checks here answer 4xx with a message instead and keep corrupt labels out of the
datastore, where they would otherwise break training later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

MARKUPS_SUFFIXES = (".json",)
IMAGE_LABEL_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd")
DICOM_LABEL_SUFFIXES = (".dcm",)


def _suffix(path: str) -> str:
    name = Path(path).name.lower()
    for suffix in (*IMAGE_LABEL_SUFFIXES, *MARKUPS_SUFFIXES, *DICOM_LABEL_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return "".join(Path(name).suffixes)


def check_label_file(label_path: str, image_path: str) -> None:
    """Raise 422 unless ``label_path`` is a readable Slicer markups JSON, a label map on the image's grid, or a
    DICOM SR / SEG."""
    if not os.path.isfile(label_path) or os.path.getsize(label_path) == 0:
        raise HTTPException(422, "the label file is empty")
    suffix = _suffix(label_path)
    if suffix in MARKUPS_SUFFIXES:
        from monailabel_evlf.annotations.slicer_markups import read_roi_markups

        try:
            read_roi_markups(label_path)
        except (ValueError, KeyError, TypeError) as exc:
            raise HTTPException(422, f"malformed 3D Slicer markups JSON: {exc}") from exc
    elif suffix in IMAGE_LABEL_SUFFIXES:
        from monailabel_evlf.imaging.volume import load_volume

        try:
            label = load_volume(label_path)
        except Exception as exc:  # ITK raises RuntimeError on corrupt files, ValueError on non-3D
            raise HTTPException(422, f"unreadable label map: {exc}") from exc
        image_shape = load_volume(image_path).shape if image_path and os.path.isfile(image_path) else None
        if image_shape is not None and label.shape != image_shape:
            raise HTTPException(422, f"label map shape {label.shape} does not match the image's {image_shape}")
    elif suffix in DICOM_LABEL_SUFFIXES:
        import pydicom

        try:
            modality = pydicom.dcmread(label_path, stop_before_pixels=True).get("Modality")
        except Exception as exc:  # pydicom raises several error types on truncated files
            raise HTTPException(422, f"unreadable DICOM label: {exc}") from exc
        if modality not in ("SR", "SEG"):
            raise HTTPException(422, f"a DICOM label must be an SR or SEG, got modality {modality!r}")
    else:
        supported = ", ".join((*MARKUPS_SUFFIXES, *IMAGE_LABEL_SUFFIXES, *DICOM_LABEL_SUFFIXES))
        raise HTTPException(422, f"unsupported label format {suffix or '(no suffix)'!r}; use {supported}")


class CheckedLocalDatastore(LocalDatastore):
    """The local folder datastore, refusing labels for unknown images and labels that cannot be read."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        image_path = self.get_image_uri(image_id)
        if not image_path:
            raise HTTPException(404, f"image {image_id!r} is not in the datastore")
        check_label_file(label_filename, image_path)
        return super().save_label(image_id, label_filename, label_tag, label_info)


def check_infer_request(request: dict[str, Any], infers: dict[str, Any], datastore) -> None:
    """404 for an unknown model or an image id the local datastore does not have, before any work starts."""
    model = request.get("model")
    if model not in infers:
        raise HTTPException(404, f"unknown model {model!r}; available: {', '.join(sorted(infers))}")
    image = request.get("image")
    if not image:
        raise HTTPException(422, "no image: give an image id or upload a file")
    local = isinstance(datastore, LocalDatastore)
    if isinstance(image, str) and local and not os.path.exists(image) and not datastore.get_image_uri(image):
        raise HTTPException(404, f"image {image!r} is not in the datastore")
