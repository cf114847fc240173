"""Prompts follow the paper's wording; targets parse back to their ground truth; labels match leniently/strictly."""

from __future__ import annotations

import numpy as np
import pytest

from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.tasks import prompts
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention, SliceCodec
from monailabel_evlf.tasks.labels import LabelMatcher, is_correct_diagnosis, normalize
from monailabel_evlf.tasks.parsing import parse_answer

LABELS = ["cyst", "hyperdense lesion", "ring-enhancing lesion", "normal"]
NATIVE = BoxCodec(BoxConvention.NORMALIZED_100)


def test_base_prompt_and_ten_variants_are_the_papers():
    assert prompts.NUM_PROMPT_VARIANTS == 10
    assert prompts.diagnosis_prompt("CT", []) == "Analyze the given CT image for diagnosis."
    assert prompts.diagnosis_prompt("MR", [], variant=9) == "Diagnose the given MRI image."
    assert len({prompts.diagnosis_prompt("CT", LABELS, variant=v) for v in range(11)}) == 11
    assert prompts.diagnosis_prompt("CT", LABELS).endswith(
        "Choose one of: cyst, hyperdense lesion, ring-enhancing lesion, normal."
    )
    with pytest.raises(ValueError, match="variant"):
        prompts.diagnosis_prompt("CT", LABELS, variant=11)


def test_grounding_and_vqa_prompts_mention_what_they_ask():
    assert "Locate the cyst in this CT image" in prompts.grounding_prompt("CT", "cyst", NATIVE)
    assert prompts.grounding_prompt("CT", None, BoxCodec(BoxConvention.NORMALIZED_1000)) == (
        'Locate every abnormality in this CT image. Answer with JSON {"label": ..., "bbox_2d": [x1, y1, x2, y2]} '
        "for each finding, scaled to 0-1000 of the image width and height."
    )
    assert prompts.vqa_prompt("US", "Is there a lesion?", ["yes", "no"]).endswith(
        "Is there a lesion? Options: yes, no."
    )
    with pytest.raises(ValueError):
        prompts.vqa_prompt("CT", "  ")


@pytest.mark.parametrize("convention", list(BoxConvention))
def test_grounding_target_parses_back_to_its_boxes(convention):
    codec = SliceCodec(convention, (96, 64), (448, 308))
    truth = [Box2D(12, 8, 36, 40, label="cyst"), Box2D(48, 16, 90, 60, label="cyst")]
    target = prompts.grounding_target("Two cysts.", truth, codec)
    parsed = parse_answer(target, codec)
    assert parsed.format_ok and parsed.reasoning == "Two cysts." and parsed.label == "cyst"
    # integer answer coordinates: within one answer unit of the truth
    unit = {BoxConvention.NORMALIZED_100: 0.96, BoxConvention.NORMALIZED_1000: 0.096}.get(convention, 96 / 448)
    for got, want in zip(parsed.boxes, truth, strict=True):
        np.testing.assert_allclose(got.as_array(), want.as_array(), atol=unit * 0.5 + 1e-9)


def test_grounding_target_needs_a_box():
    with pytest.raises(ValueError, match="at least one box"):
        prompts.grounding_target("r", [], NATIVE.for_image((96, 64)))


def test_label_matching_lenient_and_strict():
    matcher = LabelMatcher(LABELS, synonyms={"hyperdense lesion": ["hemorrhage"]})
    assert normalize("  Ring_Enhancing-Lesion. ") == "ring enhancing lesion"
    assert matcher.match("Hepatic cyst in the right lobe.") == "cyst"
    assert matcher.match("a ring enhancing lesion") == "ring-enhancing lesion"
    assert matcher.match("Hemorrhage") == "hyperdense lesion"
    assert matcher.match("hyperdense lesoin") == "hyperdense lesion"  # near miss
    assert matcher.match("No focal lesion") == "normal"
    assert matcher.match("pneumothorax") is None
    assert matcher.match("No cyst is seen.") is None  # negated mentions do not count
    assert matcher.match("Not a cyst: a ring enhancing lesion") == "ring-enhancing lesion"
    assert matcher.strict("CYST.") == "cyst"
    assert matcher.strict("Hepatic cyst") is None  # strict: the answer must *be* the label
    with pytest.raises(ValueError, match="not in the label set"):
        LabelMatcher(LABELS, synonyms={"tumour": ["mass"]})


def test_strict_diagnosis_rule():
    assert is_correct_diagnosis("Cyst.", True, "cyst")
    assert not is_correct_diagnosis("cyst", False, "cyst")  # right label, wrong format
    assert not is_correct_diagnosis("hepatic cyst", True, "cyst")  # contains the label: not the label
    assert not is_correct_diagnosis("cyts", True, "cyst")  # near misses earn nothing
    assert is_correct_diagnosis("hemorrhage", True, "hyperdense lesion", synonyms=["hemorrhage"])
    assert is_correct_diagnosis("No finding", True, "normal")
    assert not is_correct_diagnosis(None, True, "cyst")
