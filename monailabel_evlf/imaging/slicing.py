"""Cut a volume into the 2D pictures a vision-language model reads, and map boxes between picture and voxels.

Slices are shown as a radiologist reads them (axial: patient Left on image right, Anterior on top), whatever the
file's index order, because that is how the model's training pictures look. Every ``RenderedSlice`` keeps the exact
``pixel_to_plane`` map (display flips, transposition and resize), so a box the model draws comes back to voxels
without guessing; see docs/conventions.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from monai.transforms import Resize

from monailabel_evlf.imaging.geometry import Box2D, VoxelBox, affine_spacing_and_directions
from monailabel_evlf.imaging.volume import Volume
from monailabel_evlf.imaging.windowing import WindowSpec, apply_window, window_bounds, window_channels

__all__ = [
    "RenderedSlice",
    "body_slices",
    "choose_axis",
    "render_slice",
    "render_slices",
    "select_slices",
    "slice_box_to_voxel_box",
    "voxel_box_to_slice_box",
]

_LPS_SUPERIOR = 2
# Radiological display: for a slice whose normal is closest to LPS axis n, the LPS directions that point
# to the image's right and down. Axial: Left right, Posterior down; coronal: Left right, Inferior down;
# sagittal: Posterior right (Anterior on the left), Inferior down.
_SCREEN_RIGHT_DOWN = {
    2: (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),
    1: (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])),
    0: (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])),
}
_CT_BODY_HU = -500.0  # air is about -1000 HU, fat about -100: anything above is inside the patient


@dataclass(frozen=True, eq=False)
class RenderedSlice:
    """One displayed slice: RGB ``image`` (H, W, 3) uint8 of volume slice ``index`` along ``axis``.

    ``pixel_to_plane`` (3x3) maps image edge coordinates ``(x, y, 1)`` to the edge coordinates ``(a, b, 1)`` of the
    two in-plane volume axes in increasing axis order.
    """

    image: np.ndarray
    axis: int
    index: int
    pixel_to_plane: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])

    @property
    def plane_axes(self) -> tuple[int, int]:
        """The volume axes ``(a, b)`` that lie in the slice plane."""
        a, b = (n for n in range(3) if n != self.axis)
        return a, b


@dataclass(frozen=True)
class _Display:
    """How the ``(a, b)`` plane of a slice becomes a picture: which axis runs horizontally and which are flipped."""

    horizontal_is_a: bool
    flip_horizontal: bool
    flip_vertical: bool


def choose_axis(affine: np.ndarray) -> int:
    """The volume axis closest to the patient's superior-inferior direction (axial slices), whatever the order."""
    _, directions = affine_spacing_and_directions(affine)
    return int(np.argmax(np.abs(directions[_LPS_SUPERIOR])))


def _display(affine: np.ndarray, axis: int) -> _Display:
    _, directions = affine_spacing_and_directions(affine)
    a, b = (n for n in range(3) if n != axis)
    right, down = _SCREEN_RIGHT_DOWN[int(np.argmax(np.abs(directions[:, axis])))]
    dir_a, dir_b = directions[:, a], directions[:, b]
    horizontal_is_a = abs(dir_a @ right) + abs(dir_b @ down) >= abs(dir_b @ right) + abs(dir_a @ down)
    dir_h, dir_v = (dir_a, dir_b) if horizontal_is_a else (dir_b, dir_a)
    return _Display(horizontal_is_a, bool(dir_h @ right < 0), bool(dir_v @ down < 0))


def _check_axis(volume: Volume, axis: int | None) -> int:
    axis = choose_axis(volume.affine) if axis is None else int(axis)
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    return axis


def body_slices(volume: Volume, axis: int | None = None, *, min_fraction: float = 0.01) -> np.ndarray:
    """Indices of slices with at least ``min_fraction`` of their voxels inside the body.

    CT: above -500 HU. Other modalities: above 10 % of the 0.5-99.5 percentile range. A cheap screen, not a
    segmentation: it only drops slices of air beyond the patient, which the model would waste time on.
    """
    axis = _check_axis(volume, axis)
    if str(volume.meta.get("modality", "CT")).upper() == "CT":
        threshold = _CT_BODY_HU
    else:
        low, high = window_bounds(volume.array, "percentile", modality="MR")
        threshold = low + 0.1 * (high - low)
    other_axes = tuple(n for n in range(3) if n != axis)
    fraction = np.mean(volume.array > threshold, axis=other_axes)
    return np.flatnonzero(fraction >= min_fraction)


