"""Synthetic abdominal CT phantoms with exactly known lesions, for tests, demos and few-shot training runs.

Anatomy and lesions are analytic shapes in patient space (LPS mm) evaluated at the world position of every
voxel centre (``affine @ (i, j, k, 1)``), so the liver stays on the patient's right (LPS ``x < 0``) and the
spleen on the left whatever the direction cosines of the grid (identity, flipped, oblique). The ground truth
(boxes in voxel, slice and world coordinates) is measured from the rasterised lesion masks, i.e. it is what a
reader of the written files sees. Layout and sidecar schema: docs/sample-data.md; coordinates:
docs/conventions.md.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from monailabel_evlf.imaging.geometry import (
    VoxelBox,
    affine_spacing_and_directions,
    lps_to_ras,
    voxel_box_to_world,
    voxel_to_world,
    world_to_voxel,
)
from monailabel_evlf.tasks.labels import NORMAL_LABEL

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 3
LESION_KINDS: tuple[str, ...] = ("cyst", "hyperdense lesion", "ring-enhancing lesion")
# organ_map value = index + 1
ORGANS: tuple[str, ...] = ("liver", "spleen", "right kidney", "left kidney")
ORIENTATIONS: tuple[str, ...] = ("identity", "flipped", "oblique")
DEFAULT_SHAPE: tuple[int, int, int] = (96, 96, 40)
GROUND_TRUTH_DIR = "ground_truth"
DICOM_DIR = "dicom"
_VQA_STREAM = 1  # the VQA set's generator is seeded [*study seed, _VQA_STREAM], apart from the image's
_ENHANCEMENT_STREAM = 2  # ... and the organ enhancement's, so that studies without it stay as they were

AIR_HU = -1000.0
_MIN_SHAPE = 8
_MAX_PLACEMENT_TRIES = 60
_TRIES_PER_DIAMETER = 10
# a few voxels: a 6 mm lesion on a fine grid; on a coarse one the draw is repeated until it shows
_MIN_LESION_VOXELS = 4
# lesion diameter range (mm), drawn uniformly; kidneys are small hosts. The lower end is also never under
# _MIN_DIAMETER_VOXELS in-plane voxels: "a few voxels" is the smallest a reader (or a model) can see on a slice, and
# a 6 mm lesion on a 4.5 mm grid would be one voxel (log-uniform 6 mm draws made half the lesions 1-4 px wide)
_DIAMETER_MM = {
    "liver": (8.0, 40.0),
    "spleen": (8.0, 30.0),
    "right kidney": (8.0, 26.0),
    "left kidney": (8.0, 26.0),
}
_MIN_DIAMETER_VOXELS = 2.5
_N_LESIONS_P = (0.2, 0.3, 0.25, 0.15, 0.1)  # P(0), ..., P(4 lesions)
_IN_PLANE_FOV_MM = (260.0, 440.0)
_SLAB_MM = (140.0, 240.0)  # extent along k: 3.5-6 mm slices at the default 40
_LOBULATION = {"cyst": 0.0, "hyperdense lesion": 0.15, "ring-enhancing lesion": 0.06}
_ORGAN_HU = {"liver": (48.0, 70.0), "spleen": (40.0, 55.0), "right kidney": (26.0, 40.0), "left kidney": (26.0, 40.0)}
_HYPERDENSE_ABOVE_HOST_HU = (20.0, 35.0)
_NOISE_SD_HU = (6.0, 18.0)
# patient side of each organ: LPS x < 0 is the patient's right
ORGAN_SIDES = {"liver": "right", "spleen": "left", "right kidney": "right", "left kidney": "left"}


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in LPS mm; ``rotation`` columns are its axes (world directions)."""

    center: np.ndarray
    semi_axes: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def local(self, points: np.ndarray) -> np.ndarray:
        """Points (..., 3) in units of the semi-axes, in the ellipsoid's own frame (inside: norm < 1)."""
        dtype = points.dtype  # float32 grids stay float32 (twice as fast)
        return ((points - self.center.astype(dtype)) @ self.rotation.astype(dtype)) / self.semi_axes.astype(dtype)

    def radius(self, points: np.ndarray) -> np.ndarray:
        return np.linalg.norm(self.local(points), axis=-1)


