"""Study questions sorted into what the pipeline answers them from, on every phrasing the VQA set uses."""

from __future__ import annotations

import pytest

from monailabel_evlf.data.phantoms import LESION_KINDS, make_phantom, vqa_items
from monailabel_evlf.tasks.questions import organ_matches, parse_study_question, size_option

EXPECTED_KIND = {
    "presence": "presence",
    "count": "count",
    "modality": "other",
    "organ": "finding",
    "side": "finding",
    "size": "size",
    "kind": "finding",
    "position": "finding",
}


@pytest.mark.parametrize("seed", [3, 11, 12, 20])
def test_every_study_question_of_the_vqa_set_is_sorted_by_its_type(seed):
    truth = make_phantom(seed, shape=(48, 48, 16)).ground_truth
    items = [item for item in vqa_items(truth) if item.scope == "study"]
    assert items
    for item in items:
        asked = parse_study_question(item.question, LESION_KINDS)
        assert asked.kind == EXPECTED_KIND[item.question_type], item.question


@pytest.mark.parametrize(
    ("question", "kind", "organ"),
    [
        ("Is there a lesion in the left kidney?", "presence", "left kidney"),
        ("Is the liver abnormal in this study?", "presence", "liver"),
        ("How many focal lesions does the spleen contain?", "count", "spleen"),
        ("What is the number of lesions in this scan?", "count", None),
        ("Is the cyst in the upper or lower part of the liver?", "finding", "liver"),
        ("In which organ is the cyst?", "finding", None),
        ("How big is the cyst in the spleen?", "size", "spleen"),
        ("Which organ holds the largest lesion?", "finding", None),
        ("What kind of scan is this?", "other", None),
    ],
)
def test_question_kind_and_organ(question, kind, organ):
    asked = parse_study_question(question, ["cyst"])
    assert (asked.kind, asked.organ) == (kind, organ)


def test_organ_answers_match_whole_organ_names():
    assert organ_matches("The lesion is in the left kidney.", "left kidney")
    assert organ_matches("left kidney", "kidney")
    assert not organ_matches("right kidney", "left kidney")
    assert not organ_matches("liver", "spleen")


@pytest.mark.parametrize(
    ("mm", "options", "chosen"),
    [
        (9.9, ["under 10 mm", "10 to 20 mm", "over 30 mm"], "under 10 mm"),
        (10.0, ["under 10 mm", "10 to 20 mm", "over 30 mm"], "10 to 20 mm"),
        (31.0, ["under 10 mm", "10 to 20 mm", "over 30 mm"], "over 30 mm"),
        (25.0, ["less than 2 cm", "2-3 cm", "more than 3 cm"], "2-3 cm"),
        (22.0, ["below 2.5 cm", "above 2.5 cm"], "below 2.5 cm"),
        (25.0, ["under 10 mm", "10 to 20 mm"], None),  # no option holds it
        (25.0, ["small", "large"], None),  # no ranges to read
        (25.0, None, None),
    ],
)
def test_size_option_reads_the_range_each_option_says(mm, options, chosen):
    assert size_option(mm, options) == chosen