def select_slices(
    volume: Volume,
    axis: int | None = None,
    *,
    start: int = 0,
    stop: int | None = None,
    stride: int = 1,
    around: int | None = None,
    radius: int = 0,
    skip_outside_body: bool = False,
) -> list[int]:
    """Slice indices to read: ``[start, stop)`` every ``stride``-th, or ``around ± radius``; optionally body only.

    ``around`` overrides ``start``/``stop`` (a reader pointing at one slice and its neighbours).
    """
    axis = _check_axis(volume, axis)
    count = volume.shape[axis]
    if stride < 1 or radius < 0:
        raise ValueError(f"stride must be >= 1 and radius >= 0, got stride={stride}, radius={radius}")
    if around is not None:
        if not 0 <= around < count:
            raise ValueError(f"slice {around} is outside 0..{count - 1} along axis {axis}")
        start, stop = max(0, around - radius), min(count, around + radius + 1)
    stop = count if stop is None else stop
    if not 0 <= start < stop <= count:
        raise ValueError(f"slice range [{start}, {stop}) is empty or outside 0..{count} along axis {axis}")
    indices = np.arange(start, stop, stride)
    if skip_outside_body:
        indices = np.intersect1d(indices, body_slices(volume, axis))
    return [int(k) for k in indices]


def _default_size(volume: Volume, axis: int, display: _Display) -> tuple[int, int]:
    """Native grid size with square pixels in mm, so coronal / sagittal cuts of thick-slice scans are not squashed."""
    spacing = volume.spacing
    a, b = (n for n in range(3) if n != axis)
    (h, v) = (a, b) if display.horizontal_is_a else (b, a)
    pixel = min(spacing[h], spacing[v])
    return (
        max(1, round(volume.shape[h] * spacing[h] / pixel)),
        max(1, round(volume.shape[v] * spacing[v] / pixel)),
    )


def _pixel_to_plane(display: _Display, plane_size_hv: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    n_h, n_v = plane_size_hv
    width, height = image_size
    # image (x, y) -> display grid (h, v): a pure scale, since edge coordinates resize exactly.
    to_grid = np.diag([n_h / width, n_v / height, 1.0])
    unflip = np.eye(3)
    if display.flip_horizontal:
        unflip[0] = [-1.0, 0.0, n_h]
    if display.flip_vertical:
        unflip[1] = [0.0, -1.0, n_v]
    to_plane = np.eye(3) if display.horizontal_is_a else np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])
    return to_plane @ unflip @ to_grid


def _display_planes(volume: Volume, indices: Sequence[int], axis: int, display: _Display) -> np.ndarray:
    """``(N, rows, columns)`` float32 cuts of slices ``indices``, transposed and flipped into radiological display."""
    planes = np.moveaxis(np.take(volume.array, indices, axis=axis), axis, 0)  # (N, n_a, n_b)
    if display.horizontal_is_a:
        planes = planes.transpose(0, 2, 1)  # rows follow b, columns follow a
    if display.flip_horizontal:
        planes = planes[:, :, ::-1]
    if display.flip_vertical:
        planes = planes[:, ::-1, :]
    return np.ascontiguousarray(planes, dtype=np.float32)


def _index_step_toward_patient_positive(affine: np.ndarray, axis: int) -> int:
    """+1 or -1: the index step along ``axis`` that moves toward the patient's head, back or left (the positive LPS
    direction closest to the slice normal), so a channel's slice offset means the same whatever the file's order."""
    _, directions = affine_spacing_and_directions(affine)
    normal = directions[:, axis]
    return 1 if normal[int(np.argmax(np.abs(normal)))] > 0 else -1


