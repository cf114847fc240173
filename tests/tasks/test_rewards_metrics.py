"""Rewards and metrics on hand-computed cases."""

from __future__ import annotations

import functools
import json

import pytest

from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.tasks import metrics, rewards
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention


def answer(body, think="r"):
    return f"<think>{think}</think><answer>{body}</answer>"


def box_answer(coords, label="cyst"):
    return answer(json.dumps({"label": label, "bbox_2d": coords}))


def test_diagnosis_reward_is_strict_about_format_and_label():
    completions = [answer("Cyst."), answer("hepatic cyst"), "cyst", answer("normal"), answer("cyst")]
    got = rewards.diagnosis_reward([""] * 5, completions, task=["diagnosis"] * 4 + ["grounding"], label=["cyst"] * 5)
    assert got == [1.0, 0.0, 0.0, 0.0, None]


def test_grounding_reward_is_iou_with_a_floor():
    truth = [[Box2D(0, 0, 50, 50)]] * 3
    # image 100 x 100, NORMALIZED_100 -> answer units are pixels
    completions = [box_answer([0, 0, 50, 50]), box_answer([0, 0, 50, 100]), box_answer([45, 45, 95, 95])]
    got = rewards.grounding_reward([""] * 3, completions, gt_boxes=truth, image_size=[(100, 100)] * 3)
    # IoU 1; 2500/5000 = 0.5; 25/(2500+2500-25) = 0.005 < floor 0.1 -> 0
    assert got == pytest.approx([1.0, 0.5, 0.0])
    # the best of several predicted boxes counts; TRL conversational completions are accepted
    conversational = [
        [
            {
                "role": "assistant",
                "content": answer(
                    json.dumps(
                        [{"label": "cyst", "bbox_2d": [60, 60, 90, 90]}, {"label": "cyst", "bbox_2d": [0, 0, 50, 50]}]
                    )
                ),
            }
        ]
    ]
    assert rewards.grounding_reward([""], conversational, gt_boxes=truth[:1], image_size=[(100, 100)]) == [1.0]


def test_grounding_reward_columns_from_a_dataset():
    # gt_boxes as datasets store them (dicts / lists), a 0-1000 backend's codec, a normal slice, another task's sample
    completions = [box_answer([0, 0, 500, 500]), answer("no lesion"), box_answer([0, 0, 10, 10]), answer("cyst")]
    got = rewards.grounding_reward(
        [""] * 4,
        completions,
        task=["grounding", "grounding", "grounding", "diagnosis"],
        gt_boxes=[[{"bbox_2d": [0, 0, 100, 100], "label": "cyst"}], [], [], [[0, 0, 1, 1]]],
        image_size=[(200, 200)] * 4,
        box_codec=BoxCodec(BoxConvention.NORMALIZED_1000),
    )
    assert got == [1.0, 1.0, 0.0, None]  # a box on a normal slice earns nothing
    with pytest.raises(ValueError, match="image_size"):
        rewards.grounding_reward([""], completions[:1], gt_boxes=[[[0, 0, 1, 1]]])


def test_grounding_reward_reads_each_image_through_the_backends_resize():
    # a processor that squeezes every image to 200 x 100: the same answer is another box on a transposed image
    codec = BoxCodec(BoxConvention.ABSOLUTE_MODEL_INPUT, lambda size: (200, 100))
    got = rewards.grounding_reward(
        [""] * 2,
        [box_answer([0, 0, 100, 50])] * 2,
        gt_boxes=[[[0, 0, 50, 25]]] * 2,
        image_size=[(100, 50), (50, 100)],
        box_codec=codec,
    )
    # (100, 50): x / 2, y / 2 -> the truth; (50, 100): x / 4, y / 1 -> (0, 0, 25, 50), IoU 625 / 1875
    assert got == pytest.approx([1.0, 1 / 3])


