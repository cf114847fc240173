"""Box types and voxel <-> LPS world transforms, following docs/conventions.md.

Every box is half-open in *edge* coordinates (a voxel ``n`` covers ``[n, n + 1)``) and every affine maps voxel
*centre* indices to LPS millimetres, as ITK and DICOM do. Keeping one rule everywhere is what lets a box the model
drew on a rendered slice land on the exact voxels, the Slicer ROI and the DICOM SR coordinates of the same lesion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from monai.data.box_utils import box_iou

__all__ = [
    "Box2D",
    "VoxelBox",
    "WorldBox",
    "affine_spacing_and_directions",
    "box_iou_2d",
    "box_iou_3d",
    "lps_to_ras",
    "ras_to_lps",
    "voxel_box_to_world",
    "voxel_to_world",
    "world_box_to_voxel",
    "world_to_voxel",
]

_ORTHONORMAL_ATOL = 1e-4
_LPS_RAS_FLIP = np.array([-1.0, -1.0, 1.0])


def _score(score: Any) -> float | None:
    if score is None:
        return None
    value = float(score)
    if not np.isfinite(value):
        raise ValueError(f"box score must be finite, got {score!r}")
    return value


def _vector(values: Any, name: str, length: int = 3) -> np.ndarray:
    """A finite, read-only float64 copy, so frozen boxes stay frozen even though they hold arrays."""
    array = np.array(values, dtype=float)
    if array.shape != (length,):
        raise ValueError(f"{name} must have {length} values, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} is not finite: {array.tolist()}")
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class Box2D:
    """A box in rendered-image pixels, edge coordinates: x = column, y = row, origin top-left corner."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    score: float | None = None

    def __post_init__(self) -> None:
        coords = [float(v) for v in (self.x1, self.y1, self.x2, self.y2)]
        if not all(np.isfinite(coords)):
            raise ValueError(f"Box2D coordinates are not finite: {coords}")
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise ValueError(f"Box2D is inverted (needs x1 <= x2 and y1 <= y2): {coords}")
        for name, value in zip(("x1", "y1", "x2", "y2"), coords, strict=True):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "score", _score(self.score))

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return self.width * self.height

    def as_array(self) -> np.ndarray:
        """``[x1, y1, x2, y2]``, the layout of MONAI's ``box_utils`` and of the ``bbox_2d`` answer field."""
        return np.array([self.x1, self.y1, self.x2, self.y2])

    def to_dict(self) -> dict[str, Any]:
        return {"bbox_2d": self.as_array().tolist(), "label": self.label, "score": self.score}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Box2D:
        coords = data["bbox_2d"] if "bbox_2d" in data else [data[k] for k in ("x1", "y1", "x2", "y2")]
        if len(coords) != 4:
            raise ValueError(f"Box2D needs 4 coordinates, got {coords!r}")
        return cls(*coords, label=data.get("label"), score=data.get("score"))


@dataclass(frozen=True, eq=False)
class VoxelBox:
    """A box in the volume's ``(i, j, k)`` edge coordinates; integer boxes cover exactly ``array[lo:hi]``."""

    lo: np.ndarray
    hi: np.ndarray
    label: str | None = None
    score: float | None = None

    def __post_init__(self) -> None:
        lo, hi = _vector(self.lo, "VoxelBox.lo"), _vector(self.hi, "VoxelBox.hi")
        if np.any(hi < lo):
            raise ValueError(f"VoxelBox is inverted (needs lo <= hi): lo={lo.tolist()} hi={hi.tolist()}")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        object.__setattr__(self, "score", _score(self.score))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VoxelBox):
            return NotImplemented
        return (
            np.array_equal(self.lo, other.lo)
            and np.array_equal(self.hi, other.hi)
            and (self.label, self.score) == (other.label, other.score)
        )

    @property
    def size(self) -> np.ndarray:
        return self.hi - self.lo

    @property
    def volume(self) -> float:
        return float(np.prod(self.size))

    def as_array(self) -> np.ndarray:
        """``[lo_i, lo_j, lo_k, hi_i, hi_j, hi_k]``, MONAI's 3D ``StandardMode`` box layout."""
        return np.concatenate([self.lo, self.hi])

    def to_slices(self) -> tuple[slice, slice, slice]:
        """Index slices of the voxels whose centres lie inside the box (``array[box.to_slices()]``)."""
        lo = np.ceil(self.lo - 0.5).astype(int)
        hi = np.ceil(self.hi - 0.5).astype(int)
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))

    def snapped(self) -> VoxelBox:
        """The box on whole-voxel edges: exactly the voxels :meth:`to_slices` covers, at least one voxel a side
        (the one nearest the centre). A finding occupies whole voxels; sub-voxel edges of a box drawn on a resampled
        slice are resampling error, and on a lesion 2-3 voxels wide they cost more IoU than they carry."""
        lo = np.ceil(self.lo - 0.5)
        hi = np.ceil(self.hi - 0.5)
        empty = hi <= lo
        lo[empty] = np.floor((self.lo + self.hi) / 2)[empty]
        hi[empty] = lo[empty] + 1
        return VoxelBox(lo=lo, hi=hi, label=self.label, score=self.score)

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo.tolist(), "hi": self.hi.tolist(), "label": self.label, "score": self.score}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VoxelBox:
        return cls(lo=data["lo"], hi=data["hi"], label=data.get("label"), score=data.get("score"))


