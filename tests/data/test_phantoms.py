"""Synthetic phantoms: geometry checked against ITK's reading of the written files, anatomy placed in patient
space, lesion appearance, determinism and input checks."""

from __future__ import annotations

import json
from pathlib import Path

import itk
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monailabel_evlf.data.phantoms import (
    _MIN_LESION_VOXELS,
    LESION_KINDS,
    NORMAL_LABEL,
    ORGAN_SIDES,
    ORGANS,
    ORIENTATIONS,
    Ellipsoid,
    _lesion_position,
    make_phantom,
    read_ground_truth,
    save_phantom,
    write_sample_dataset,
)

SMALL = (48, 48, 20)
# patient Left is +x in LPS
EXPECTED_SIDE = {"liver": -1.0, "right kidney": -1.0, "spleen": 1.0, "left kidney": 1.0}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    """One study per orientation with three lesions each, written to disk."""
    out = tmp_path_factory.mktemp("phantoms")
    phantoms = {}
    for orientation in ORIENTATIONS:
        phantom = make_phantom(11, orientation=orientation, n_lesions=3, study_id=f"study_{orientation}")
        save_phantom(phantom, out)
        phantoms[orientation] = phantom
    return out, phantoms


def _itk_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array in (i, j, k) order and voxel-centre -> LPS affine, from ITK's own origin/spacing/direction."""
    image = itk.imread(str(path))
    array = itk.array_from_image(image).transpose(2, 1, 0)  # ITK's numpy view is (k, j, i)
    direction = itk.array_from_matrix(image.GetDirection())
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing())
    affine[:3, 3] = np.asarray(image.GetOrigin())
    return array, affine


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_sidecar_world_boxes_match_itk_reading(written, orientation):
    out, _ = written
    truth = json.loads((out / "ground_truth" / f"study_{orientation}.json").read_text())
    labelmap, affine = _itk_read(out / truth["files"]["lesion_labelmap"])
    assert truth["orientation"] == orientation
    assert len(truth["lesions"]) >= 2, "phantom too crowded to test with"
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    for lesion in truth["lesions"]:
        ijk = np.argwhere(labelmap == lesion["id"])
        lo, hi = ijk.min(axis=0), ijk.max(axis=0) + 1
        centre_index = (lo + hi) / 2.0 - 0.5  # edge -> centre-index coordinates
        np.testing.assert_array_equal(lesion["voxel_box"]["lo"], lo)
        np.testing.assert_array_equal(lesion["voxel_box"]["hi"], hi)
        assert lesion["voxel_count"] == len(ijk)
        box = lesion["world_box"]
        np.testing.assert_allclose(box["center"], affine[:3, :3] @ centre_index + affine[:3, 3], atol=1e-3)
        np.testing.assert_allclose(box["size"], (hi - lo) * spacing, atol=1e-3)
        np.testing.assert_allclose(box["orientation"], affine[:3, :3] / spacing, atol=1e-6)
        corners = np.array([[u, v, w] for u in (lo[0], hi[0]) for v in (lo[1], hi[1]) for w in (lo[2], hi[2])])
        corners_lps = (corners - 0.5) @ affine[:3, :3].T + affine[:3, 3]
        np.testing.assert_allclose(lesion["bounds_lps"]["min"], corners_lps.min(axis=0), atol=1e-3)
        np.testing.assert_allclose(lesion["bounds_lps"]["max"], corners_lps.max(axis=0), atol=1e-3)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_files_hold_the_phantom_arrays_and_affine(written, orientation):
    out, phantoms = written
    phantom = phantoms[orientation]
    image, affine = _itk_read(out / f"study_{orientation}.nii.gz")
    np.testing.assert_array_equal(image, phantom.image)
    np.testing.assert_allclose(affine, phantom.affine, atol=1e-4)
    np.testing.assert_allclose(phantom.ground_truth["affine_lps"], phantom.affine)
    expected = {"identity": np.eye(3), "flipped": np.diag([-1.0, -1.0, 1.0])}
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if orientation in expected:
        np.testing.assert_allclose(directions, expected[orientation], atol=1e-6)
    else:
        tilt = np.degrees(np.arccos((np.trace(directions) - 1.0) / 2.0))
        assert 10.0 - 1e-3 <= tilt <= 25.0 + 1e-3
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    assert spacing[2] > 1.1 * spacing[0]  # anisotropic: thick slices
    assert np.linalg.norm(affine[:3, 3]) > 10.0  # a real origin, not the zero default


