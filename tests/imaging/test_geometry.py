"""Known-answer and property tests for the box types and voxel <-> LPS transforms (docs/conventions.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from monailabel_evlf.imaging.geometry import (
    Box2D,
    VoxelBox,
    WorldBox,
    affine_spacing_and_directions,
    box_iou_2d,
    box_iou_3d,
    lps_to_ras,
    ras_to_lps,
    voxel_box_to_world,
    voxel_to_world,
    world_box_to_voxel,
    world_to_voxel,
)

C = math.sqrt(0.5)


def _affine(columns, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(columns, dtype=float).T  # rows given here are the i, j, k columns
    affine[:3, 3] = origin
    return affine


# (affine, voxel box lo, hi, expected world centre, size, orientation, bounds min, bounds max), all by hand.
KNOWN_BOXES = {
    "identity": (
        np.eye(4),
        (2, 3, 4),
        (5, 7, 6),
        (3.0, 4.5, 4.5),
        (3.0, 4.0, 2.0),
        np.eye(3),
        (1.5, 2.5, 3.5),
        (4.5, 6.5, 5.5),
    ),
    "flipped i, anisotropic, origin": (
        _affine([(-2, 0, 0), (0, 1, 0), (0, 0, 3)], (100, -20, 5)),
        (0, 0, 0),
        (1, 1, 1),
        (100.0, -20.0, 5.0),
        (2.0, 1.0, 3.0),
        np.diag([-1.0, 1.0, 1.0]),
        (99.0, -20.5, 3.5),
        (101.0, -19.5, 6.5),
    ),
    "flipped j": (
        _affine([(1, 0, 0), (0, -0.5, 0), (0, 0, 1)], (0, 10, 0)),
        (0, 2, 0),
        (1, 6, 1),
        (0.0, 8.25, 0.0),
        (1.0, 2.0, 1.0),
        np.diag([1.0, -1.0, 1.0]),
        (-0.5, 7.25, -0.5),
        (0.5, 9.25, 0.5),
    ),
    "permuted axes (i=S, j=L, k=P)": (
        _affine([(0, 0, 2), (0.5, 0, 0), (0, 1.5, 0)], (10, 20, 30)),
        (1, 2, 3),
        (3, 4, 4),
        (11.25, 24.5, 33.0),
        (4.0, 1.0, 1.5),
        np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]),
        (10.75, 23.75, 31.0),
        (11.75, 25.25, 35.0),
    ),
    "oblique 45 degrees about S, spacing (1, 2, 1)": (
        _affine([(C, C, 0), (-2 * C, 2 * C, 0), (0, 0, 1)], (0, 0, 0)),
        (0, 0, 0),
        (2, 2, 1),
        (-0.5 * C, 1.5 * C, 0.0),
        (2.0, 4.0, 1.0),
        np.array([[C, -C, 0], [C, C, 0], [0, 0, 1]]),
        (-3.5 * C, -1.5 * C, -0.5),
        (2.5 * C, 4.5 * C, 0.5),
    ),
}


@pytest.mark.parametrize("case", KNOWN_BOXES, ids=list(KNOWN_BOXES))
def test_voxel_box_maps_to_hand_computed_world_box(case: str) -> None:
    affine, lo, hi, center, size, orientation, bounds_min, bounds_max = KNOWN_BOXES[case]
    world = voxel_box_to_world(VoxelBox(lo=lo, hi=hi, label="cyst", score=0.5), affine)
    np.testing.assert_allclose(world.center, center, atol=1e-12)
    np.testing.assert_allclose(world.size, size, atol=1e-12)
    np.testing.assert_allclose(world.orientation, orientation, atol=1e-12)
    np.testing.assert_allclose(world.bounds()[0], bounds_min, atol=1e-12)
    np.testing.assert_allclose(world.bounds()[1], bounds_max, atol=1e-12)
    corners = world.corners()
    np.testing.assert_allclose(corners.min(axis=0), bounds_min, atol=1e-12)
    np.testing.assert_allclose(corners.max(axis=0), bounds_max, atol=1e-12)
    assert (world.label, world.score) == ("cyst", 0.5)
    back = world_box_to_voxel(world, affine)
    np.testing.assert_array_equal(back.lo, lo)
    np.testing.assert_array_equal(back.hi, hi)


def test_half_voxel_rule_puts_voxel_centres_at_affine_positions() -> None:
    affine = _affine([(-2, 0, 0), (0, 1, 0), (0, 0, 3)], (100, -20, 5))
    np.testing.assert_allclose(voxel_to_world([0.5, 0.5, 0.5], affine), [100, -20, 5])
    np.testing.assert_allclose(voxel_to_world([[0, 0, 0], [3.5, 1.5, 2.5]], affine), [[101, -20.5, 3.5], [94, -19, 11]])
    np.testing.assert_allclose(world_to_voxel([94, -19, 11], affine), [3.5, 1.5, 2.5])


def test_lps_ras_flip_points_and_affines() -> None:
    np.testing.assert_array_equal(lps_to_ras([1.0, 2.0, 3.0]), [-1.0, -2.0, 3.0])
    np.testing.assert_array_equal(ras_to_lps([[1.0, 2.0, 3.0], [-4, 5, 6]]), [[-1, -2, 3], [4, -5, 6]])
    affine = _affine([(2, 0, 0), (0, 3, 0), (0, 0, 4)], (10, 20, 30))
    ras = lps_to_ras(affine)
    np.testing.assert_array_equal(ras[:3, 3], [-10, -20, 30])
    np.testing.assert_array_equal(np.diag(ras), [-2, -3, 4, 1])
    np.testing.assert_array_equal(ras_to_lps(ras), affine)
    with pytest.raises(ValueError, match="last dimension of 3"):
        lps_to_ras([1.0, 2.0])


def test_spacing_and_directions_reject_shear() -> None:
    spacing, directions = affine_spacing_and_directions(_affine([(0, 0, 2), (0.5, 0, 0), (0, 1.5, 0)], (0, 0, 0)))
    np.testing.assert_allclose(spacing, [2, 0.5, 1.5])
    np.testing.assert_allclose(directions, [[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="sheared"):
        affine_spacing_and_directions(_affine([(1, 0, 0), (1, 1, 0), (0, 0, 1)], (0, 0, 0)))
    with pytest.raises(ValueError, match="singular"):
        voxel_to_world([0, 0, 0], np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="4x4"):
        world_to_voxel([0, 0, 0], np.eye(3))


def test_iou_known_values() -> None:
    assert box_iou_2d(Box2D(0, 0, 2, 2), Box2D(1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou_2d(Box2D(0, 0, 2, 2), Box2D(2, 0, 4, 2)) == 0.0  # touching half-open boxes share no pixel
    assert box_iou_2d(Box2D(0, 0, 2, 2), Box2D(0, 0, 2, 2)) == pytest.approx(1.0)
    a, b = VoxelBox(lo=(0, 0, 0), hi=(2, 2, 2)), VoxelBox(lo=(1, 1, 1), hi=(3, 3, 3))
    assert box_iou_3d(a, b) == pytest.approx(1 / 15)
    matrix = box_iou_2d([Box2D(0, 0, 2, 2), Box2D(0, 0, 1, 1)], np.array([[0, 0, 2, 2], [10, 10, 11, 11.0]]))
    np.testing.assert_allclose(matrix, [[1, 0], [0.25, 0]], atol=1e-6)
    assert box_iou_2d(np.zeros((0, 4)), [Box2D(0, 0, 1, 1)]).shape == (0, 1)


def test_world_box_iou_in_a_shared_oblique_frame() -> None:
    affine = KNOWN_BOXES["oblique 45 degrees about S, spacing (1, 2, 1)"][0]
    a = voxel_box_to_world(VoxelBox(lo=(0, 0, 0), hi=(2, 2, 2)), affine)
    b = voxel_box_to_world(VoxelBox(lo=(1, 1, 1), hi=(3, 3, 3)), affine)
    assert box_iou_3d(a, b) == pytest.approx(1 / 15)
    turned = WorldBox(center=b.center, size=b.size, orientation=np.eye(3))
    with pytest.raises(ValueError, match="different orientations"):
        box_iou_3d(a, turned)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Box2D(0, 0, float("nan"), 1), "not finite"),
        (lambda: Box2D(2, 0, 1, 1), "inverted"),
        (lambda: Box2D(0, 0, 1, 1, score=float("inf")), "score must be finite"),
        (lambda: VoxelBox(lo=(0, 0, 3), hi=(1, 1, 2)), "inverted"),
        (lambda: VoxelBox(lo=(0, 0), hi=(1, 1)), "3 values"),
        (lambda: VoxelBox(lo=(0, 0, np.nan), hi=(1, 1, 1)), "not finite"),
        (lambda: WorldBox(center=(0, 0, 0), size=(1, -1, 1), orientation=np.eye(3)), "negative"),
        (lambda: WorldBox(center=(0, 0, 0), size=(1, 1, 1), orientation=2 * np.eye(3)), "orthonormal"),
        (lambda: box_iou_2d(np.array([[0, 0, -1, 1.0]]), np.array([[0, 0, 1, 1.0]])), "lo <= hi"),
    ],
)
def test_bad_boxes_raise_value_error(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_boxes_are_frozen_values_with_dict_round_trips() -> None:
    box = VoxelBox(lo=[1, 2, 3], hi=[4, 5, 6], label="cyst", score=0.9)
    with pytest.raises(ValueError, match="read-only"):
        box.lo[0] = 7
    assert VoxelBox.from_dict(box.to_dict()) == box
    assert box != VoxelBox(lo=[1, 2, 3], hi=[4, 5, 7], label="cyst", score=0.9)
    assert Box2D.from_dict(Box2D(1, 2, 3, 4, label="a", score=0.1).to_dict()) == Box2D(1, 2, 3, 4, "a", 0.1)
    assert Box2D.from_dict({"bbox_2d": [1, 2, 3, 4]}).area == 4.0
    world = voxel_box_to_world(box, KNOWN_BOXES["permuted axes (i=S, j=L, k=P)"][0])
    assert WorldBox.from_dict(world.to_dict()) == world
    np.testing.assert_array_equal(box.to_slices(), (slice(1, 4), slice(2, 5), slice(3, 6)))


def test_a_snapped_box_covers_exactly_the_voxels_whose_centres_it_holds() -> None:
    """Edges go to the voxel edges that keep the same voxels (centre inside); a box thinner than a voxel keeps the
    voxel nearest its centre; label and score stay."""
    box = VoxelBox(lo=[19.2, 28.8, 6.0], hi=[24.0, 34.6, 10.0], label="cyst", score=0.4)
    snapped = box.snapped()
    assert snapped == VoxelBox(lo=[19, 29, 6], hi=[24, 35, 10], label="cyst", score=0.4)
    assert snapped.to_slices() == box.to_slices()
    thin = VoxelBox(lo=[10.2, 3.0, 0.0], hi=[10.4, 5.0, 1.0]).snapped()  # no voxel centre inside along i
    np.testing.assert_array_equal(thin.lo, [10, 3, 0])
    np.testing.assert_array_equal(thin.hi, [11, 5, 1])
    assert VoxelBox(lo=[1, 2, 3], hi=[4, 5, 6]).snapped() == VoxelBox(lo=[1, 2, 3], hi=[4, 5, 6])


finite = st.floats(-200, 200, allow_nan=False)


@st.composite
def affines(draw) -> np.ndarray:
    """Any rotation or reflection, spacing 0.1-5 mm, origin within 500 mm."""
    quaternion = np.array(draw(st.tuples(*[st.floats(-1, 1)] * 4)))
    rotation = Rotation.from_quat(quaternion).as_matrix() if np.linalg.norm(quaternion) > 0.1 else np.eye(3)
    reflection = np.diag(draw(st.sampled_from([(1, 1, 1), (-1, 1, 1), (1, -1, -1), (-1, -1, -1)])))
    spacing = draw(st.tuples(*[st.floats(0.1, 5)] * 3))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ reflection @ np.diag(spacing)
    affine[:3, 3] = draw(st.tuples(*[st.floats(-500, 500)] * 3))
    return affine


@settings(max_examples=60, deadline=None)
@given(affine=affines(), point=st.tuples(finite, finite, finite))
def test_world_to_voxel_to_world_is_identity(affine: np.ndarray, point) -> None:
    np.testing.assert_allclose(voxel_to_world(world_to_voxel(point, affine), affine), point, atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(
    affine=affines(),
    lo=st.tuples(*[st.integers(-50, 200)] * 3),
    extent=st.tuples(*[st.integers(0, 60)] * 3),
)
def test_voxel_box_to_world_to_voxel_is_identity(affine: np.ndarray, lo, extent) -> None:
    box = VoxelBox(lo=lo, hi=np.add(lo, extent), label="x", score=0.3)
    world = voxel_box_to_world(box, affine)
    np.testing.assert_allclose(world.size, np.asarray(extent) * np.linalg.norm(affine[:3, :3], axis=0), atol=1e-9)
    assert world_box_to_voxel(world, affine) == box