@dataclass(frozen=True, eq=False)
class WorldBox:
    """An oriented box in LPS mm: ``size`` runs along the columns of ``orientation`` (volume axes i, j, k)."""

    center: np.ndarray
    size: np.ndarray
    orientation: np.ndarray
    label: str | None = None
    score: float | None = None

    def __post_init__(self) -> None:
        center, size = _vector(self.center, "WorldBox.center"), _vector(self.size, "WorldBox.size")
        if np.any(size < 0):
            raise ValueError(f"WorldBox.size must not be negative, got {size.tolist()}")
        orientation = np.array(self.orientation, dtype=float)
        if orientation.shape != (3, 3) or not np.all(np.isfinite(orientation)):
            raise ValueError(f"WorldBox.orientation must be a finite 3x3 matrix, got {orientation.tolist()}")
        if not np.allclose(orientation.T @ orientation, np.eye(3), atol=_ORTHONORMAL_ATOL):
            raise ValueError("WorldBox.orientation columns must be orthonormal direction cosines")
        orientation.flags.writeable = False
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "orientation", orientation)
        object.__setattr__(self, "score", _score(self.score))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WorldBox):
            return NotImplemented
        return (
            np.array_equal(self.center, other.center)
            and np.array_equal(self.size, other.size)
            and np.array_equal(self.orientation, other.orientation)
            and (self.label, self.score) == (other.label, other.score)
        )

    def corners(self) -> np.ndarray:
        """The 8 corners, shape ``(8, 3)`` LPS mm."""
        signs = np.array(np.meshgrid([-0.5, 0.5], [-0.5, 0.5], [-0.5, 0.5], indexing="ij")).reshape(3, 8).T
        return self.center + (signs * self.size) @ self.orientation.T

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS ``(min, max)`` corners of the smallest box that contains this one."""
        half_extent = np.abs(self.orientation) @ (self.size / 2)
        return self.center - half_extent, self.center + half_extent

    def to_dict(self) -> dict[str, Any]:
        return {
            "center": self.center.tolist(),
            "size": self.size.tolist(),
            "orientation": self.orientation.tolist(),
            "label": self.label,
            "score": self.score,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorldBox:
        orientation = np.asarray(data.get("orientation", np.eye(3)), dtype=float)
        return cls(
            center=data["center"],
            size=data["size"],
            orientation=orientation.reshape(3, 3) if orientation.size == 9 else orientation,
            label=data.get("label"),
            score=data.get("score"),
        )


def _check_affine(affine: Any) -> np.ndarray:
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise ValueError(f"affine's last row must be [0, 0, 0, 1], got {affine[3].tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("affine is singular (zero spacing or collinear axes)")
    return affine


def _points(points: Any, name: str) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    if points.shape[-1:] != (3,):
        raise ValueError(f"{name} must have a last dimension of 3, got shape {points.shape}")
    return points


def affine_spacing_and_directions(affine: Any) -> tuple[np.ndarray, np.ndarray]:
    """Voxel spacing (mm) and unit direction cosines (columns = axes i, j, k) of a voxel -> LPS affine.

    Raises ValueError for sheared affines: a grid whose axes are not perpendicular has no box shape in world space,
    and DICOM image planes cannot describe it.
    """
    linear = _check_affine(affine)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    directions = linear / spacing
    if not np.allclose(directions.T @ directions, np.eye(3), atol=_ORTHONORMAL_ATOL):
        raise ValueError("affine is sheared: voxel axes are not perpendicular")
    return spacing, directions


def voxel_to_world(points_edge: Any, affine: Any) -> np.ndarray:
    """LPS mm of voxel *edge* coordinates ``(..., 3)``: ``affine @ (u - 0.5, 1)`` (the half-voxel rule)."""
    affine = _check_affine(affine)
    return (_points(points_edge, "points_edge") - 0.5) @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(points_lps: Any, affine: Any) -> np.ndarray:
    """Voxel edge coordinates ``(..., 3)`` of LPS points; the inverse of :func:`voxel_to_world`."""
    affine = _check_affine(affine)
    inverse = np.linalg.inv(affine[:3, :3])
    return (_points(points_lps, "points_lps") - affine[:3, 3]) @ inverse.T + 0.5


def voxel_box_to_world(box: VoxelBox, affine: Any) -> WorldBox:
    """The oriented LPS box covering exactly the same space as ``box``: aligned to the image grid, as Slicer's ROI."""
    spacing, directions = affine_spacing_and_directions(affine)
    center = voxel_to_world((box.lo + box.hi) / 2, affine)
    return WorldBox(center=center, size=box.size * spacing, orientation=directions, label=box.label, score=box.score)