def test_slice_boxes_are_the_per_slice_extent_of_the_mask(written):
    _, phantoms = written
    for phantom in phantoms.values():
        for lesion in phantom.ground_truth["lesions"]:
            mask = phantom.labelmap == lesion["id"]
            lo, hi = lesion["voxel_box"]["lo"], lesion["voxel_box"]["hi"]
            assert [s["index"] for s in lesion["slice_boxes"]] == list(range(lo[2], hi[2]))
            for entry in lesion["slice_boxes"]:
                a1, b1, a2, b2 = entry["box"]
                assert entry["axis"] == 2
                in_slice = mask[:, :, entry["index"]]
                assert in_slice[a1:a2, b1:b2].sum() == in_slice.sum()  # the box holds the whole cut
                assert in_slice[a1, b1:b2].any() and in_slice[a2 - 1, b1:b2].any()  # and is tight
                assert in_slice[a1:a2, b1].any() and in_slice[a1:a2, b2 - 1].any()
            boxes = np.array([entry["box"] for entry in lesion["slice_boxes"]])
            assert [boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()] == [
                lo[0],
                lo[1],
                hi[0],
                hi[1],
            ]


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_anatomy_and_lesions_sit_on_the_anatomical_side(orientation):
    """Liver and right kidney at LPS x < 0 (patient right), spleen and left kidney at x > 0, kidneys posterior
    to the liver's centre, whatever the direction cosines of the grid."""
    for seed in range(3):
        phantom = make_phantom(seed, shape=SMALL, orientation=orientation, n_lesions=3)
        centre = np.asarray(phantom.ground_truth["anatomy_center_lps"])
        index = np.argwhere(np.ones(SMALL, dtype=bool)).astype(float)
        world = index @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]
        organ_ids = phantom.organ_map.reshape(-1)
        for organ_id, organ in enumerate(ORGANS, start=1):
            inside = world[organ_ids == organ_id]
            if len(inside):
                assert np.sign(inside[:, 0].mean() - centre[0]) == EXPECTED_SIDE[organ], (seed, organ)
        for lesion in phantom.ground_truth["lesions"]:
            organ_id = ORGANS.index(lesion["organ"]) + 1
            assert np.all(phantom.organ_map[phantom.labelmap == lesion["id"]] == organ_id)
            assert np.sign(lesion["world_box"]["center"][0] - centre[0]) == EXPECTED_SIDE[lesion["organ"]]
            if "kidney" in lesion["organ"]:
                assert lesion["world_box"]["center"][1] > centre[1]  # posterior (LPS y grows to Posterior)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_lesion_side_is_the_patient_side_of_its_organ(orientation):
    """A liver or right-kidney lesion is on the patient's right (every voxel at LPS x < 0), a spleen or
    left-kidney lesion on the left, whatever the grid; ``organs`` gives each organ's side and visible part."""
    for seed in range(4):
        phantom = make_phantom(seed, shape=SMALL, orientation=orientation, n_lesions=4)
        truth = phantom.ground_truth
        index = np.argwhere(np.ones(SMALL, dtype=bool)).astype(float)
        world_x = (index @ phantom.affine[:3, :3].T + phantom.affine[:3, 3])[:, 0].reshape(SMALL)
        for lesion in truth["lesions"]:
            expected = {"liver": "right", "right kidney": "right", "spleen": "left", "left kidney": "left"}
            assert lesion["side"] == expected[lesion["organ"]] == ORGAN_SIDES[lesion["organ"]]
            x = world_x[phantom.labelmap == lesion["id"]]
            assert np.all(x < 0) if lesion["side"] == "right" else np.all(x > 0)
        for organ_id, organ in enumerate(ORGANS, start=1):
            entry = truth["organs"][organ]
            assert entry["side"] == ORGAN_SIDES[organ]
            assert entry["visible_voxels"] == int((phantom.organ_map == organ_id).sum())
            assert entry["in_field_of_view"] == (entry["visible_voxels"] > 0)
            assert (entry["center_lps"][0] < 0) == (entry["side"] == "right")


