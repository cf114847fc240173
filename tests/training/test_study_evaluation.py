"""Per-study 3D-box scoring: one-to-one matching, AUROC and reliability on known boxes; the pipeline on an oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monailabel_evlf.imaging.geometry import VoxelBox
from monailabel_evlf.training.study_evaluation import StudyReport, box_auroc, evaluate_studies, match_study


def _box(lo, hi, score=None):
    return VoxelBox(lo=np.array(lo, float), hi=np.array(hi, float), score=score)


def test_match_is_one_to_one_and_prefers_the_better_scored_box():
    truth = [_box([0, 0, 0], [10, 10, 10])]
    predicted = [_box([0, 0, 0], [10, 10, 9], score=0.4), _box([0, 0, 0], [10, 10, 10], score=0.9)]
    found, is_true = match_study(predicted, truth)
    assert found == 1 and is_true == [False, True]  # the duplicate is a false box
    assert match_study(predicted, [], 0.5) == (0, [False, False])
    far = [_box([20, 20, 20], [30, 30, 30], score=0.9)]
    assert match_study(far, truth) == (0, [False])


def test_auroc_known_values():
    assert box_auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert box_auroc([0.1, 0.9], [True, False]) == 0.0
    assert box_auroc([0.5, 0.5], [True, False]) == 0.5
    assert math.isnan(box_auroc([0.3], [True]))


def test_report_metrics_and_reliability():
    report = StudyReport(
        studies=[
            {"study_id": "a", "lesions": 2, "found": 1, "boxes": 2, "false_boxes": 1},
            {"study_id": "b", "lesions": 0, "found": 0, "boxes": 1, "false_boxes": 1},
            {"study_id": "c", "lesions": 0, "found": 0, "boxes": 0, "false_boxes": 0},
        ],
        box_scores=[0.95, 0.15, 0.05],
        box_true=[True, False, False],
    )
    metrics = report.metrics()
    assert metrics["lesion_recall@0.5"] == 0.5 and metrics["false_boxes_per_normal_study"] == 0.5
    assert metrics["box_score_auroc"] == 1.0
    rows = report.reliability(bins=10)
    assert [(r["bin"], r["n"], r["true_fraction"]) for r in rows] == [
        ("0.0-0.1", 1, 0.0),
        ("0.1-0.2", 1, 0.0),
        ("0.9-1.0", 1, 1.0),
    ]


def test_study_estimates_carry_n_and_an_interval_around_the_value():
    report = StudyReport(
        studies=[
            {"study_id": "a", "lesions": 3, "found": 2, "boxes": 3, "false_boxes": 1},
            {"study_id": "b", "lesions": 1, "found": 1, "boxes": 1, "false_boxes": 0},
            {"study_id": "c", "lesions": 0, "found": 0, "boxes": 2, "false_boxes": 2},
            {"study_id": "d", "lesions": 0, "found": 0, "boxes": 0, "false_boxes": 0},
        ],
        box_scores=[0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2, 0.75],
        box_true=[True, True, False, True, False, False, False, False],
    )
    estimates, metrics = report.estimates(), report.metrics()
    recall = estimates["lesion_recall@0.5"]
    assert (recall.value, recall.n, recall.method) == (0.75, 4, "wilson")
    assert estimates["false_boxes_per_normal_study"].n == 2
    assert estimates["false_boxes_per_normal_study"].value == metrics["false_boxes_per_normal_study"] == 1.0
    auroc = estimates["box_score_auroc"]
    assert auroc.value == pytest.approx(metrics["box_score_auroc"]) and auroc.n == 8
    assert auroc.low < auroc.value < auroc.high <= 1.0  # 8 boxes: a wide interval, as it should be
    text = report.to_text()
    assert "n=4" in text and "n=8" in text


@pytest.mark.parametrize("orientation", ["identity", "flipped", "oblique"])
def test_an_oracle_backend_finds_every_lesion_once(orientation, tmp_path):
    """Through the real volume pipeline: an oracle that answers each slice's true boxes scores recall 1 and no
    false boxes, whatever the grid's orientation (the geometry round trip is exact)."""
    from monailabel_evlf.data.phantoms import make_phantom, save_phantom
    from monailabel_evlf.inference import PipelineConfig
    from tests.app.gt_backend import GroundTruthBackend

    phantom = make_phantom([7, 3], shape=(48, 48, 20), n_lesions=2, orientation=orientation, study_id="p")
    save_phantom(phantom, tmp_path / "data")
    backend = GroundTruthBackend(tmp_path / "data")
    one_slice_ok = PipelineConfig(min_slices=1)  # a small lesion of a 20-slice phantom may cross one slice
    report = evaluate_studies(backend, [(phantom.image, phantom.affine, phantom.ground_truth)], one_slice_ok)
    lesions = len(phantom.ground_truth["lesions"])
    assert report.studies[0]["lesions"] == lesions and report.studies[0]["false_boxes"] == 0
    assert report.studies[0]["found"] == lesions
    # study questions: presence and counts over the whole study come from the 3D boxes, so the oracle's are right
    # (its organ answers are not: questions naming an organ are left out here)
    from monailabel_evlf.tasks.questions import parse_study_question

    whole_study = [
        r
        for r in report.vqa
        if r["question_type"] in ("presence", "count") and not parse_study_question(r["question"]).organ
    ]
    assert len(whole_study) == 4  # presence and count, each closed and open
    assert all(r["prediction"].lower() == r["reference"].lower() for r in whole_study), whole_study
    assert report.vqa_estimates()["presence"]["closed_accuracy"].n >= 1
    (tmp_path / "out").mkdir()
    paths = report.save(tmp_path / "out")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