@dataclass
class Phantom:
    """One synthetic study: arrays in the stored voxel order ``(I, J, K)`` and their voxel-centre -> LPS affine."""

    image: np.ndarray  # float32 HU (integer valued, so int16 storage is lossless)
    affine: np.ndarray  # 4x4 float64, voxel centre index -> LPS mm
    labelmap: np.ndarray  # int16, lesion ids 1..n as in ground_truth["lesions"][n - 1]["id"], 0 elsewhere
    ground_truth: dict[str, Any]  # the sidecar JSON content (docs/sample-data.md)
    organ_map: np.ndarray  # int16, ORGANS index + 1 where that organ is visible, 0 elsewhere (not written)


def _check_choices(name: str, values: Sequence[str] | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if values is None:
        return allowed
    if isinstance(values, str):
        raise ValueError(f"{name} must be a sequence of names, not the string {values!r}")
    values = tuple(values)
    unknown = sorted(set(values) - set(allowed))
    if unknown or not values:
        raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}, got {list(values)}")
    return values


def _random_rotation(rng: np.random.Generator, min_deg: float, max_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    angle = np.deg2rad(rng.uniform(min_deg, max_deg))
    return Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()


def _make_affine(
    rng: np.random.Generator, shape: tuple[int, int, int], orientation: str, fov_center: np.ndarray
) -> np.ndarray:
    """Anisotropic spacing (rectangular in-plane pixels, thicker slices), a direction matrix of the requested
    kind (always right-handed, so DICOM readers keep the slice order) and the grid centred on ``fov_center``."""
    spacing_i = round(rng.uniform(*_IN_PLANE_FOV_MM) / shape[0], 3)
    voxel_spacing = np.array(
        [spacing_i, round(spacing_i * rng.uniform(0.92, 1.08), 3), round(rng.uniform(*_SLAB_MM) / shape[2], 3)]
    )
    if orientation == "identity":
        directions = np.eye(3)
    elif orientation == "flipped":  # stored like a RAS+ NIfTI: i runs to patient Right, j to Anterior
        directions = np.diag([-1.0, -1.0, 1.0])
    elif orientation == "oblique":
        directions = _random_rotation(rng, 10.0, 25.0)
    else:
        raise ValueError(f"orientation must be one of {list(ORIENTATIONS)}, got {orientation!r}")
    affine = np.eye(4)
    affine[:3, :3] = directions * voxel_spacing
    affine[:3, 3] = fov_center - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    # the NIfTI sform is float32: keep exactly what a reader of the file gets
    return affine.astype(np.float32).astype(np.float64)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Correlated Gaussian noise with unit standard deviation (organ texture, fat/bowel mixture)."""
    noise = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _organ_shapes(rng: np.random.Generator, center: np.ndarray) -> dict[str, Ellipsoid]:
    """Organ ellipsoids around the anatomy centre ``center`` (body midline, roughly at the L1 level)."""

    def jitter(values, rel=0.08):
        return np.asarray(values, dtype=float) * rng.uniform(1 - rel, 1 + rel, size=3)

    def tilt(deg):
        return _random_rotation(rng, 0.0, deg)

    right_kidney_z, left_kidney_z = rng.uniform(-30.0, -15.0), rng.uniform(-20.0, -5.0)
    return {
        "liver": Ellipsoid(center + jitter([-68.0, -8.0, 35.0], 0.06), jitter([78.0, 82.0, 68.0]), tilt(12.0)),
        "spleen": Ellipsoid(center + jitter([88.0, 45.0, 40.0], 0.06), jitter([30.0, 55.0, 48.0]), tilt(20.0)),
        "right kidney": Ellipsoid(
            center + np.array([-68.0, 58.0, right_kidney_z]), jitter([27.0, 30.0, 52.0]), tilt(15.0)
        ),
        "left kidney": Ellipsoid(
            center + np.array([68.0, 58.0, left_kidney_z]), jitter([27.0, 30.0, 52.0]), tilt(15.0)
        ),
    }


def _paint_anatomy(
    rng: np.random.Generator,
    points: np.ndarray,
    center: np.ndarray,
    organs: dict[str, Ellipsoid],
    enhancement_hu: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Noise-free HU and organ map. Later shapes overwrite earlier ones (liver last among the solid organs);
    ``enhancement_hu`` is added to every solid organ (contrast uptake)."""
    shape = points.shape[:3]
    rel = points - center
    image = np.full(shape, AIR_HU, dtype=np.float32)
    organ_map = np.zeros(shape, dtype=np.int16)

    body_axes = np.array([rng.uniform(140.0, 160.0), rng.uniform(105.0, 120.0)])
    body_r = np.linalg.norm(rel[..., :2] / body_axes, axis=-1)
    image[body_r < 1.0] = -100.0  # subcutaneous fat
    image[body_r < 0.93] = 45.0  # abdominal wall muscle
    bowel = _smooth_noise(rng, shape, 2.0) > 0.45
    peritoneum = body_r < 0.88
    image[peritoneum] = np.where(bowel[peritoneum], 25.0, -85.0)  # bowel loops in mesenteric fat

    theta = np.arctan2(rel[..., 1] / body_axes[1], rel[..., 0] / body_axes[0])
    ribs = (body_r > 0.86) & (body_r < 0.9) & (rel[..., 2] > -40.0) & (np.cos(14.0 * theta + 0.12 * rel[..., 2]) > 0.5)
    image[ribs] = 450.0

    for side in (-1.0, 1.0):
        lung = Ellipsoid(center + np.array([side * 82.0, 15.0, 210.0]), np.array([65.0, 85.0, 135.0]))
        image[(lung.radius(points) < 1.0) & peritoneum] = -850.0
        paraspinal = np.linalg.norm((rel[..., :2] - [side * 38.0, 92.0]) / [28.0, 22.0], axis=-1) < 1.0
        image[paraspinal & (body_r < 0.93)] = 50.0
        psoas = (np.linalg.norm(rel[..., :2] - [side * 42.0, 55.0], axis=-1) < 17.0) & (rel[..., 2] < -10.0)
        image[psoas] = 45.0

    vertebra = np.linalg.norm(rel[..., :2] - [0.0, 62.0], axis=-1) < 19.0
    disc = np.mod(rel[..., 2], 32.0) < 7.0
    image[vertebra] = np.where(disc[vertebra], 85.0, 260.0)
    image[np.linalg.norm(rel[..., :2] - [0.0, 92.0], axis=-1) < 8.0] = 15.0  # spinal canal
    image[np.linalg.norm(rel[..., :2] - [14.0, 35.0], axis=-1) < 11.0] = 42.0  # aorta (unenhanced)
    image[np.linalg.norm(rel[..., :2] - [-24.0, 28.0], axis=-1) < 12.0] = 38.0  # inferior vena cava

    for name in ("right kidney", "left kidney"):  # perirenal fat sets the kidneys off from bowel
        kidney = organs[name]
        image[Ellipsoid(kidney.center, kidney.semi_axes + 12.0, kidney.rotation).radius(points) < 1.0] = -90.0

    organ_hu = {}
    for name in ("right kidney", "left kidney", "spleen", "liver"):
        inside = organs[name].radius(points) < 1.0
        organ_hu[name] = round(float(rng.uniform(*_ORGAN_HU[name])) + enhancement_hu, 1)
        image[inside] = organ_hu[name]
        organ_map[inside] = ORGANS.index(name) + 1
    return image, organ_map, organ_hu


def _lesion_mask(
    points: np.ndarray, shape: Ellipsoid, lobulation: float, phase: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inside mask and the relative radius (0 at the centre, 1 at the edge) of a possibly lobulated ellipsoid."""
    local = shape.local(points)
    rho = np.linalg.norm(local, axis=-1)
    azimuth = np.arctan2(local[..., 1], local[..., 0])
    elevation = local[..., 2] / np.maximum(rho, 1e-9)
    edge = 1.0 + lobulation * np.sin(3.0 * azimuth + phase) * np.sqrt(np.clip(1.0 - elevation**2, 0.0, 1.0))
    relative = rho / edge
    return relative < 1.0, relative


def _half_extent(shape: Ellipsoid) -> np.ndarray:
    """Half the ellipsoid's extent along LPS x, y, z (its axes' world vectors are ``rotation * semi_axes``)."""
    return np.linalg.norm(shape.rotation * shape.semi_axes, axis=1)


def _lesion_window(
    shape: Ellipsoid, reach_mm: float, affine: np.ndarray, grid: tuple[int, ...]
) -> tuple[slice, slice, slice]:
    """The sub-grid that can hold a lesion reaching ``reach_mm`` from its centre (evaluating only there keeps
    placement fast)."""
    corners = shape.center + reach_mm * np.array([[u, v, w] for u in (-1, 1) for v in (-1, 1) for w in (-1, 1)])
    edges = world_to_voxel(corners, affine)
    lo = np.clip(np.floor(edges.min(axis=0)).astype(int) - 1, 0, grid)
    hi = np.clip(np.ceil(edges.max(axis=0)).astype(int) + 1, 0, grid)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _place_lesion(
    rng: np.random.Generator,
    points: np.ndarray,
    affine: np.ndarray,
    kind: str,
    organ: str,
    host: Ellipsoid,
    organ_map: np.ndarray,
    labelmap: np.ndarray,
    midline_x: float,
) -> tuple[float, Ellipsoid, tuple[slice, slice, slice], np.ndarray, np.ndarray] | None:
    """Draw lesion shapes until one lies wholly in the visible host organ on the organ's side of the midline
    (so a liver lesion is on the patient's right), inside the field of view (not on its border), clear of earlier
    lesions and at least :data:`_MIN_LESION_VOXELS` voxels; ``None`` after :data:`_MAX_PLACEMENT_TRIES` draws.
    Returns the diameter, the shape, and the mask and relative radius on the sub-grid ``window``."""
    host_id = ORGANS.index(organ) + 1
    side = -1.0 if ORGAN_SIDES[organ] == "right" else 1.0
    grid = labelmap.shape
    smallest, largest = _DIAMETER_MM[organ]
    smallest = min(
        largest, max(smallest, _MIN_DIAMETER_VOXELS * float(affine_spacing_and_directions(affine)[0][:2].max()))
    )
    for attempt in range(_MAX_PLACEMENT_TRIES):
        if attempt % _TRIES_PER_DIAMETER == 0:  # try several places before giving up on a size
            diameter = float(rng.uniform(smallest, largest))
        semi_axes = diameter / 2.0 * rng.uniform(0.8, 1.0, size=3)
        semi_axes[rng.integers(3)] = diameter / 2.0
        direction = rng.normal(size=3)
        offset = direction / np.linalg.norm(direction) * rng.uniform(0.0, 0.75) ** (1 / 3)
        shape = Ellipsoid(
            host.center + host.rotation @ (offset * host.semi_axes), semi_axes, _random_rotation(rng, 0, 180)
        )
        phase = rng.uniform(0.0, 2 * np.pi)
        window = _lesion_window(shape, diameter / 2.0 * (1.0 + _LOBULATION[kind]), affine, grid)
        mask, relative = _lesion_mask(points[window], shape, _LOBULATION[kind], phase)
        where = np.argwhere(mask) + [w.start for w in window]
        if (
            len(where) >= _MIN_LESION_VOXELS
            and where.min() > 0
            and np.all(where.max(axis=0) < np.asarray(grid) - 1)
            and np.all(organ_map[window][mask] == host_id)
            and not np.any(labelmap[window][mask])
            and np.all((points[window][mask][:, 0] - midline_x) * side > 0)
        ):
            return diameter, shape, window, mask, relative
    return None


def _lesion_position(center: np.ndarray, host: Ellipsoid, midline_x: float) -> dict[str, Any]:
    """Where a lesion lies within its host organ, from the organ's analytic centre, in patient space (so it holds
    whatever the grid orientation). ``relative_offset_lps`` is in units of the organ's half extent per LPS axis;
    a VQA question should skip a direction whose offset is near 0."""
    offset = (center - host.center) / _half_extent(host)
    medial = abs(center[0] - midline_x) < abs(host.center[0] - midline_x)
    return {
        "superior_inferior": "upper" if offset[2] > 0 else "lower",
        "anterior_posterior": "posterior" if offset[1] > 0 else "anterior",
        "medial_lateral": "medial" if medial else "lateral",
        "relative_offset_lps": _round(offset),
    }


def _finding(kind: str, organ: str, diameter_mm: float, hu: float, rim_hu: float | None) -> str:
    if kind == "cyst":
        return f"Cyst in the {organ}: well-circumscribed, fluid attenuation (about {hu:.0f} HU), {diameter_mm:.0f} mm."
    if kind == "hyperdense lesion":
        return (
            f"Hyperdense lesion in the {organ}: lobulated, about {hu:.0f} HU, {diameter_mm:.0f} mm, "
            "compatible with haemorrhage."
        )
    return (
        f"Ring-enhancing lesion in the {organ}: enhancing rim (about {rim_hu:.0f} HU) around a low-attenuation "
        f"centre (about {hu:.0f} HU), {diameter_mm:.0f} mm, compatible with an abscess or necrotic tumour."
    )


def _round(values, ndigits: int = 4) -> list:
    return np.round(np.asarray(values, dtype=float), ndigits).tolist()


def _box_entries(mask: np.ndarray, affine: np.ndarray, label: str) -> dict[str, Any]:
    """Voxel, world and per-slice boxes of one lesion mask, in edge coordinates (docs/conventions.md)."""
    indices = np.argwhere(mask)
    lo, hi = indices.min(axis=0), indices.max(axis=0) + 1
    world = voxel_box_to_world(VoxelBox(lo=lo.astype(float), hi=hi.astype(float), label=label), affine)
    bounds_min, bounds_max = world.bounds()
    slice_boxes = []
    for k in range(int(lo[2]), int(hi[2])):
        ij = np.argwhere(mask[:, :, k])
        (a1, b1), (a2, b2) = ij.min(axis=0), ij.max(axis=0) + 1
        slice_boxes.append({"axis": 2, "index": k, "box": [int(a1), int(b1), int(a2), int(b2)]})
    return {
        "voxel_box": {"lo": lo.tolist(), "hi": hi.tolist()},
        "world_box": {
            "center": _round(world.center),
            "size": _round(world.size),
            "orientation": _round(world.orientation, 8),
        },
        "bounds_lps": {"min": _round(bounds_min), "max": _round(bounds_max)},
        "slice_boxes": slice_boxes,
    }


def make_phantom(
    seed: int | Sequence[int],
    *,
    shape: Sequence[int] = DEFAULT_SHAPE,
    kinds: Sequence[str] | None = None,
    organs: Sequence[str] | None = None,
    n_lesions: int | None = None,
    orientation: str | None = None,
    study_id: str | None = None,
    noise_sd_hu: tuple[float, float] | None = None,
    organ_enhancement_hu: tuple[float, float] | None = None,
) -> Phantom:
    """Generate one abdominal CT study, fully determined by ``seed`` and the arguments.

    ``kinds`` / ``organs`` restrict the lesion kinds and host organs (a distribution shift for experiments);
    ``n_lesions`` defaults to 0-4 drawn at random (several may share an organ), ``orientation`` (one of
    :data:`ORIENTATIONS`) to a random one; ``noise_sd_hu`` is the range the quantum noise SD is drawn from (a
    low-dose protocol is noisier than the default); ``organ_enhancement_hu`` the range of the HU added to the liver,
    spleen and kidneys (a contrast-enhanced protocol; a hyperdense lesion stays 20-35 HU above its host, a cyst and a
    ring's rim keep theirs; default: none). A lesion that cannot be placed fully inside its host organ and the
    field of view is dropped (logged), so ``ground_truth["lesions"]`` is always what the image shows.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < _MIN_SHAPE:
        raise ValueError(f"shape must be three sizes >= {_MIN_SHAPE}, got {shape}")
    kinds = _check_choices("kinds", kinds, LESION_KINDS)
    organs = _check_choices("organs", organs, ORGANS)
    if n_lesions is not None and n_lesions < 0:
        raise ValueError(f"n_lesions must be >= 0, got {n_lesions}")
    noise_range = _NOISE_SD_HU if noise_sd_hu is None else tuple(float(v) for v in noise_sd_hu)
    if len(noise_range) != 2 or not 0 <= noise_range[0] <= noise_range[1]:
        raise ValueError(f"noise_sd_hu must be (low, high) with 0 <= low <= high, got {noise_sd_hu}")
    enhancement = 0.0
    if organ_enhancement_hu is not None:
        low, high = (float(v) for v in organ_enhancement_hu)
        if not 0 <= low <= high:
            raise ValueError(
                f"organ_enhancement_hu must be (low, high) with 0 <= low <= high, got {organ_enhancement_hu}"
            )
        enhancement = float(
            np.random.default_rng([*np.atleast_1d(seed).tolist(), _ENHANCEMENT_STREAM]).uniform(low, high)
        )
    rng = np.random.default_rng(seed)
    # always drawn, so giving the drawn value explicitly reproduces the same study
    drawn_orientation = str(rng.choice(ORIENTATIONS))
    drawn_n_lesions = int(rng.choice(len(_N_LESIONS_P), p=_N_LESIONS_P))
    orientation = orientation or drawn_orientation
    n_lesions = drawn_n_lesions if n_lesions is None else n_lesions

    # Patients lie head first supine on the table: body midline at x = 0, table height and level vary.
    anatomy_center = np.array([0.0, round(rng.uniform(-30.0, 30.0), 1), round(rng.uniform(-250.0, 50.0), 1)])
    fov_center = anatomy_center + np.round(rng.uniform([-10.0, -10.0, -40.0], [10.0, 10.0, 40.0]), 1)
    affine = _make_affine(rng, shape, orientation, fov_center)
    index = np.stack(np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij"), axis=-1)
    points = voxel_to_world(index + 0.5, affine).astype(np.float32)  # voxel centres

    organ_shapes = _organ_shapes(rng, anatomy_center)
    image, organ_map, organ_hu = _paint_anatomy(rng, points, anatomy_center, organ_shapes, enhancement)
    texture = _smooth_noise(rng, shape, 1.5)
    solid = organ_map > 0
    image[solid] += rng.uniform(4.0, 8.0) * texture[solid]
    midline_x = float(anatomy_center[0])
    visible = np.bincount(organ_map.reshape(-1), minlength=len(ORGANS) + 1)[1:]
    organ_entries = {
        name: {
            "center_lps": _round(organ_shapes[name].center),
            "side": ORGAN_SIDES[name],
            "visible_voxels": int(count),
            "in_field_of_view": bool(count > 0),
        }
        for name, count in zip(ORGANS, visible, strict=True)
    }

    labelmap = np.zeros(shape, dtype=np.int16)
    lesions = []
    for _ in range(n_lesions):
        kind, organ = str(rng.choice(kinds)), str(rng.choice(organs))
        host = organ_shapes[organ]
        placed = _place_lesion(rng, points, affine, kind, organ, host, organ_map, labelmap, midline_x)
        if placed is None:
            logger.info("seed %s: no room for a %s in the %s within the field of view; dropped", seed, kind, organ)
            continue
        diameter, shape_, window, mask, relative = placed
        lesion_id = len(lesions) + 1
        labelmap[window][mask] = lesion_id
        rim_hu = None
        if kind == "cyst":
            hu = round(float(rng.uniform(0.0, 12.0)), 1)
            image[window][mask] = hu
        elif kind == "hyperdense lesion":
            hu = round(organ_hu[organ] + float(rng.uniform(*_HYPERDENSE_ABOVE_HOST_HU)), 1)
            image[window][mask] = hu + 4.0 * texture[window][mask]
        else:
            hu, rim_hu = round(float(rng.uniform(10.0, 25.0)), 1), round(float(rng.uniform(110.0, 140.0)), 1)
            image[window][mask] = np.where(relative[mask] > 0.62, rim_hu, hu) + 3.0 * texture[window][mask]
        lesions.append(
            {
                "id": lesion_id,
                "label": kind,
                "organ": organ,
                "side": "right" if shape_.center[0] < midline_x else "left",
                "position": _lesion_position(shape_.center, host, midline_x),
                "finding": _finding(kind, organ, diameter, hu, rim_hu),
                "center_lps": _round(shape_.center),
                "diameter_mm": round(float(diameter), 1),
                "attenuation_hu": hu,
                "rim_attenuation_hu": rim_hu,
                "voxel_count": int(mask.sum()),
                **_box_entries(labelmap == lesion_id, affine, kind),
            }
        )

    # partial-volume blur of the edges, then quantum noise; CT stores integer HU
    image = gaussian_filter(image, 0.35)
    noise_sd = rng.uniform(*noise_range)
    image += noise_sd * _smooth_noise(rng, shape, 0.4)
    image = np.clip(np.rint(image), -1024.0, 3071.0).astype(np.float32)

    diagnosis = sorted({lesion["label"] for lesion in lesions}) or [NORMAL_LABEL]
    report = " ".join(lesion["finding"] for lesion in lesions) or "No focal lesion in the liver, spleen or kidneys."
    ground_truth = {
        "study_id": study_id,
        "generator": {"name": __name__, "version": GENERATOR_VERSION, "seed": np.atleast_1d(seed).tolist()},
        "modality": "CT",
        "body_part": "abdomen",
        "shape": list(shape),
        "spacing": _round(affine_spacing_and_directions(affine)[0], 6),
        "orientation": orientation,
        "affine_lps": affine.tolist(),
        "anatomy_center_lps": _round(anatomy_center),
        "organ_attenuation_hu": organ_hu,
        "organs": organ_entries,
        "diagnosis": diagnosis,
        "report": report,
        "lesions": lesions,
    }
    return Phantom(image=image, affine=affine, labelmap=labelmap, ground_truth=ground_truth, organ_map=organ_map)


def _write_nifti(array: np.ndarray, affine_lps: np.ndarray, path: pathlib.Path) -> None:
    """NIfTI stores RAS: write the converted affine as both sform and qform (scanner-anatomical code)."""
    image = nib.Nifti1Image(array, lps_to_ras(affine_lps))
    image.set_sform(image.affine, code=1)
    image.set_qform(image.affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def save_phantom(phantom: Phantom, out_dir: str | pathlib.Path, *, dicom: bool = False) -> dict[str, Any]:
    """Write one phantom in the sample-data layout (docs/sample-data.md); returns the sidecar as written."""
    study_id = phantom.ground_truth.get("study_id")
    if not study_id:
        raise ValueError("phantom.ground_truth['study_id'] must be set to save a phantom")
    out_dir = pathlib.Path(out_dir)
    truth_dir = out_dir / GROUND_TRUTH_DIR
    truth_dir.mkdir(parents=True, exist_ok=True)
    _write_nifti(phantom.image.astype(np.int16), phantom.affine, out_dir / f"{study_id}.nii.gz")
    _write_nifti(phantom.labelmap, phantom.affine, truth_dir / f"{study_id}_lesions.nii.gz")
    from monailabel_evlf.data.vqa import VQA_SUFFIX, write_vqa  # lazy: circular, vqa imports this module

    write_vqa(vqa_items(phantom.ground_truth), truth_dir / f"{study_id}{VQA_SUFFIX}")
    sidecar = {
        **phantom.ground_truth,
        "files": {
            "image": f"{study_id}.nii.gz",
            "lesion_labelmap": f"{GROUND_TRUTH_DIR}/{study_id}_lesions.nii.gz",
            "vqa": f"{GROUND_TRUTH_DIR}/{study_id}{VQA_SUFFIX}",
            "dicom": None,
        },
        "dicom": None,
    }
    if dicom:
        from monailabel_evlf.data.dicom_series import write_dicom_series  # lazy: pydicom only for DICOM output

        paths = write_dicom_series(
            phantom.image,
            phantom.affine,
            out_dir / DICOM_DIR / study_id,
            patient_id=study_id,
            series_description=f"EVLF phantom {study_id}",
            seed=phantom.ground_truth["generator"]["seed"],
        )
        import pydicom  # lazy: only for DICOM output

        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        sidecar["files"]["dicom"] = f"{DICOM_DIR}/{study_id}"
        sidecar["dicom"] = {
            "study_instance_uid": first.StudyInstanceUID,
            "series_instance_uid": first.SeriesInstanceUID,
            "sop_instance_uids": [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths],
        }
    (truth_dir / f"{study_id}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def vqa_items(ground_truth: dict[str, Any]) -> list[Any]:
    """The study's ground-truth VQA set (:func:`monailabel_evlf.data.vqa.study_vqa`), seeded apart from its image:
    what ``save_phantom`` writes, for in-memory phantoms too."""
    from monailabel_evlf.data.vqa import study_vqa  # lazy: circular, vqa imports this module

    return study_vqa(ground_truth, [*ground_truth["generator"]["seed"], _VQA_STREAM])


def study_id_for(seed: int, index: int) -> str:
    return f"phantom_s{seed}_{index:03d}"


def write_sample_dataset(
    out_dir: str | pathlib.Path,
    n: int = 8,
    seed: int = 0,
    dicom: bool = False,
    kinds: Sequence[str] | None = None,
    organs: Sequence[str] | None = None,
    shape: Sequence[int] = DEFAULT_SHAPE,
) -> list[str]:
    """Write ``n`` studies into ``out_dir`` (a MONAI Label local datastore folder) and return their ids.

    Study ``index`` uses seed ``[seed, index]`` and cycles through :data:`ORIENTATIONS`, so every set of three
    or more covers identity, flipped and oblique grids.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    study_ids = []
    for index in range(n):
        study_id = study_id_for(seed, index)
        phantom = make_phantom(
            [seed, index],
            shape=shape,
            kinds=kinds,
            organs=organs,
            orientation=ORIENTATIONS[index % len(ORIENTATIONS)],
            study_id=study_id,
        )
        save_phantom(phantom, out_dir, dicom=dicom)
        study_ids.append(study_id)
    return study_ids


def read_ground_truth(datastore_dir: str | pathlib.Path, study_id: str) -> dict[str, Any]:
    """The sidecar of one study written by :func:`write_sample_dataset`."""
    path = pathlib.Path(datastore_dir) / GROUND_TRUTH_DIR / f"{study_id}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no ground truth sidecar for study {study_id!r}: {path}")
    return json.loads(path.read_text())