def test_lesion_position_within_its_organ_hand_computed():
    """Host centred at x = -60 (patient right) with half extents 50 / 40 / 30 mm: a lesion at (-30, 10, -15) is
    medial (nearer the midline), posterior (LPS y > centre) and in the lower part, offsets (0.6, 0.25, -0.5)."""
    host = Ellipsoid(np.array([-60.0, 0.0, 0.0]), np.array([50.0, 40.0, 30.0]))
    got = _lesion_position(np.array([-30.0, 10.0, -15.0]), host, midline_x=0.0)
    assert got == {
        "superior_inferior": "lower",
        "anterior_posterior": "posterior",
        "medial_lateral": "medial",
        "relative_offset_lps": [0.6, 0.25, -0.5],
    }
    # the same offset on the left organ mirrored: still medial; further out than the centre: lateral
    mirrored = Ellipsoid(np.array([60.0, 0.0, 0.0]), np.array([50.0, 40.0, 30.0]))
    assert _lesion_position(np.array([30.0, -10.0, 15.0]), mirrored, 0.0)["medial_lateral"] == "medial"
    assert _lesion_position(np.array([90.0, -10.0, 15.0]), mirrored, 0.0)["medial_lateral"] == "lateral"
    assert _lesion_position(np.array([90.0, -10.0, 15.0]), mirrored, 0.0)["anterior_posterior"] == "anterior"


def test_phantom_positions_agree_with_the_organ_centres():
    for seed in range(3):
        truth = make_phantom(seed, shape=SMALL, n_lesions=4).ground_truth
        for lesion in truth["lesions"]:
            organ_centre = np.asarray(truth["organs"][lesion["organ"]]["center_lps"])
            x, y, z = lesion["center_lps"]
            position = lesion["position"]
            assert position["superior_inferior"] == ("upper" if z > organ_centre[2] else "lower")
            assert position["anterior_posterior"] == ("posterior" if y > organ_centre[1] else "anterior")
            assert position["medial_lateral"] == ("medial" if abs(x) < abs(organ_centre[0]) else "lateral")
            assert np.all(np.sign(position["relative_offset_lps"]) == np.sign([x, y, z] - organ_centre))


def test_studies_vary_field_of_view_spacing_lesion_count_and_size():
    """Across seeds at the default shape: in-plane field of view 260-440 mm, 3.5-6 mm slices, 0-4 lesions with
    lesion-free studies and two lesions in one organ, lesions from a few voxels (on one or two slices) up."""
    truths = [make_phantom([21, index]).ground_truth for index in range(16)]
    fov = np.array([t["spacing"][0] * t["shape"][0] for t in truths])
    thickness = np.array([t["spacing"][2] for t in truths])
    assert np.all((fov >= 260.0 - 0.1) & (fov <= 440.0 + 0.1)) and np.ptp(fov) > 100.0
    assert np.all((thickness >= 3.5 - 1e-3) & (thickness <= 6.0 + 1e-3)) and np.ptp(thickness) > 1.0
    counts = [len(t["lesions"]) for t in truths]
    assert max(counts) <= 4 and 0 in counts and len(set(counts)) >= 3
    organs_per_study = [[lesion["organ"] for lesion in t["lesions"]] for t in truths]
    assert any(len(organs) > len(set(organs)) for organs in organs_per_study)
    lesions = [lesion for t in truths for lesion in t["lesions"]]
    assert all(lesion["voxel_count"] >= _MIN_LESION_VOXELS for lesion in lesions)
    assert min(lesion["diameter_mm"] for lesion in lesions) < 12.0
    # never under 2.5 in-plane voxels: smaller is invisible on the slice (diameters are rounded to 0.1 mm)
    assert all(les["diameter_mm"] >= 2.5 * max(t["spacing"][:2]) - 0.06 for t in truths for les in t["lesions"])
    assert any(len(lesion["slice_boxes"]) <= 2 and lesion["voxel_count"] < 20 for lesion in lesions)
    assert max(lesion["diameter_mm"] for lesion in lesions) > 25.0
    liver_hu = [t["organ_attenuation_hu"]["liver"] for t in truths]
    assert np.ptp(liver_hu) > 10.0


