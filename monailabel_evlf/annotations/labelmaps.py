"""Label maps: boxes as filled label volumes on the image grid, and back to boxes by connected components.

The label map shares the image's voxel grid and affine (docs/conventions.md), so it overlays the user's image in
3D Slicer / OHIF voxel for voxel, and MONAI Label can store it as a regular label next to the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from monailabel_evlf.imaging.geometry import VoxelBox, lps_to_ras, ras_to_lps


def label_values(labels: Sequence[str]) -> dict[str, int]:
    """Label name -> value 1, 2, ... in order of first appearance (0 stays background)."""
    return {name: value for value, name in enumerate(dict.fromkeys(labels), start=1)}


def _voxel_slices(box: VoxelBox, shape: Sequence[int]) -> tuple[slice, ...]:
    """Voxels whose centre ``n + 0.5`` lies in ``[lo, hi)`` (the half-voxel rule), clipped to the volume."""
    lo = np.ceil(np.asarray(box.lo, dtype=float) - 0.5).astype(int)
    hi = np.ceil(np.asarray(box.hi, dtype=float) - 0.5).astype(int)
    lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


def boxes_to_labelmap(
    boxes: Sequence[VoxelBox], shape: Sequence[int], values: Mapping[str, int] | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """Fill each box with its label's value; returns the ``int16`` label map and ``{value: label name}``.

    ``values`` maps label names to label values (default: :func:`label_values` of the boxes' labels). Larger
    boxes are filled first so a box nested in another stays visible. A box that covers no voxel of the volume
    raises ``ValueError`` (it means the box and the image do not belong together).
    """
    if len(shape) != 3:
        raise ValueError(f"a label map is 3D, got shape {tuple(shape)}")
    values = dict(values) if values is not None else label_values([b.label or "" for b in boxes])
    if any(not 0 < v <= np.iinfo(np.int16).max for v in values.values()):
        raise ValueError(f"label values must be in 1..32767, got {values}")
    labelmap = np.zeros(tuple(shape), dtype=np.int16)
    regions = []
    for box in boxes:
        if (box.label or "") not in values:
            raise ValueError(f"box label {box.label!r} has no label value (known: {sorted(values)})")
        region = _voxel_slices(box, shape)
        if any(s.stop <= s.start for s in region):
            raise ValueError(f"box {box.lo}..{box.hi} covers no voxel of a volume of shape {tuple(shape)}")
        regions.append((region, values[box.label or ""]))
    for region, value in sorted(regions, key=lambda r: -np.prod([s.stop - s.start for s in r[0]])):
        labelmap[region] = value
    return labelmap, {v: name for name, v in values.items()}


def labelmap_to_boxes(
    labelmap: np.ndarray, names: Mapping[int, str] | None = None, *, min_voxels: int = 1
) -> list[VoxelBox]:
    """One box per connected component (face connectivity) of each non-zero label value.

    Boxes are integer edge coordinates (``lo`` first voxel, ``hi`` one past the last) labelled with
    ``names[value]`` (default: the value as text), ordered by label value then by first voxel. Components with
    fewer than ``min_voxels`` voxels (stray clicks) are dropped. Same-label boxes that touch merge into one.
    """
    labelmap = np.asarray(labelmap)
    if labelmap.ndim != 3:
        raise ValueError(f"a label map is 3D, got shape {labelmap.shape}")
    if not np.issubdtype(labelmap.dtype, np.integer):
        if not np.all(np.mod(labelmap, 1) == 0):
            raise ValueError("label map values must be integers")
        labelmap = labelmap.astype(np.int64)
    names = names or {}
    boxes = []
    for value in np.unique(labelmap[labelmap != 0]):
        components, _ = ndimage.label(labelmap == value)
        for n, region in enumerate(ndimage.find_objects(components), start=1):
            if np.count_nonzero(components[region] == n) < min_voxels:
                continue
            boxes.append(
                VoxelBox(
                    lo=np.array([s.start for s in region], dtype=float),
                    hi=np.array([s.stop for s in region], dtype=float),
                    label=names.get(int(value), str(int(value))),
                )
            )
    return boxes


def save_labelmap(labelmap: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a label map as NIfTI with the image's LPS voxel-centre ``affine`` (stored as RAS, as NIfTI wants)."""
    labelmap = np.asarray(labelmap)
    if labelmap.ndim != 3:
        raise ValueError(f"a label map is 3D, got shape {labelmap.shape}")
    image = nib.Nifti1Image(labelmap.astype(np.int16), lps_to_ras(np.asarray(affine, dtype=float)))
    image.header.set_intent("label")
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return Path(path)


def load_labelmap(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI label map as ``(int array (I, J, K), LPS affine)`` without reorienting."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: a label map is 3D, got shape {data.shape}")
    if not np.all(np.mod(data, 1) == 0):
        raise ValueError(f"{path}: label map values must be integers")
    return data.astype(np.int16), ras_to_lps(image.affine)
