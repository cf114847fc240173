"""VQA from the ground truth: known answers on a hand-written sidecar, on phantoms, and as written by the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monailabel_evlf.cli import main
from monailabel_evlf.data.phantoms import LESION_KINDS, ORGANS, ORIENTATIONS, make_phantom
from monailabel_evlf.data.vqa import (
    QUESTION_TYPES,
    SIZE_BUCKETS,
    VQAItem,
    item_truth,
    lesions_on_slice,
    plane_of,
    read_vqa,
    size_answer,
    size_bucket,
    slice_questions,
    study_questions,
)


def _lesion(lesion_id, label, organ, side, boxes, voxels, diameter, offset):
    words = {
        "superior_inferior": "upper" if offset[2] > 0 else "lower",
        "anterior_posterior": "posterior" if offset[1] > 0 else "anterior",
        "medial_lateral": "medial" if offset[0] > 0 else "lateral",  # a right-sided organ
    }
    return {
        "id": lesion_id,
        "label": label,
        "organ": organ,
        "side": side,
        "position": {**words, "relative_offset_lps": offset},
        "diameter_mm": diameter,
        "voxel_count": voxels,
        "slice_boxes": [{"axis": 2, "index": k, "box": box} for k, box in boxes.items()],
    }


@pytest.fixture
def truth() -> dict:
    """Spacing 2 x 2 x 5 mm. Slice 5: a 5 x 4 voxel cyst (10 x 8 mm) and a 2 x 2 hyperdense lesion, both in the
    liver; slice 6: only the cyst; slice 9: two cysts. Slice 0 is lesion-free."""
    return {
        "modality": "CT",
        "shape": [32, 32, 12],
        "spacing": [2.0, 2.0, 5.0],
        "affine_lps": np.diag([2.0, 2.0, 5.0, 1.0]).tolist(),
        "lesions": [
            _lesion(1, "cyst", "liver", "right", {5: [4, 4, 9, 8], 6: [4, 4, 8, 7]}, 30, 12.0, [0.5, -0.6, 0.7]),
            _lesion(2, "hyperdense lesion", "liver", "right", {5: [20, 20, 22, 22]}, 4, 6.0, [0.1, 0.1, 0.1]),
            _lesion(3, "cyst", "right kidney", "right", {9: [2, 2, 4, 4]}, 6, 7.0, [-0.3, 0.3, -0.5]),
            _lesion(4, "cyst", "right kidney", "right", {9: [10, 10, 17, 17]}, 40, 31.0, [-0.5, 0.05, 0.5]),
        ],
    }


def _organ_named(question):
    return next((o for o in sorted(ORGANS, key=len, reverse=True) if o in question), None)


def _by_type(items, qtype, closed):
    return [i for i in items if i.question_type == qtype and (i.options is not None) == closed]


def test_lesions_on_a_slice_largest_first_with_in_plane_extent(truth):
    assert [(lesion["id"], extent) for lesion, extent in lesions_on_slice(truth, 2, 5)] == [(1, 10.0), (2, 4.0)]
    assert [lesion["id"] for lesion, _ in lesions_on_slice(truth, 2, 9)] == [4, 3]
    assert lesions_on_slice(truth, 2, 0) == [] and lesions_on_slice(truth, 0, 5) == []


def test_slice_with_two_lesions_known_answers(truth):
    items = slice_questions(truth, 2, 5, np.random.default_rng(0))
    answers = {(i.question_type, i.options is not None): i.answer for i in items if "lesion in the" not in i.question}
    assert answers[("count", True)] == answers[("count", False)] == "2"
    assert answers[("organ", True)] == answers[("organ", False)] == "liver"
    assert answers[("side", True)] == "right"
    assert answers[("kind", True)] == answers[("kind", False)] == "cyst"
    assert answers[("size", True)] == "10 to 20 mm" and answers[("size", False)] == "about 10 mm"
    assert answers[("modality", True)] == "CT" and answers[("plane", False)] == "axial"
    # the cyst is the largest and the only cyst: named by its kind, except where the kind is the question
    assert "the cyst" in _by_type(items, "organ", True)[0].question
    assert "the largest lesion" in _by_type(items, "kind", True)[0].question
    assert _by_type(items, "organ", True)[0].lesion_ids == (1,)
    assert _by_type(items, "count", True)[0].lesion_ids == (1, 2)
    # position on an axial slice: only the in-plane directions far enough from the organ centre (not upper)
    (closed,) = _by_type(items, "position", True)
    (opened,) = _by_type(items, "position", False)
    assert closed.answer in {"anterior", "medial"} and set(closed.options) in (
        {"anterior", "posterior"},
        {"medial", "lateral"},
    )
    assert opened.answer == "anterior medial"
    assert {i.question_type for i in items} == set(QUESTION_TYPES)


def test_two_lesions_of_one_kind_are_the_largest_lesion(truth):
    items = slice_questions(truth, 2, 9, np.random.default_rng(1))
    (organ,) = _by_type(items, "organ", False)
    assert "the largest lesion" in organ.question and organ.answer == "right kidney" and organ.lesion_ids == (4,)
    assert _by_type(items, "size", False)[0].answer == "about 15 mm"  # 7 voxels x 2 mm = 14 mm
    (opened,) = _by_type(items, "position", False)
    assert opened.answer == "lateral"  # anterior-posterior offset 0.05 is too close to call


def test_lesion_free_slice_asks_presence_count_modality_plane_only(truth):
    items = slice_questions(truth, 2, 0, np.random.default_rng(2))
    assert {i.question_type for i in items} == {"presence", "count", "modality", "plane"}
    assert {i.answer for i in items if i.question_type == "presence"} == {"no"}
    assert {i.answer for i in items if i.question_type == "count"} == {"0"}
    assert all(i.lesion_ids == () and i.scope == "slice" and (i.axis, i.index) == (2, 0) for i in items)


def test_organ_presence_is_answered_for_the_drawn_organ(truth):
    seen = {}
    for seed in range(12):
        for item in slice_questions(truth, 2, 6, np.random.default_rng(seed)):
            if item.question_type == "presence" and _organ_named(item.question):
                seen[_organ_named(item.question)] = item.answer
    assert seen == {"liver": "yes", "spleen": "no", "right kidney": "no", "left kidney": "no"}


def test_study_questions_known_answers(truth):
    items = study_questions(truth, np.random.default_rng(3))
    assert _by_type(items, "count", True)[0].answer == "4"
    largest = _by_type(items, "organ", False)[0]  # the most voxels: lesion 4, one of two cysts
    assert largest.lesion_ids == (4,) and largest.answer == "right kidney" and "the largest lesion" in largest.question
    assert _by_type(items, "size", False)[0].answer == "about 30 mm"  # its 31 mm diameter
    assert _by_type(items, "size", True)[0].answer == "over 30 mm"
    assert _by_type(items, "position", False)[0].answer == "upper lateral"  # study scope may say upper / lower
    assert all(i.scope == "study" and i.axis is None and i.index is None for i in items)
    assert _by_type(items, "presence", True)[0].answer == "yes"
    organ_counts = [i for i in items if i.question_type == "count" and _organ_named(i.question)]
    assert len(organ_counts) == 2
    organ = _organ_named(organ_counts[0].question)
    assert organ_counts[0].answer == str(sum(lesion["organ"] == organ for lesion in truth["lesions"]))


def test_closed_answers_are_options_phrasings_vary_and_rng_decides(truth):
    questions: dict[str, set[str]] = {}
    orders = set()
    for seed in range(20):
        for item in slice_questions(truth, 2, 5, np.random.default_rng(seed)):
            if item.options is not None:
                assert item.answer in item.options
                if item.question_type == "organ":
                    orders.add(item.options)
            questions.setdefault(item.question_type, set()).add(item.question)
    assert all(len(q) >= 3 for q in questions.values()), {k: len(v) for k, v in questions.items()}
    assert len(orders) > 3  # options shuffled
    a = slice_questions(truth, 2, 5, np.random.default_rng(7))
    assert a == slice_questions(truth, 2, 5, np.random.default_rng(7))


def test_sizes_buckets_and_plane():
    assert [size_bucket(mm) for mm in (6.0, 9.99, 10.0, 19.9, 20.0, 30.0, 45.0)] == [
        SIZE_BUCKETS[0],
        SIZE_BUCKETS[0],
        SIZE_BUCKETS[1],
        SIZE_BUCKETS[1],
        SIZE_BUCKETS[2],
        SIZE_BUCKETS[3],
        SIZE_BUCKETS[3],
    ]
    assert [size_answer(mm) for mm in (2.0, 7.4, 7.6, 21.0)] == [
        "about 5 mm",
        "about 5 mm",
        "about 10 mm",
        "about 20 mm",
    ]
    coronal = {"affine_lps": [[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]]}  # k runs along y
    assert plane_of(coronal, 2) == "coronal" and plane_of(coronal, 1) == "axial" and plane_of(coronal, 0) == "sagittal"


def test_item_truth_and_json_round_trip(truth):
    item = _by_type(slice_questions(truth, 2, 5, np.random.default_rng(0)), "kind", True)[0]
    assert VQAItem.from_json(json.loads(json.dumps(item.to_json()))) == item
    assert item_truth(truth, item) == {
        "question_type": "kind",
        "scope": "slice",
        "closed": True,
        "organ": "liver",
        "lesion_kind": "cyst",
        "size_bucket": "10 to 20 mm",
    }
    free = slice_questions(truth, 2, 0, np.random.default_rng(0))[0]
    assert item_truth(truth, free)["organ"] is None and item_truth(truth, free)["lesion_kind"] == "normal"
    # about the small hyperdense lesion beside the cyst: its organ, kind and size; about none: no organ, but the
    # slice still shows the cyst
    about_small = VQAItem("q", "yes", "presence", None, "slice", 2, 5, (2,))
    assert item_truth(truth, about_small) | {"question_type": "-"} == {
        "question_type": "-",
        "scope": "slice",
        "closed": False,
        "organ": "liver",
        "lesion_kind": "hyperdense lesion",
        "size_bucket": "under 10 mm",
    }
    about_none = VQAItem("Is there a lesion in the spleen?", "no", "presence", ("yes", "no"), "slice", 2, 5, ())
    assert item_truth(truth, about_none)["organ"] is None and item_truth(truth, about_none)["lesion_kind"] == "cyst"
    study = VQAItem("q", "4", "count", None, "study", None, None, (4, 3, 1, 2))
    assert (
        item_truth(truth, study)["organ"] == "right kidney" and item_truth(truth, study)["size_bucket"] == "over 30 mm"
    )
    with pytest.raises(ValueError, match="outside"):
        slice_questions(truth, 2, 12, np.random.default_rng(0))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_phantom_liver_lesions_are_answered_right_whatever_the_grid(orientation):
    phantom = make_phantom(5, shape=(48, 48, 20), orientation=orientation, n_lesions=4, organs=["liver", "spleen"])
    truth = phantom.ground_truth
    assert truth["lesions"]
    for lesion in truth["lesions"]:
        for entry in lesion["slice_boxes"]:
            items = slice_questions(truth, 2, entry["index"], np.random.default_rng(0))
            for item in items:
                if item.question_type == "side":
                    subject = next(x for x in truth["lesions"] if x["id"] == item.lesion_ids[0])
                    assert item.answer == {"liver": "right", "spleen": "left"}[subject["organ"]]
                if item.question_type == "plane":
                    assert item.answer == "axial"
                if item.question_type == "kind" and item.options:
                    assert set(item.options) == set(LESION_KINDS)


def test_cli_writes_the_vqa_set_for_lesion_and_normal_slices(tmp_path):
    assert main(["make-sample-data", str(tmp_path), "--n", "2", "--seed", "4", "--shape", "40", "40", "16"]) == 0
    for study_id in ("phantom_s4_000", "phantom_s4_001"):
        sidecar = json.loads((tmp_path / "ground_truth" / f"{study_id}.json").read_text())
        items = read_vqa(tmp_path, study_id)
        lines = (tmp_path / sidecar["files"]["vqa"]).read_text().splitlines()
        assert len(lines) == len(items) and set(json.loads(lines[0])) == set(VQAItem.__dataclass_fields__)
        crossed = {e["index"] for lesion in sidecar["lesions"] for e in lesion["slice_boxes"]}
        asked = {i.index for i in items if i.scope == "slice"}
        assert crossed <= asked and len(asked - crossed) == 3  # plus three lesion-free slices
        for item in items:
            if item.scope == "slice" and item.question_type == "count":
                assert item.answer == str(len(lesions_on_slice(sidecar, 2, item.index)))
        assert any(i.scope == "study" for i in items)
