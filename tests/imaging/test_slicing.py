"""Rendered slices: radiological display from the affine, and exact box mapping between pixels and voxels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monailabel_evlf.imaging.geometry import Box2D, VoxelBox, voxel_to_world
from monailabel_evlf.imaging.slicing import (
    body_slices,
    choose_axis,
    render_slice,
    render_slices,
    select_slices,
    slice_box_to_voxel_box,
    voxel_box_to_slice_box,
)
from monailabel_evlf.imaging.volume import Volume

C = math.sqrt(0.5)


def _affine(linear, origin=(0, 0, 0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


# Voxel -> LPS affines; columns are the directions of i, j, k.
AFFINES = {
    "LPS (DICOM order)": _affine(np.diag([0.7, 0.7, 2.0])),
    "RAS-stored NIfTI (i to R, j to A)": _affine(np.diag([-0.7, -0.7, 2.0])),
    "flipped j, feet first": _affine(np.diag([0.8, -0.8, -3.0])),
    "permuted: i=S, j=L, k=A": _affine(np.array([[0, 1.0, 0], [0, 0, -1.0], [2.0, 0, 0]])),
    "oblique 30 degrees about S, transposed in-plane": _affine(
        np.array([[0.5, math.sqrt(0.75), 0], [-math.sqrt(0.75), 0.5, 0], [0, 0, 1.0]])
        @ np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    ),
}
SHAPE = (20, 12, 8)  # every in-plane size divides 240 and 120, so the resize puts voxel edges on pixel edges


def _cube_volume(affine: np.ndarray, lo, hi) -> Volume:
    array = np.full(SHAPE, -1000.0, dtype=np.float32)
    array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = 1000.0
    return Volume(array=array, affine=affine, meta={"modality": "CT"})


def _bright_box(image: np.ndarray) -> Box2D:
    rows, cols = np.nonzero(image[:, :, 0] > 127)
    return Box2D(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


@pytest.mark.parametrize("size", [(120, 120), (240, 120), (120, 240), None])
@pytest.mark.parametrize("name", AFFINES, ids=list(AFFINES))
def test_bright_cube_maps_back_to_its_exact_voxel_box(name: str, size) -> None:
    lo, hi = (3, 2, 1), (9, 5, 7)
    volume = _cube_volume(AFFINES[name], lo, hi)
    axis = choose_axis(volume.affine)
    index = (lo[axis] + hi[axis]) // 2
    rendered = render_slice(volume, index, size=size, window="soft_tissue")
    assert rendered.image.dtype == np.uint8 and rendered.image.shape[2] == 3
    bright = _bright_box(rendered.image)
    voxel = slice_box_to_voxel_box(bright, rendered)
    expected_lo, expected_hi = np.array(lo, dtype=float), np.array(hi, dtype=float)
    expected_lo[axis], expected_hi[axis] = index, index + 1
    np.testing.assert_allclose(voxel.lo, expected_lo, atol=1e-9)
    np.testing.assert_allclose(voxel.hi, expected_hi, atol=1e-9)
    back = voxel_box_to_slice_box(VoxelBox(lo=lo, hi=hi), rendered)
    np.testing.assert_allclose(back.as_array(), bright.as_array(), atol=1e-9)


@pytest.mark.parametrize("name", AFFINES, ids=list(AFFINES))
def test_axial_display_is_radiological(name: str) -> None:
    """The most left-anterior voxel of an axial slice is drawn top right; the right-posterior one bottom left."""
    affine = AFFINES[name]
    axis = choose_axis(affine)
    index = 3
    grid = np.stack(np.meshgrid(*[np.arange(n) + 0.5 for n in SHAPE], indexing="ij"), axis=-1)
    world = np.take(voxel_to_world(grid, affine), index, axis=axis)  # (n_a, n_b, 3) LPS centres of the slice
    left_anterior = np.unravel_index(np.argmax(world[..., 0] - world[..., 1]), world.shape[:2])
    right_posterior = np.unravel_index(np.argmax(world[..., 1] - world[..., 0]), world.shape[:2])
    array = np.full(SHAPE, -1000.0, dtype=np.float32)
    for value, (a, b) in ((1000.0, left_anterior), (-500.0, right_posterior)):
        voxel = [a, b]
        voxel.insert(axis, index)
        array[tuple(voxel)] = value
    image = render_slice(Volume(array, affine), index, window="-500,1000", size=None).image[:, :, 0]
    height, width = image.shape
    assert image[0, width - 1] == 255, "left-anterior voxel should be top right"
    assert image[height - 1, 0] == 128, "right-posterior voxel should be bottom left"


def test_coronal_and_sagittal_display() -> None:
    """Coronal: Left right, Superior up. Sagittal: Posterior right (Anterior left), Superior up."""
    array = np.zeros((4, 4, 4), dtype=np.float32)
    array[3, 0, 3] = 1.0  # LPS identity: most Left, most Anterior, most Superior
    volume = Volume(array, np.eye(4), {"modality": "MR"})
    coronal = render_slice(volume, 0, axis=1, window="0.5,1").image[:, :, 0]
    assert coronal[0, 3] == 255 and coronal.sum() == 255
    sagittal = render_slice(volume, 3, axis=0, window="0.5,1").image[:, :, 0]
    assert sagittal[0, 0] == 255 and sagittal.sum() == 255


def test_axis_choice_follows_superior_inferior() -> None:
    assert choose_axis(AFFINES["LPS (DICOM order)"]) == 2
    assert choose_axis(AFFINES["permuted: i=S, j=L, k=A"]) == 0
    coronal_acquisition = _affine(np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]))  # j runs S-I
    assert choose_axis(coronal_acquisition) == 1


def test_default_size_keeps_pixels_square_in_mm() -> None:
    volume = Volume(np.zeros((10, 10, 4), dtype=np.float32), _affine(np.diag([1.0, 1.0, 5.0])))
    assert render_slice(volume, 0, axis=1).size == (10, 20)  # 10 mm wide (i), 20 mm tall (k), 1 mm pixels


def test_three_windows_fill_three_channels() -> None:
    array = np.full((4, 4, 2), -600.0, dtype=np.float32)
    image = render_slice(Volume(array, np.eye(4)), 0, window=["lung", "soft_tissue", "bone"]).image
    assert tuple(image[0, 0]) == (128, 0, 0)
    same = render_slice(Volume(array, np.eye(4)), 0, window="lung/soft_tissue/bone").image
    assert np.array_equal(same, image)


@pytest.mark.parametrize("name", AFFINES, ids=list(AFFINES))
def test_slice_offset_channels_show_the_neighbours_toward_head_and_feet(name: str) -> None:
    """``window@offset`` counts slices in patient terms: +1 is the neighbour toward the head whatever the index
    order (the "feet first" and permuted affines run the other way or along another axis)."""
    affine = AFFINES[name]
    axis = choose_axis(affine)
    step = np.zeros(3)
    step[axis] = 1.0
    toward_head = 1 if (affine[:3, :3] @ step)[2] > 0 else -1  # the LPS S coordinate grows with the index
    volume = Volume(np.random.default_rng(1).uniform(0, 200, SHAPE).astype(np.float32), affine, {"modality": "CT"})
    middle = SHAPE[axis] // 2
    image = render_slice(volume, middle, window="100,200@-1/100,200/100,200@1", size=(48, 48)).image
    for channel, index in enumerate((middle - toward_head, middle, middle + toward_head)):
        alone = render_slice(volume, index, window="100,200", size=(48, 48)).image[:, :, 0]
        np.testing.assert_array_equal(image[:, :, channel], alone)


def test_slice_offset_past_the_volume_end_repeats_the_edge_slice() -> None:
    volume = Volume(np.arange(4, dtype=np.float32).reshape(1, 1, 4).repeat(2, 0).repeat(2, 1), np.eye(4))
    image = render_slice(volume, 0, window="1.5,3@-1/1.5,3/1.5,3@2").image  # slices -1 (none), 0 and 2
    assert tuple(image[0, 0]) == (0, 0, 170)


def test_batch_rendering_matches_one_by_one() -> None:
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(0, 200, (30, 20, 6)).astype(np.float32), AFFINES["RAS-stored NIfTI (i to R, j to A)"])
    batch = render_slices(volume, [0, 2, 5], size=(64, 48))
    for rendered in batch:
        single = render_slice(volume, rendered.index, size=(64, 48))
        np.testing.assert_array_equal(rendered.image, single.image)
        np.testing.assert_array_equal(rendered.pixel_to_plane, single.pixel_to_plane)
    assert [r.index for r in batch] == [0, 2, 5] and batch[0].size == (64, 48)


def test_select_slices() -> None:
    array = np.full((4, 4, 10), -1000.0, dtype=np.float32)
    array[1:3, 1:3, 3:7] = 40.0  # body on slices 3..6
    volume = Volume(array, np.eye(4), {"modality": "CT"})
    assert select_slices(volume) == list(range(10))
    assert select_slices(volume, stride=3) == [0, 3, 6, 9]
    assert select_slices(volume, start=2, stop=5) == [2, 3, 4]
    assert select_slices(volume, around=1, radius=2) == [0, 1, 2, 3]
    assert select_slices(volume, skip_outside_body=True) == [3, 4, 5, 6]
    assert body_slices(volume, axis=0).tolist() == [1, 2]
    with pytest.raises(ValueError, match="outside"):
        select_slices(volume, around=10)
    with pytest.raises(ValueError, match="stride"):
        select_slices(volume, stride=0)
    with pytest.raises(ValueError, match="empty or outside"):
        select_slices(volume, start=5, stop=5)


def test_bad_requests_raise_value_error() -> None:
    volume = Volume(np.zeros((4, 4, 3), dtype=np.float32), np.eye(4))
    with pytest.raises(ValueError, match="slice indices"):
        render_slices(volume, [3])
    with pytest.raises(ValueError, match="axis"):
        render_slice(volume, 0, axis=3)
    rendered = render_slice(volume, 1)
    with pytest.raises(ValueError, match="does not cross slice 1"):
        voxel_box_to_slice_box(VoxelBox(lo=(0, 0, 2), hi=(1, 1, 3)), rendered)
    with pytest.raises(ValueError, match="3D array"):
        Volume(np.zeros((4, 4)), np.eye(4))
