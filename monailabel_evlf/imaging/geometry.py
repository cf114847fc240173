"""Boxes and coordinate transforms between rendered slice pixels, voxel indices and patient space (LPS mm).

Every convention used here (edge coordinates, the half-voxel rule, LPS vs RAS, oriented world boxes) is fixed
in ``docs/conventions.md``; the tests check them with hand-computed answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Multiplying an LPS point (or the rows of an LPS affine) by this gives RAS, and vice versa.
_LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0])


def _vector(values: Any, name: str, length: int = 3) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if array.shape != (length,):
        raise ValueError(f"{name} must have {length} values, got {array.shape[0]}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    return array


def _score(score: float | None) -> float | None:
    if score is None:
        return None
    score = float(score)
    if not np.isfinite(score):
        raise ValueError(f"score must be finite, got {score}")
    return score


@dataclass(frozen=True)
class Box2D:
    """A box on a 2D image in pixel edge coordinates: x = column, y = row, (0, 0) = top-left pixel corner."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""
    score: float | None = None

    def __post_init__(self) -> None:
        coords = _vector([self.x1, self.y1, self.x2, self.y2], "Box2D coordinates", 4)
        if coords[0] > coords[2] or coords[1] > coords[3]:
            raise ValueError(f"Box2D corners are inverted: {coords.tolist()} (need x1 <= x2 and y1 <= y2)")
        for name, value in zip(("x1", "y1", "x2", "y2"), coords, strict=True):
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "score", _score(self.score))

    @classmethod
    def from_corners(cls, x_a: float, y_a: float, x_b: float, y_b: float, **kwargs: Any) -> Box2D:
        """Build from two opposite corners in any order (models often swap them)."""
        return cls(min(x_a, x_b), min(y_a, y_b), max(x_a, x_b), max(y_a, y_b), **kwargs)

    @property
    def coords(self) -> np.ndarray:
        return np.array([self.x1, self.y1, self.x2, self.y2])

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)

    def clip(self, width: float, height: float) -> Box2D:
        return Box2D(
            min(max(self.x1, 0.0), width),
            min(max(self.y1, 0.0), height),
            min(max(self.x2, 0.0), width),
            min(max(self.y2, 0.0), height),
            self.label,
            self.score,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"box": self.coords.tolist(), "label": self.label, "score": self.score}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Box2D:
        return cls(*_vector(data["box"], "box", 4), label=data.get("label", ""), score=data.get("score"))


@dataclass(frozen=True, eq=False)
class VoxelBox:
    """A half-open box ``[lo, hi)`` in the volume's (i, j, k) edge coordinates: ``array[lo:hi]`` for integers."""

    lo: np.ndarray
    hi: np.ndarray
    label: str = ""
    score: float | None = None

    def __post_init__(self) -> None:
        lo, hi = _vector(self.lo, "VoxelBox.lo"), _vector(self.hi, "VoxelBox.hi")
        if np.any(lo > hi):
            raise ValueError(f"VoxelBox is inverted: lo={lo.tolist()} hi={hi.tolist()}")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        object.__setattr__(self, "score", _score(self.score))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VoxelBox):
            return NotImplemented
        same = np.array_equal(self.lo, other.lo) and np.array_equal(self.hi, other.hi)
        return same and self.label == other.label and self.score == other.score

    @property
    def size(self) -> np.ndarray:
        return self.hi - self.lo

    @property
    def volume(self) -> float:
        return float(np.prod(self.size))

    def slices(self) -> tuple[slice, slice, slice]:
        """Index slices of the voxels whose centres lie inside the box."""
        lo = np.ceil(self.lo - 0.5).astype(int)
        hi = np.ceil(self.hi - 0.5).astype(int)
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo.tolist(), "hi": self.hi.tolist(), "label": self.label, "score": self.score}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VoxelBox:
        return cls(data["lo"], data["hi"], label=data.get("label", ""), score=data.get("score"))