def world_box_to_voxel(box: WorldBox, affine: Any) -> VoxelBox:
    """The smallest voxel-aligned box containing ``box``; exact when ``box`` is aligned to the image grid."""
    corners = world_to_voxel(box.corners(), affine)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    # Round-off of the forward/backward matrix products must not grow a box by 1e-13 voxels.
    lo, hi = _snap(lo), _snap(hi)
    return VoxelBox(lo=lo, hi=hi, label=box.label, score=box.score)


def _snap(values: np.ndarray, atol: float = 1e-6) -> np.ndarray:
    rounded = np.round(values)
    return np.where(np.abs(values - rounded) < atol, rounded, values)


def lps_to_ras(values: Any) -> np.ndarray:
    """Flip x and y: points ``(..., 3)`` or a 4x4 affine (``diag(-1, -1, 1, 1) @ affine``). Its own inverse."""
    values = np.asarray(values, dtype=float)
    if values.shape == (4, 4):
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ values
    return _points(values, "points") * _LPS_RAS_FLIP


def ras_to_lps(values: Any) -> np.ndarray:
    """Flip x and y: points ``(..., 3)`` or a 4x4 affine. The same flip as :func:`lps_to_ras`."""
    return lps_to_ras(values)


def _box_array(boxes: Any, width: int, kind: type) -> np.ndarray:
    if isinstance(boxes, kind):
        return boxes.as_array()[None]
    if isinstance(boxes, Sequence) and boxes and isinstance(boxes[0], kind):
        return np.stack([b.as_array() for b in boxes])
    array = np.asarray(boxes, dtype=float).reshape(-1, width) if np.size(boxes) else np.zeros((0, width))
    if not np.all(np.isfinite(array)) or np.any(array[:, width // 2 :] < array[:, : width // 2]):
        raise ValueError("boxes must be finite with lo <= hi")
    return array


def _iou(a: Any, b: Any, width: int, kind: type) -> float | np.ndarray:
    boxes_a, boxes_b = _box_array(a, width, kind), _box_array(b, width, kind)
    iou = np.asarray(box_iou(boxes_a, boxes_b), dtype=float) if len(boxes_a) and len(boxes_b) else None
    if iou is None:
        iou = np.zeros((len(boxes_a), len(boxes_b)))
    return float(iou[0, 0]) if isinstance(a, kind) and isinstance(b, kind) else iou


def box_iou_2d(a: Box2D | Sequence[Box2D] | np.ndarray, b: Box2D | Sequence[Box2D] | np.ndarray) -> float | np.ndarray:
    """IoU of two ``Box2D`` (a float), or the ``(N, M)`` matrix for sequences / ``(N, 4)`` xyxy arrays."""
    return _iou(a, b, 4, Box2D)


def box_iou_3d(
    a: VoxelBox | WorldBox | Sequence[VoxelBox] | np.ndarray, b: VoxelBox | WorldBox | Sequence[VoxelBox] | np.ndarray
) -> float | np.ndarray:
    """IoU of two boxes on the same grid (float), or the ``(N, M)`` matrix for sequences / ``(N, 6)`` arrays.

    Two ``WorldBox`` are compared in their common frame; oriented boxes at different angles raise ValueError
    (their exact IoU needs polyhedron clipping, and every box this package makes shares its volume's grid).
    """
    if isinstance(a, WorldBox) and isinstance(b, WorldBox):
        if not np.allclose(a.orientation, b.orientation, atol=_ORTHONORMAL_ATOL):
            raise ValueError("box_iou_3d: world boxes with different orientations are not supported")
        local = [box.orientation.T @ box.center for box in (a, b)]
        a, b = (VoxelBox(lo=c - box.size / 2, hi=c + box.size / 2) for c, box in zip(local, (a, b), strict=True))
    return _iou(a, b, 6, VoxelBox)