def test_lesion_attenuation_matches_its_kind():
    seen = set()
    for seed in range(6):
        phantom = make_phantom(seed, n_lesions=3)
        hu_of_organ = phantom.ground_truth["organ_attenuation_hu"]
        for lesion in phantom.ground_truth["lesions"]:
            if lesion["voxel_count"] < 20:  # the median of a few voxels is mostly noise
                continue
            values = phantom.image[phantom.labelmap == lesion["id"]]
            host = hu_of_organ[lesion["organ"]]
            seen.add(lesion["label"])
            if lesion["label"] == "cyst":
                assert np.median(values) < host - 10.0
                assert abs(np.median(values) - lesion["attenuation_hu"]) < 20.0
            elif lesion["label"] == "hyperdense lesion":
                assert np.median(values) > host + 10.0
                assert host + 20.0 <= lesion["attenuation_hu"] <= host + 35.0  # relative to its host
            else:
                assert np.percentile(values, 90) > host + 30.0  # the enhancing rim
                assert lesion["rim_attenuation_hu"] > 100.0 > lesion["attenuation_hu"]
    assert seen == set(LESION_KINDS)
    corner = phantom.image[:4, :4, :]
    assert abs(np.median(corner) + 1000.0) < 20.0  # air outside the body


def test_normal_study_has_no_lesion():
    phantom = make_phantom(4, shape=SMALL, n_lesions=0)
    assert phantom.ground_truth["diagnosis"] == [NORMAL_LABEL]
    assert phantom.ground_truth["lesions"] == []
    assert not phantom.labelmap.any()
    assert "No focal lesion" in phantom.ground_truth["report"]


def test_a_low_dose_protocol_is_noisier_and_changes_nothing_else():
    standard, low_dose = make_phantom(3, shape=SMALL), make_phantom(3, shape=SMALL, noise_sd_hu=(40.0, 40.0))
    assert json.dumps(standard.ground_truth) == json.dumps(low_dose.ground_truth)  # same anatomy and lesions
    np.testing.assert_array_equal(standard.labelmap, low_dose.labelmap)
    background = standard.labelmap == 0
    assert (low_dose.image - standard.image)[background].std() > 15.0  # 40 HU SD against 6-18 HU, then smoothed


