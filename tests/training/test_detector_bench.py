"""``evlf bench detector``: proposals scored against known boxes, and the command end to end on a tiny recipe."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from monailabel_evlf.cli import main
from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.training.detector_bench import score_proposals


class _Proposer:
    """Proposes a fixed list per image: the truth shifted by ``shift`` pixels, then a far-away box."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def propose(self, images):
        return [
            [Box2D(10 + self.shift, 10, 20 + self.shift, 20), Box2D(60, 60, 70, 70)] if image.any() else []
            for image in images
        ]


def _slice(boxes):
    return SimpleNamespace(image=np.ones((96, 96, 3), np.uint8), boxes=boxes)


def test_scores_are_the_known_ious_by_size():
    truth = [_slice([Box2D(10, 10, 20, 20)]), _slice([Box2D(60, 60, 70, 70)]), _slice([])]
    report = score_proposals(_Proposer(shift=0.0), truth)
    assert report["n"] == 2 and report["lesion_free_slices"] == 1  # the lesion-free slice has no box to find
    assert report["top1_acc@0.5"] == 0.5 and report["best_of_k_acc@0.5"] == 1.0
    assert report["top1_miou"] == pytest.approx(0.5)
    assert report["8-16px"] == {"n": 2, "top1_acc@0.5": 0.5}
    shifted = score_proposals(_Proposer(shift=5.0), truth[:1])  # IoU 50 / 150
    assert shifted["top1_miou"] == pytest.approx(1 / 3) and shifted["top1_acc@0.5"] == 0.0


class _ScoredProposer:
    """One box at (10, 10, 20, 20) per image, scored by the image's grey level / 100."""

    def propose(self, images):
        return [[Box2D(10, 10, 20, 20, score=float(image[0, 0, 0]) / 100)] for image in images]


def _filled(level: int, boxes):
    return SimpleNamespace(image=np.full((96, 96, 3), level, np.uint8), boxes=boxes)


def test_top1_score_auroc_separates_hits_from_lesion_free_slices():
    hit, missed = [Box2D(10, 10, 20, 20)], [Box2D(60, 60, 70, 70)]
    slices = [_filled(80, hit), _filled(60, hit), _filled(90, missed), _filled(70, []), _filled(50, [])]
    report = score_proposals(_ScoredProposer(), slices)
    # hits score 0.8 and 0.6, lesion-free slices 0.7 and 0.5; the miss (0.9) is in neither group: 3 of 4 pairs
    assert report["top1_score_auroc"] == pytest.approx(0.75) and report["lesion_free_slices"] == 2
    assert report["n"] == 3 and report["top1_acc@0.5"] == pytest.approx(2 / 3)


def test_command_trains_and_writes_the_report(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        """
model: {image_size: 32, hidden_size: 32, num_layers: 1, num_heads: 2, num_proposals: 2,
        dense_channels: [4, 8, 8], dense_hidden_size: 8}
data: {train_studies: 2, held_out_studies: 1, size: [48, 48]}
detector: {steps: 2, batch_size: 4}
"""
    )
    assert main(["bench", "detector", "--config", str(recipe), "--steps", "3", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "detector_bench.json").read_text())
    assert report["steps"] == 3 and report["train_studies"] == 2 and report["seconds_per_step"] > 0
    for split in ("held_out", "train"):
        assert report[split]["n"] > 0
        assert 0.0 <= report[split]["top1_acc@0.5"] <= report[split]["best_of_k_acc@0.5"] <= 1.0
    assert report["held_out"]["lesion_free_slices"] > 0  # the recipe's lesion-free slices are scored too