@dataclass(frozen=True, eq=False)
class WorldBox:
    """An oriented box in LPS mm: ``size`` along the columns of ``orientation`` (the volume's axis directions)."""

    center: np.ndarray
    size: np.ndarray
    orientation: np.ndarray = field(default_factory=lambda: np.eye(3))
    label: str = ""
    score: float | None = None

    def __post_init__(self) -> None:
        center, size = _vector(self.center, "WorldBox.center"), _vector(self.size, "WorldBox.size")
        orientation = np.asarray(self.orientation, dtype=float)
        if orientation.shape != (3, 3) or not np.all(np.isfinite(orientation)):
            raise ValueError(f"WorldBox.orientation must be a finite 3x3 matrix, got shape {orientation.shape}")
        if np.any(size < 0):
            raise ValueError(f"WorldBox.size must be >= 0, got {size.tolist()}")
        norms = np.linalg.norm(orientation, axis=0)
        if np.any(norms < 1e-9):
            raise ValueError("WorldBox.orientation has a zero column")
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "orientation", orientation / norms)
        object.__setattr__(self, "score", _score(self.score))

    def corners(self) -> np.ndarray:
        """The 8 corners (8, 3) in LPS mm."""
        signs = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
        return self.center + (signs * self.size) @ self.orientation.T

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS (min, max) corners that contain the oriented box."""
        corners = self.corners()
        return corners.min(axis=0), corners.max(axis=0)

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
        return cls(
            data["center"],
            data["size"],
            data.get("orientation", np.eye(3)),
            label=data.get("label", ""),
            score=data.get("score"),
        )


def _affine(affine: Any) -> np.ndarray:
    matrix = np.asarray(affine, dtype=float)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {matrix.shape}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError("affine is singular (zero spacing or degenerate directions)")
    return matrix


def spacing(affine: Any) -> np.ndarray:
    """Voxel spacing (mm) along i, j, k: the column norms of the affine's 3x3 part."""
    return np.linalg.norm(_affine(affine)[:3, :3], axis=0)


def direction(affine: Any) -> np.ndarray:
    """Unit direction cosines of the i, j, k axes as columns (3, 3)."""
    matrix = _affine(affine)[:3, :3]
    return matrix / np.linalg.norm(matrix, axis=0)


def voxel_to_world(points_edge: Any, affine: Any) -> np.ndarray:
    """Edge coordinates (..., 3) -> LPS mm (..., 3); the voxel centre of index n is at edge coordinate n + 0.5."""
    matrix = _affine(affine)
    points = np.asarray(points_edge, dtype=float)
    return (points - 0.5) @ matrix[:3, :3].T + matrix[:3, 3]


def world_to_voxel(points_lps: Any, affine: Any) -> np.ndarray:
    """LPS mm (..., 3) -> edge coordinates (..., 3); the exact inverse of :func:`voxel_to_world`."""
    matrix = _affine(affine)
    points = np.asarray(points_lps, dtype=float)
    return np.linalg.solve(matrix[:3, :3], (points - matrix[:3, 3]).T).T + 0.5


def voxel_box_to_world(box: VoxelBox, affine: Any) -> WorldBox:
    """The box as an oriented world box aligned to the volume grid (exact for any direction cosines)."""
    center = voxel_to_world((box.lo + box.hi) / 2.0, affine)
    return WorldBox(center, box.size * spacing(affine), direction(affine), label=box.label, score=box.score)


def world_box_to_voxel(box: WorldBox, affine: Any) -> VoxelBox:
    """The smallest voxel-grid-aligned box containing the world box (exact when it is grid-aligned)."""
    corners = world_to_voxel(box.corners(), affine)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    return VoxelBox(lo, hi, label=box.label, score=box.score)


def lps_to_ras(value: Any) -> np.ndarray:
    """Points (..., 3) or a 4x4 index->LPS affine -> the same in RAS (the map is its own inverse)."""
    array = np.asarray(value, dtype=float)
    if array.shape == (4, 4):
        flipped = array.copy()
        flipped[:3, :] = _LPS_RAS_FLIP @ array[:3, :]
        return flipped
    if array.shape[-1] != 3:
        raise ValueError(f"expected points (..., 3) or a 4x4 affine, got shape {array.shape}")
    return array * np.diag(_LPS_RAS_FLIP)


ras_to_lps = lps_to_ras


def box_iou_2d(a: Box2D, b: Box2D) -> float:
    """Intersection over union of two 2D boxes (0 when both are empty)."""
    width = min(a.x2, b.x2) - max(a.x1, b.x1)
    height = min(a.y2, b.y2) - max(a.y1, b.y1)
    intersection = max(width, 0.0) * max(height, 0.0)
    union = a.area + b.area - intersection
    return intersection / union if union > 0 else 0.0


def box_iou_3d(a: VoxelBox, b: VoxelBox) -> float:
    """Intersection over union of two voxel boxes in the same volume (0 when both are empty)."""
    overlap = np.clip(np.minimum(a.hi, b.hi) - np.maximum(a.lo, b.lo), 0.0, None)
    intersection = float(np.prod(overlap))
    union = a.volume + b.volume - intersection
    return intersection / union if union > 0 else 0.0