def render_slices(
    volume: Volume,
    indices: Sequence[int],
    *,
    axis: int | None = None,
    size: tuple[int, int] | None = None,
    window: WindowSpec | Sequence[WindowSpec] = "auto",
) -> list[RenderedSlice]:
    """Render slices as RGB uint8 pictures of ``size`` ``(width, height)`` in radiological display.

    ``window``: one window (grey picture; see :func:`windowing.parse_window`) or three (one per RGB channel, e.g.
    ``["lung", "soft_tissue", "bone"]`` or ``"lung/soft_tissue/bone"``). A channel ``"liver@1"`` shows the slice
    one step toward the patient's head (axial), back (coronal) or left (sagittal) of the rendered one, in patient
    terms whatever the file's index order; past the volume's ends the edge slice repeats. All slices are cut,
    windowed and resized as one batch.
    Resizing is bilinear with pixel centres at ``x + 0.5`` (anti-aliased when shrinking), consistent with the
    edge coordinates of ``pixel_to_plane``. ``size=None`` keeps the grid with square pixels in mm.
    """
    axis = _check_axis(volume, axis)
    indices = [int(k) for k in indices]
    if not indices:
        return []
    if min(indices) < 0 or max(indices) >= volume.shape[axis]:
        raise ValueError(f"slice indices must lie in 0..{volume.shape[axis] - 1} along axis {axis}, got {indices}")
    display = _display(volume.affine, axis)
    modality = str(volume.meta.get("modality", "CT"))
    channels = window_channels(window, modality)
    step, last = _index_step_toward_patient_positive(volume.affine, axis), volume.shape[axis] - 1
    planes = {
        offset: _display_planes(volume, [min(max(k + step * offset, 0), last) for k in indices], axis, display)
        for offset in dict.fromkeys(channel.offset for channel in channels)
    }
    n_v, n_h = planes[channels[0].offset].shape[1:]
    width, height = _default_size(volume, axis, display) if size is None else (int(size[0]), int(size[1]))
    if width < 1 or height < 1:
        raise ValueError(f"rendered size must be positive (width, height), got {size}")
    resize = Resize(spatial_size=(height, width), mode="bilinear", align_corners=False, anti_aliasing=True)
    pictures = []
    for channel in channels:
        windowed = apply_window(planes[channel.offset], window_bounds(volume.array, channel.window, modality))
        resized = windowed if (n_v, n_h) == (height, width) else np.asarray(resize(windowed))
        pictures.append(np.clip(np.rint(resized * 255.0), 0, 255).astype(np.uint8))
    images = np.stack(pictures * 3 if len(pictures) == 1 else pictures, axis=-1)  # (N, H, W, 3)
    pixel_to_plane = _pixel_to_plane(display, (n_h, n_v), (width, height))
    return [
        RenderedSlice(image=image, axis=axis, index=k, pixel_to_plane=pixel_to_plane.copy())
        for image, k in zip(images, indices, strict=True)
    ]


def render_slice(volume: Volume, index: int, **options) -> RenderedSlice:
    """One slice; see :func:`render_slices` for ``axis``, ``size`` and ``window``."""
    return render_slices(volume, [index], **options)[0]


def slice_box_to_voxel_box(box: Box2D, rendered: RenderedSlice) -> VoxelBox:
    """The one-slice-thick voxel box under a box drawn on ``rendered`` (label and score carried over)."""
    corners = rendered.pixel_to_plane @ np.array([[box.x1, box.x2], [box.y1, box.y2], [1.0, 1.0]])
    a, b = rendered.plane_axes
    lo, hi = np.empty(3), np.empty(3)
    lo[[a, b]], hi[[a, b]] = corners[:2].min(axis=1), corners[:2].max(axis=1)
    lo[rendered.axis], hi[rendered.axis] = rendered.index, rendered.index + 1
    return VoxelBox(lo=lo, hi=hi, label=box.label, score=box.score)


def voxel_box_to_slice_box(voxel_box: VoxelBox, rendered: RenderedSlice) -> Box2D:
    """The in-plane extent of ``voxel_box`` in ``rendered``'s pixels, clipped to the image (training targets).

    Raises ValueError when the box does not cross the rendered slice.
    """
    axis, k = rendered.axis, rendered.index
    if not voxel_box.lo[axis] < k + 1 or not voxel_box.hi[axis] > k:
        raise ValueError(
            f"voxel box {voxel_box.lo.tolist()}..{voxel_box.hi.tolist()} does not cross slice {k} along axis {axis}"
        )
    a, b = rendered.plane_axes
    plane = np.array([[voxel_box.lo[a], voxel_box.hi[a]], [voxel_box.lo[b], voxel_box.hi[b]], [1.0, 1.0]])
    corners = np.linalg.solve(rendered.pixel_to_plane, plane)[:2]
    width, height = rendered.size
    x1, x2 = np.clip(np.sort(corners[0]), 0, width)
    y1, y2 = np.clip(np.sort(corners[1]), 0, height)
    return Box2D(x1, y1, x2, y2, label=voxel_box.label, score=voxel_box.score)