def test_diagnosis_reward_synonyms_and_normal():
    reward = functools.partial(rewards.diagnosis_reward, synonyms={"hyperdense lesion": ["hemorrhage"]})
    completions = [answer("Hemorrhage"), answer("No finding."), answer("normal-ish")]
    assert reward([""] * 3, completions, label=["hyperdense lesion", "normal", "normal"]) == [1.0, 1.0, 0.0]


def test_combined_reward_weights_and_skips():
    both = rewards.combined({rewards.diagnosis_reward: 2.0, rewards.format_reward: 0.5})
    got = both(
        [""] * 3, [answer("cyst"), "cyst", answer("normal")], task=["diagnosis", "diagnosis", "vqa"], label=["cyst"] * 3
    )
    assert got == [2.5, 0.0, 0.5]  # the vqa sample gets only the format term
    assert both.__name__ == "2*diagnosis_reward+0.5*format_reward"
    only_vqa = rewards.combined([(rewards.vqa_f1_reward, 1.0)])
    assert only_vqa([""], [answer("x")], task=["diagnosis"]) == [None]
    with pytest.raises(ValueError):
        rewards.combined({})


def test_vqa_f1_and_format_rewards():
    assert rewards.token_f1("a hepatic cyst", "cyst") == pytest.approx(0.5)  # P = 1/3, R = 1 -> F1 = 0.5
    assert rewards.vqa_f1_reward([""], [answer("hepatic cyst")], answer=["a cyst"], task=["vqa"]) == [
        pytest.approx(0.5)
    ]
    assert rewards.format_reward([""] * 3, [answer("x"), answer(""), "x"]) == [1.0, 0.0, 0.0]


def test_default_reward_functions_are_named_for_logging():
    names = [fn.__name__ for fn in rewards.default_reward_functions()]
    assert names == ["diagnosis_reward", "grounding_reward", "vqa_f1_reward", "format_reward"]


def test_column_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="column 'label'"):
        rewards.diagnosis_reward([""] * 2, [answer("a"), answer("b")], label=["a"])


def test_classification_metrics_hand_computed():
    truth = ["cyst", "cyst", "normal", "normal"]
    pred = ["cyst", "normal", "normal", None]
    got = metrics.classification_metrics(truth, pred, ["cyst", "normal"])
    # cyst: tp1 fp0 fn1 -> 2/3; normal: tp1 fp1 fn1 -> 2/4
    assert got == pytest.approx({"accuracy": 0.5, "macro_f1": (2 / 3 + 0.5) / 2})


def test_grounding_metrics_hand_computed():
    truth = [[Box2D(0, 0, 10, 10)]] * 3
    pred = [[Box2D(0, 0, 10, 10)], [Box2D(0, 0, 10, 5)], [Box2D(0, 0, 10, 2)]]  # IoU 1, 0.5, 0.2
    got = metrics.grounding_metrics(truth, pred)
    assert got == pytest.approx({"acc@0.1": 1.0, "acc@0.3": 2 / 3, "acc@0.5": 2 / 3, "miou": (1 + 0.5 + 0.2) / 3})


def test_vqa_and_consistency_metrics():
    got = metrics.vqa_metrics(["yes", "left kidney cyst"], ["Yes.", "a cyst in the kidney"], [True, False])
    assert got == pytest.approx({"closed_accuracy": 1.0, "open_recall": 2 / 3})
    cons = metrics.consistency_metrics(["a", "b"], [["a", "b"], ["a", "a"], ["a", "b"]])
    assert cons["all_variants_agree"] == 0.5
    assert cons["variant_accuracy_min"] == 0.5 and cons["variant_accuracy_max"] == 1.0


def test_metrics_table_renders_text_and_json():
    table = metrics.MetricsTable()
    table.add("grounding", {"acc@0.5": 0.25, "miou": 0.4})
    table.add("diagnosis", {"accuracy": 0.75})
    assert dict(table.flat()) == {"acc@0.5": 0.25, "miou": 0.4, "accuracy": 0.75}
    assert json.loads(table.to_json())["grounding"]["miou"] == 0.4
    assert "acc@0.5    0.250" in table.to_text()
