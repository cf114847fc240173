"""Whatever a radiologist saved as a label -> corrected ``VoxelBox`` es on the image's grid.

3D Slicer saves ROI markups JSON (LPS or RAS mm), painting tools save label maps, OHIF saves DICOM SR (TID 1500)
rectangles or DICOM SEG; all become voxel boxes in the volume's edge coordinates (docs/conventions.md) so the
training samples are built one way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pydicom

from monailabel_evlf.imaging.geometry import VoxelBox, world_box_to_voxel
from monailabel_evlf.imaging.volume import Volume


def read_label_boxes(label_path: str | Path, volume: Volume, names: Mapping[int, str] | None = None) -> list[VoxelBox]:
    """Boxes of one saved label; ``names`` maps label-map values to label names (MONAI Label's label info)."""
    path = Path(label_path)
    name = path.name.lower()
    if name.endswith(".json"):
        from monailabel_evlf.annotations.slicer_markups import read_roi_markups

        return [world_box_to_voxel(box, volume.affine) for box in read_roi_markups(path)]
    if name.endswith((".nii", ".nii.gz", ".nrrd")):
        from monailabel_evlf.annotations.labelmaps import labelmap_to_boxes
        from monailabel_evlf.imaging.volume import load_volume

        labelmap = load_volume(path, dtype="int16")
        if labelmap.shape != volume.shape:
            raise ValueError(f"label map {path.name} has shape {labelmap.shape}, the image {volume.shape}")
        return labelmap_to_boxes(labelmap.array, names)
    if name.endswith(".dcm"):
        return _dicom_boxes(pydicom.dcmread(path), volume)
    raise ValueError(f"unsupported label file {path.name}: expected markups .json, a label map or a DICOM SR / SEG")


def _dicom_boxes(dataset: pydicom.Dataset, volume: Volume) -> list[VoxelBox]:
    uids = volume.meta.get("sop_instance_uids")
    if not uids:
        raise ValueError("a DICOM SR / SEG label needs its image loaded from the DICOM series it references")
    if dataset.get("Modality") == "SEG":
        from monailabel_evlf.annotations.dicom_seg import read_segmentation_boxes

        return read_segmentation_boxes(dataset, uids)
    from monailabel_evlf.annotations.dicom_sr import read_sr_boxes

    # an SR rectangle lies on one instance k: pixel (column, row) = voxel (i, j), one slice thick
    return [
        VoxelBox(lo=(f.box.x1, f.box.y1, f.k), hi=(f.box.x2, f.box.y2, f.k + 1), label=f.label or None, score=f.score)
        for f in read_sr_boxes(dataset, uids)
    ]
