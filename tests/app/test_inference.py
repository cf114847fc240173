"""The volume pipeline on phantoms with the ground-truth oracle backend: exact boxes back, batching as asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monailabel_evlf.data.phantoms import make_phantom, save_phantom
from monailabel_evlf.imaging.geometry import box_iou_3d
from monailabel_evlf.imaging.volume import Volume, load_volume
from monailabel_evlf.inference import PipelineConfig, VolumePipeline, thin
from tests.app.gt_backend import GroundTruthBackend

SHAPE = (64, 64, 32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    for seed, orientation in ((11, "oblique"), (12, "flipped")):
        phantom = make_phantom(seed, shape=SHAPE, n_lesions=2, orientation=orientation, study_id=f"p{seed}")
        save_phantom(phantom, root)
    return root


@pytest.fixture(scope="module")
def backend(dataset) -> GroundTruthBackend:
    return GroundTruthBackend.from_pretrained(str(dataset))


def studies(dataset: Path) -> list[str]:
    return sorted(p.name.removesuffix(".nii.gz") for p in dataset.glob("*.nii.gz"))


def test_grounding_returns_the_true_voxel_and_world_boxes(dataset, backend):
    pipeline = VolumePipeline(backend, PipelineConfig(image_size=80, batch_size=5))
    for study in studies(dataset):
        truth = json.loads((dataset / "ground_truth" / f"{study}.json").read_text())
        result = pipeline.ground(load_volume(dataset / f"{study}.nii.gz"))
        lesions = truth["lesions"]
        expected = {(tuple(les["voxel_box"]["lo"]), tuple(les["voxel_box"]["hi"]), les["label"]) for les in lesions}
        got = {(tuple(b.lo.astype(int)), tuple(b.hi.astype(int)), b.label) for b in result.voxel_boxes}
        assert got == expected, study
        for box, world in zip(result.voxel_boxes, result.world_boxes, strict=True):
            lesion = next(les for les in truth["lesions"] if tuple(les["voxel_box"]["lo"]) == tuple(box.lo.astype(int)))
            np.testing.assert_allclose(world.center, lesion["world_box"]["center"], atol=1e-3)
            np.testing.assert_allclose(world.size, lesion["world_box"]["size"], atol=1e-3)
            assert box.score == 1.0  # seen on every examined slice of its span
        body = result.to_json()
        assert body["slices"]["axis"] == 2 and len(body["boxes"]) == len(expected)
        assert set(body["latency_s"]) >= {"render", "model", "total"}


def test_slices_go_through_the_backend_in_batches(dataset, backend):
    volume = load_volume(dataset / f"{studies(dataset)[0]}.nii.gz")
    pipeline = VolumePipeline(backend, PipelineConfig(batch_size=7, skip_outside_body=False))
    backend.calls.clear()
    result = pipeline.ground(volume)
    assert backend.calls == [7, 7, 7, 7, 4]  # 32 slices
    assert result.slice_indices == list(range(SHAPE[2]))


def test_missed_slices_lower_the_score_unexamined_ones_do_not(dataset, backend):
    lesions = [
        (study, lesion)
        for study in studies(dataset)
        for lesion in json.loads((dataset / "ground_truth" / f"{study}.json").read_text())["lesions"]
    ]
    study, lesion = max(lesions, key=lambda item: item[1]["voxel_box"]["hi"][2] - item[1]["voxel_box"]["lo"][2])
    lo, hi = lesion["voxel_box"]["lo"][2], lesion["voxel_box"]["hi"][2]
    assert hi - lo >= 3, "the fixture needs a lesion on at least three slices"
    volume = load_volume(dataset / f"{study}.nii.gz")
    pipeline = VolumePipeline(backend, PipelineConfig())

    def box_on(result):
        return next(
            (b, s)
            for b, s in zip(result.voxel_boxes, result.box_slices, strict=True)
            if b.lo[2] == lo and b.hi[2] == hi
        )

    examined = [k for k in range(SHAPE[2]) if k != lo + 1]
    box, support = box_on(pipeline.ground(volume, indices=examined))
    assert box.score == 1.0 and lo + 1 not in support

    _, (hidden,) = pipeline.render(volume, [lo + 1])
    answer = backend.answer

    def blind_on_one_slice(image, prompt):
        if np.array_equal(image, hidden.image):
            return "<think>nothing here</think><answer>[]</answer>"
        return answer(image, prompt)

    backend.answer = blind_on_one_slice
    try:
        box, support = box_on(pipeline.ground(volume))
    finally:
        backend.answer = answer
    assert box.score == pytest.approx((hi - lo - 1) / (hi - lo), abs=1e-4)
    assert support == [k for k in range(lo, hi) if k != lo + 1]


def test_diagnosis_and_vqa_vote_over_slices(dataset, backend):
    study = studies(dataset)[0]
    truth = json.loads((dataset / "ground_truth" / f"{study}.json").read_text())
    pipeline = VolumePipeline(backend, PipelineConfig(min_slices=1))
    volume = load_volume(dataset / f"{study}.nii.gz")
    diagnosis = pipeline.diagnose(volume)
    assert set(diagnosis.labels) <= {les["label"] for les in truth["lesions"]} and diagnosis.labels
    assert diagnosis.reasoning.startswith("Ground truth label")
    n = len(diagnosis.slice_indices)
    assert sum(diagnosis.scores.values()) == pytest.approx(1.0) and all(
        v * n == round(v * n) for v in diagnosis.scores.values()
    )
    answer = pipeline.answer(volume, "Is there a lesion?", ["yes", "no"])
    assert answer.answer == "no"  # most slices show none
    assert answer.scores["no"] > answer.scores.get("yes", 0)
    with pytest.raises(ValueError, match="question"):
        pipeline.answer(volume, "  ")


def test_disagreement_is_zero_for_a_deterministic_model(dataset, backend):
    volume = load_volume(dataset / f"{studies(dataset)[0]}.nii.gz")
    pipeline = VolumePipeline(backend, PipelineConfig())
    assert pipeline.disagreement(volume, 3) == {"score": 0.0, "label_entropy": 0.0, "box_spread": 0.0}
    with pytest.raises(ValueError, match="2 samples"):
        pipeline.disagreement(volume, 1)


def test_bad_slices_and_config_are_refused(dataset, backend):
    volume = load_volume(dataset / f"{studies(dataset)[0]}.nii.gz")
    with pytest.raises(ValueError, match="outside"):
        VolumePipeline(backend).ground(volume, indices=[0, 99])
    with pytest.raises(ValueError, match="batch_size"):
        PipelineConfig(batch_size=0)
    with pytest.raises(ValueError, match="min_box_score"):
        PipelineConfig(min_box_score=1.5)
    with pytest.raises(ValueError, match="max_extend"):
        PipelineConfig(max_extend=-1)
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((4, 4, 4, 2)), np.eye(4))


@pytest.mark.parametrize(("n", "cap", "expected"), [(5, 10, [0, 1, 2, 3, 4]), (10, 4, [0, 3, 6, 9]), (3, 1, [0])])
def test_thin_spreads_evenly(n, cap, expected):
    assert thin(range(n), cap) == expected


def test_world_boxes_overlap_truth_in_3d(dataset, backend):
    # one more check independent of the voxel comparison: IoU in voxel space through box_iou_3d
    study = studies(dataset)[1]
    truth = json.loads((dataset / "ground_truth" / f"{study}.json").read_text())
    result = VolumePipeline(backend).ground(load_volume(dataset / f"{study}.nii.gz"))
    got = np.stack([b.as_array() for b in result.voxel_boxes])
    want = np.array([les["voxel_box"]["lo"] + les["voxel_box"]["hi"] for les in truth["lesions"]], dtype=float)
    assert np.allclose(np.sort(np.asarray(box_iou_3d(got, want)).max(axis=1)), 1.0)


def test_answers_carry_the_models_own_confidence(dataset, backend):
    from monailabel_evlf.model import load_backend
    from monailabel_evlf.tasks.prompts import diagnosis_prompt

    volume = load_volume(dataset / f"{studies(dataset)[0]}.nii.gz")
    config = PipelineConfig(image_size=64, batch_size=4, max_slices=4, max_new_tokens=12, min_slices=1)
    tiny = VolumePipeline(load_backend("evlf", "tiny"), config)
    result = tiny.diagnose(volume)
    confidences = [a.confidence for a in result.answers]
    assert all(0.0 < c <= 1.0 for c in confidences)
    # the same number the backend gives for the answer's tokens, recomputed one slice at a time
    _, slices = tiny.render(volume, result.slice_indices)
    prompt = diagnosis_prompt(config.modality, list(config.labels))
    one = tiny.confidences(slices[:1], [prompt], [result.answers[0].text])
    assert one[0] == pytest.approx(confidences[0], abs=1e-3)

    oracle = VolumePipeline(backend, config).ground(volume)  # cannot score its answers: no confidence, no crash
    assert {a.confidence for a in oracle.answers} == {None}


def test_a_size_question_is_answered_by_measuring_the_largest_3d_box(dataset, backend):
    """A study's size answer is the longest edge in mm of its largest 3D box (voxel edges times their spacing): on
    the oracle's boxes, which equal the true ones, the answer is the sidecar's, on the oblique grid too."""
    from monailabel_evlf.data.vqa import SIZE_BUCKETS, size_answer, size_bucket

    pipeline = VolumePipeline(backend, PipelineConfig(image_size=80, batch_size=5))
    for study in studies(dataset):
        truth = json.loads((dataset / "ground_truth" / f"{study}.json").read_text())
        boxes = [(np.array(les["voxel_box"]["lo"]), np.array(les["voxel_box"]["hi"])) for les in truth["lesions"]]
        lo, hi = max(boxes, key=lambda box: float(np.prod(box[1] - box[0])))
        expected_mm = float(np.max((hi - lo) * np.array(truth["spacing"])))
        volume = load_volume(dataset / f"{study}.nii.gz")
        grounded = pipeline.ground(volume)
        closed = pipeline.answer_study(volume, "How large is the lesion?", SIZE_BUCKETS, grounded=grounded)
        assert closed.answer == size_bucket(expected_mm), (study, expected_mm)
        assert f"{expected_mm:.1f} mm" in closed.reasoning and len(closed.voxel_boxes) == 1
        opened = pipeline.answer_study(volume, "What is the diameter of the lesion?", grounded=grounded)
        assert opened.answer == size_answer(expected_mm)