def test_an_enhanced_protocol_brightens_the_organs_and_keeps_lesions_relative_to_them():
    seed = 11
    plain = make_phantom(seed, shape=SMALL, n_lesions=3, kinds=["cyst", "hyperdense lesion"])
    enhanced = make_phantom(
        seed, shape=SMALL, n_lesions=3, kinds=["cyst", "hyperdense lesion"], organ_enhancement_hu=(70.0, 70.0)
    )
    np.testing.assert_array_equal(plain.labelmap, enhanced.labelmap)  # same anatomy and lesions
    before, after = plain.ground_truth["organ_attenuation_hu"], enhanced.ground_truth["organ_attenuation_hu"]
    assert {name: round(after[name] - before[name], 1) for name in before} == dict.fromkeys(before, 70.0)
    for old, new in zip(plain.ground_truth["lesions"], enhanced.ground_truth["lesions"], strict=True):
        if old["label"] == "cyst":  # water stays water
            assert new["attenuation_hu"] == old["attenuation_hu"]
        else:  # 20-35 HU above its host, whatever the host's enhancement
            assert round(new["attenuation_hu"] - old["attenuation_hu"], 1) == 70.0
    assert {lesion["label"] for lesion in plain.ground_truth["lesions"]} == {"cyst", "hyperdense lesion"}
    liver = (enhanced.organ_map == ORGANS.index("liver") + 1) & (enhanced.labelmap == 0)
    assert np.median(enhanced.image[liver]) > before["liver"] + 50.0  # the picture, not only the sidecar
    drawn = make_phantom(seed, shape=SMALL, organ_enhancement_hu=(40.0, 80.0)).ground_truth["organ_attenuation_hu"]
    assert (
        40.0 <= drawn["liver"] - make_phantom(seed, shape=SMALL).ground_truth["organ_attenuation_hu"]["liver"] <= 80.0
    )


def test_same_seed_same_phantom_other_seed_other_phantom():
    a, b = make_phantom(7, shape=SMALL), make_phantom(7, shape=SMALL)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labelmap, b.labelmap)
    assert json.dumps(a.ground_truth) == json.dumps(b.ground_truth)
    c = make_phantom(8, shape=SMALL)
    assert not np.array_equal(a.image, c.image)


def test_written_dataset_is_byte_identical_for_a_seed(tmp_path):
    ids_a = write_sample_dataset(tmp_path / "a", n=2, seed=5, shape=(32, 32, 12))
    ids_b = write_sample_dataset(tmp_path / "b", n=2, seed=5, shape=(32, 32, 12))
    assert ids_a == ids_b == ["phantom_s5_000", "phantom_s5_001"]
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 8  # image, label map, sidecar, VQA set per study
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    truth = read_ground_truth(tmp_path / "a", ids_a[1])
    assert truth["study_id"] == ids_a[1] and truth["generator"]["seed"] == [5, 1]
    assert [read_ground_truth(tmp_path / "a", i)["orientation"] for i in ids_a] == list(ORIENTATIONS[:2])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    kinds=st.lists(st.sampled_from(LESION_KINDS), min_size=1, max_size=2, unique=True),
    organs=st.lists(st.sampled_from(ORGANS), min_size=1, max_size=2, unique=True),
)
def test_kinds_and_organs_restrict_the_lesions(seed, kinds, organs):
    phantom = make_phantom(seed, shape=(40, 40, 16), kinds=kinds, organs=organs, n_lesions=2)
    truth = phantom.ground_truth
    assert {lesion["label"] for lesion in truth["lesions"]} <= set(kinds)
    assert {lesion["organ"] for lesion in truth["lesions"]} <= set(organs)
    assert set(np.unique(phantom.labelmap)) == {0, *(lesion["id"] for lesion in truth["lesions"])}
    assert truth["diagnosis"] == (sorted({lesion["label"] for lesion in truth["lesions"]}) or [NORMAL_LABEL])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": ["tumour"]}, "kinds"),
        ({"kinds": "cyst"}, "not the string"),
        ({"organs": []}, "organs"),
        ({"shape": (4, 48, 20)}, "shape"),
        ({"shape": (48, 48)}, "shape"),
        ({"orientation": "sideways"}, "orientation"),
        ({"n_lesions": -1}, "n_lesions"),
        ({"noise_sd_hu": (30.0, 10.0)}, "noise_sd_hu"),
        ({"organ_enhancement_hu": (-10.0, 10.0)}, "organ_enhancement_hu"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_phantom(0, **{"shape": SMALL, **kwargs})


def test_save_needs_a_study_id(tmp_path):
    with pytest.raises(ValueError, match="study_id"):
        save_phantom(make_phantom(0, shape=SMALL, n_lesions=0), tmp_path)
