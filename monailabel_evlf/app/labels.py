"""Whatever a radiologist saved as a label -> corrected ``VoxelBox`` es on the image's grid.

3D Slicer saves ROI markups JSON (LPS or RAS mm), painting tools save label maps, OHIF saves DICOM SR (TID 1500)
rectangles or DICOM SEG; all become voxel boxes in the volume's edge coordinates (docs/conventions.md) so the
training samples are built one way. Each format's reader is in :mod:`monailabel_evlf.annotations.formats`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from monailabel_evlf.annotations.formats import read_boxes
from monailabel_evlf.imaging.geometry import VoxelBox
from monailabel_evlf.imaging.volume import Volume


def read_label_boxes(label_path: str | Path, volume: Volume, names: Mapping[int, str] | None = None) -> list[VoxelBox]:
    """Boxes of one saved label; ``names`` maps label-map values to label names (MONAI Label's label info).
    ``ValueError`` (with the reason) for a file no format reads."""
    return read_boxes(label_path, volume, names)
