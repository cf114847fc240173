"""``evaluate`` with a scripted backend: n and intervals per task and group, the plain keys the gate reads, and
the reasoning rates on hand-written answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.tasks import metrics
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention
from monailabel_evlf.tasks.parsing import parse_answer
from monailabel_evlf.training.evaluate import Prediction, evaluate, group_key, reasoning_rates
from monailabel_evlf.training.samples import TrainingSample

SIZE = 16


def _image(number: int) -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    image[0, 0, 0] = number  # the scripted backend reads which sample it is
    return image


class ScriptedBackend:
    """Answers each image with its scripted text, whatever the prompt (so every prompt variant agrees)."""

    box_codec = BoxCodec(BoxConvention.ABSOLUTE_MODEL_INPUT, lambda size: size)

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers

    def eval(self) -> None:
        pass

    def generate(self, images, prompts, n=1, sampling=None):
        return [[self.answers[int(image[0, 0, 0])]] * n for image in images]


def _answer(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


def _box(label: str) -> str:
    return json.dumps({"label": label, "bbox_2d": [2, 2, 8, 8]})


# (task, label, answer, options, source, reply); sample boxes: one 6 px box for lesion samples
CASES = [
    ("diagnosis", "cyst", None, ["cyst", "normal"], {"organ": "liver"}, _answer("Cyst in the liver.", "cyst")),
    ("diagnosis", "cyst", None, ["cyst", "normal"], {"organ": "left kidney"}, _answer("Cyst in the kidney.", "cyst")),
    (
        "diagnosis",
        "cyst",
        None,
        ["cyst", "normal"],
        {"organ": "right kidney"},
        _answer("Hyperdense lesion in the left kidney.", "cyst"),
    ),
    ("diagnosis", "cyst", None, ["cyst", "normal"], {"organ": "spleen"}, _answer("Cyst in the spleen.", "normal")),
    ("diagnosis", "normal", None, ["cyst", "normal"], {"organ": None}, _answer("No focal lesion is seen.", "normal")),
    ("diagnosis", "normal", None, ["cyst", "normal"], {}, _answer("Cyst in the liver.", "cyst")),
    ("grounding", "cyst", None, None, {"organ": "liver"}, _answer("Cyst in the liver.", _box("cyst"))),
    (
        "vqa",
        "cyst",
        "right kidney",
        None,
        {"organ": "right kidney", "question_type": "organ", "size_bucket": "10 to 20 mm"},
        _answer("Cyst in the left kidney.", "right kidney"),
    ),
    (
        "vqa",
        "cyst",
        "right kidney",
        ["liver", "right kidney"],
        {"organ": "right kidney", "question_type": "organ", "size_bucket": "10 to 20 mm"},
        _answer("Cyst in the kidney.", "right kidney"),
    ),
    (
        "vqa",
        "normal",
        "no",
        ["yes", "no"],
        {"organ": None, "question_type": "presence", "lesion_kind": "normal"},
        _answer("No focal lesion is seen.", "yes"),
    ),
    (  # about no lesion on a slice with a cyst: neither a lesion sample nor a lesion-free one
        "vqa",
        None,
        "no",
        ["yes", "no"],
        {"organ": None, "question_type": "presence", "lesion_kind": "cyst"},
        _answer("No focal lesion in the spleen.", "no"),
    ),
]


@pytest.fixture
def samples() -> list[TrainingSample]:
    out = []
    for number, (task, label, answer, options, source, _) in enumerate(CASES):
        boxes = [Box2D(2, 2, 8, 8, label=label)] if task != "vqa" and label != "normal" else []
        out.append(
            TrainingSample(
                image=_image(number),
                prompt="p",
                target="",
                task=task,
                label=label,
                boxes=boxes,
                answer=answer,
                options=options,
                source=dict(source),
            )
        )
    return out


def _predictions(samples) -> list[Prediction]:
    codec = ScriptedBackend.box_codec.for_image((SIZE, SIZE))
    return [Prediction(s, case[-1], parse_answer(case[-1], codec)) for s, case in zip(samples, CASES, strict=True)]


def test_reasoning_rates_hand_counted(samples):
    rates = reasoning_rates(_predictions(samples))
    # lesion samples 0, 1, 2, 3, 6, 7, 8: the true organ named in 0, 3, 6 ("kidney" alone is not "left kidney")
    assert rates["organ_named_rate"] == metrics.wilson(3, 7)
    # 2: hyperdense vs the cyst answer; 3: a cyst reasoned, "normal" answered; 7: left vs right kidney
    assert rates["contradiction_rate"] == metrics.wilson(3, 11)
    # lesion-free 4, 5, 9: only 5 names a finding
    assert rates["hallucination_rate"] == metrics.wilson(1, 3)


def test_reasoning_rates_need_the_truth_in_the_source(samples):
    for sample in samples:
        sample.source.pop("organ", None)
    unknown = [p for p in _predictions(samples) if p.sample.label not in ("normal", None)]
    assert reasoning_rates(unknown) == {}


def test_group_keys_from_source_else_from_the_boxes(samples):
    assert group_key(samples[7], "question_type") == "organ"
    assert group_key(samples[7], "size_bucket") == "10 to 20 mm"
    assert group_key(samples[0], "size_bucket") == "4 to 8 px"  # a 6 px box, no source bucket
    assert group_key(samples[4], "size_bucket") == "no lesion"
    assert group_key(samples[9], "lesion_kind") == "normal" and group_key(samples[0], "lesion_kind") == "cyst"
    assert group_key(samples[0], "question_type") is None


def test_evaluate_reports_n_and_intervals_per_group(samples, tmp_path):
    report = evaluate(ScriptedBackend([case[-1] for case in CASES]), samples, consistency_variants=2)
    flat = report.flat()
    assert set(flat) == {
        "accuracy",
        "macro_f1",
        "acc@0.1",
        "acc@0.3",
        "acc@0.5",
        "miou",
        "closed_accuracy",
        "open_recall",
        "all_variants_agree",
        "variant_accuracy_mean",
        "variant_accuracy_min",
        "variant_accuracy_max",
        "variant_accuracy_spread",
        "organ_named_rate",
        "contradiction_rate",
        "hallucination_rate",
    }
    details = report.table.details
    assert flat["accuracy"] == pytest.approx(4 / 6)  # 0, 1, 2, 4 right
    assert details["diagnosis"]["all"]["all"]["accuracy"] == metrics.wilson(4, 6)
    assert details["diagnosis"]["lesion_kind"]["cyst"]["accuracy"] == metrics.wilson(3, 4)
    assert details["diagnosis"]["lesion_kind"]["normal"]["accuracy"] == metrics.wilson(1, 2)
    assert set(details["diagnosis"]["lesion_kind"]["cyst"]) == {"accuracy"}
    assert details["grounding"]["all"]["all"]["acc@0.5"] == metrics.wilson(1, 1)
    assert details["vqa"]["question_type"]["organ"]["closed_accuracy"] == metrics.wilson(1, 1)
    assert details["vqa"]["question_type"]["organ"]["open_recall"].value == 1.0
    assert details["vqa"]["question_type"]["presence"]["closed_accuracy"] == metrics.wilson(1, 2)
    assert details["vqa"]["lesion_kind"]["cyst"]["closed_accuracy"] == metrics.wilson(2, 2)
    assert details["vqa"]["size_bucket"]["10 to 20 mm"]["closed_accuracy"].n == 1
    assert flat["closed_accuracy"] == pytest.approx(2 / 3) and flat["all_variants_agree"] == 1.0
    assert set(details["consistency"]["variant"]) == {"0", "1", "2"}
    assert details["reasoning"]["task"]["vqa"]["contradiction_rate"] == metrics.wilson(1, 4)
    paths = report.save(tmp_path / "eval")
    saved = json.loads(paths["json"].read_text())
    assert saved["diagnosis"]["accuracy"] == flat["accuracy"]
    assert saved["details"]["vqa"]["question_type"]["presence"]["closed_accuracy"]["n"] == 2
    text = paths["text"].read_text()
    assert "by question_type" in text and "n=6" in text and "wilson" in text and "bootstrap" in text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
