"""Metrics with their n and 95% interval, and the organ / finding vocabulary the reasoning checks use."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.tasks import metrics
from monailabel_evlf.tasks.metrics import Estimate, MetricsTable


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (2, 4, 0.1500, 0.8500), (1, 1, 0.2065, 1.0)],
)
def test_wilson_interval_known_values(successes, n, low, high):
    got = metrics.wilson(successes, n)
    assert got.value == pytest.approx(successes / n) and got.n == n and got.method == "wilson"
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-4)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError):
        metrics.wilson(0, 0)
    with pytest.raises(ValueError):
        metrics.wilson(5, 4)


def test_bootstrap_mean_matches_the_normal_interval_and_is_seeded():
    values = np.random.default_rng(1).normal(0.5, 0.2, size=400)
    got = metrics.bootstrap_mean(values)
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(len(values))  # about 0.0196
    assert got.value == pytest.approx(values.mean()) and got.n == 400 and got.method == "bootstrap"
    assert (got.high - got.low) / 2 == pytest.approx(half_width, rel=0.15)
    assert got.low < got.value < got.high
    assert metrics.bootstrap_mean(values) == got  # fixed seed: the same interval every time
    constant = metrics.bootstrap_mean([0.7] * 20)
    assert (constant.low, constant.high) == pytest.approx((0.7, 0.7))
    single = metrics.bootstrap_mean([0.3])
    assert single.value == 0.3 and single.low is None and single.high is None


def test_bootstrap_interval_narrows_with_n():
    small = metrics.bootstrap_mean([0.0, 1.0] * 5)
    large = metrics.bootstrap_mean([0.0, 1.0] * 200)
    assert small.value == large.value == 0.5
    assert (large.high - large.low) < 0.35 * (small.high - small.low)


def test_classification_estimates_hand_computed():
    truth = ["cyst", "cyst", "normal", "normal"]
    pred = ["Cyst", "normal", "normal", None]
    got = metrics.classification_estimates(truth, pred, ["cyst", "normal"])
    assert got["accuracy"] == metrics.wilson(2, 4)
    # cyst: tp1 fp0 fn1 -> 2/3; normal: tp1 fp1 fn1 -> 2/4
    assert got["macro_f1"].value == pytest.approx((2 / 3 + 0.5) / 2) and got["macro_f1"].n == 4
    assert 0.0 <= got["macro_f1"].low <= got["macro_f1"].value <= got["macro_f1"].high <= 1.0
    # a label nobody has nor predicts is left out of the macro average
    assert metrics.classification_metrics(["a", "a"], ["a", "a"], ["a", "b"]) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_grounding_and_vqa_estimates():
    truth = [[Box2D(0, 0, 10, 10)]] * 3
    pred = [[Box2D(0, 0, 10, 10)], [Box2D(0, 0, 10, 5)], [Box2D(0, 0, 10, 2)]]  # IoU 1, 0.5, 0.2
    got = metrics.grounding_estimates(truth, pred)
    assert got["acc@0.5"] == metrics.wilson(2, 3) and got["acc@0.1"] == metrics.wilson(3, 3)
    assert got["miou"].value == pytest.approx(1.7 / 3) and got["miou"].n == 3
    assert got["miou"].low >= 0.2 - 1e-9 and got["miou"].high <= 1.0 + 1e-9
    vqa = metrics.vqa_estimates(["yes", "no", "left kidney cyst"], ["Yes.", "yes", "a cyst in the kidney"], [1, 1, 0])
    assert vqa["closed_accuracy"] == metrics.wilson(1, 2)
    assert vqa["open_recall"].value == pytest.approx(2 / 3) and vqa["open_recall"].low is None  # one open answer


def test_consistency_estimates():
    got = metrics.consistency_estimates(["a", "b"], [["a", "b"], ["a", "a"], ["a", "b"]])
    assert got["all_variants_agree"] == metrics.wilson(1, 2)
    assert got["variant_accuracy_min"].value == 0.5 and got["variant_accuracy_max"].value == 1.0
    assert got["variant_accuracy_spread"].value == 0.5
    assert got["variant_accuracy_mean"].value == pytest.approx(5 / 6)
    np.testing.assert_array_equal(
        metrics.variant_correct(["a", "b"], [["a", "b"], ["a", "a"]]), [[True, True], [True, False]]
    )


@pytest.mark.parametrize(
    ("text", "organs"),
    [
        ("Cyst in the right kidney.", {"right kidney"}),
        ("Hyperdense lesion in the left kidney, the liver is normal.", {"left kidney", "liver"}),
        ("A lesion in the kidney.", {"kidney"}),
        ("Renal cyst.", {"kidney"}),
        ("Hepatic and splenic lesions.", {"liver", "spleen"}),
        ("No focal lesion is seen in this slice.", set()),
    ],
)
def test_named_organs_tell_the_kidneys_apart(text, organs):
    assert metrics.named_organs(text) == organs


@pytest.mark.parametrize(
    ("text", "kinds", "finding"),
    [
        ("Ring-enhancing lesion in the liver.", {"ring-enhancing lesion"}, True),
        ("Two cysts in the spleen.", {"cyst"}, True),
        ("No focal lesion is seen in this slice.", set(), False),
        ("No cyst; a hyperdense lesion in the spleen.", {"hyperdense lesion"}, True),
        ("Not a cyst. Unremarkable liver.", set(), False),
        ("A mass in the liver.", set(), True),
    ],
)
def test_named_kinds_and_findings_respect_negation(text, kinds, finding):
    assert metrics.named_kinds(text) == kinds
    assert metrics.names_finding(text) is finding


def test_organs_agree_only_a_sideless_kidney_with_either():
    assert metrics.organs_agree("kidney", "right kidney") and metrics.organs_agree("left kidney", "kidney")
    assert not metrics.organs_agree("right kidney", "left kidney")
    assert not metrics.organs_agree("liver", "kidney") and metrics.organs_agree("liver", "liver")


def test_table_keeps_plain_numbers_and_adds_details():
    table = MetricsTable()
    table.add("grounding", {"acc@0.5": metrics.wilson(8, 10), "miou": 0.4})
    table.add("grounding", {"acc@0.5": metrics.wilson(1, 2)}, "lesion_kind", "cyst")
    assert dict(table.flat()) == {"acc@0.5": 0.8, "miou": 0.4}  # breakdowns never reach the plain keys
    data = json.loads(table.to_json())
    assert data["grounding"] == {"acc@0.5": 0.8, "miou": 0.4}
    assert data["details"]["grounding"]["all"]["all"]["acc@0.5"]["n"] == 10
    assert data["details"]["grounding"]["lesion_kind"]["cyst"]["acc@0.5"]["low"] == pytest.approx(0.0945, abs=1e-4)
    text = table.to_text()
    assert "acc@0.5   0.800  n=10    [0.490, 0.943] wilson" in text
    assert "by lesion_kind" in text and "cyst  acc@0.5   0.500  n=2" in text
    assert str(Estimate(0.5, 1, None, None, "bootstrap")) == " 0.500  n=1     [ n/a ] bootstrap"
