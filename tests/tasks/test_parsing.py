"""parse_answer on a corpus of realistic model outputs, plus properties that must hold for any text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monailabel_evlf.tasks.box_codec import BoxConvention, SliceCodec
from monailabel_evlf.tasks.parsing import parse_answer, split_answer

SIZE = (96, 96)
CORPUS = [json.loads(line) for line in (Path(__file__).parent / "corpus" / "outputs.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", CORPUS, ids=[c["source"] for c in CORPUS])
def test_corpus(case):
    parsed = parse_answer(case["text"], SliceCodec(BoxConvention(case["convention"]), SIZE, SIZE))

    assert parsed.format_ok is case["format_ok"]
    assert parsed.label == case["label"]
    got = [b.as_array() for b in parsed.boxes]
    assert len(got) == len(case["boxes"])
    for box, expected in zip(got, case["boxes"], strict=True):
        np.testing.assert_allclose(box, expected, atol=1e-6)


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 25


def test_absolute_boxes_are_mapped_from_the_model_input_size():
    # Qwen2.5-VL saw a 448 x 224 resize of a 96 x 48 slice: its pixel (224, 112) is our (48, 24).
    text = '<think>x</think><answer>{"label": "cyst", "bbox_2d": [224, 112, 448, 224]}</answer>'
    parsed = parse_answer(text, SliceCodec(BoxConvention.ABSOLUTE_MODEL_INPUT, (96, 48), (448, 224)))
    np.testing.assert_allclose(parsed.boxes[0].as_array(), [48, 24, 96, 48])


def test_repairs_are_reported():
    parsed = parse_answer(
        '<think>x</think><answer>{"label": "cyst", "bbox_2d": [90, 10, 10, 120]}</answer>',
        SliceCodec(BoxConvention.NORMALIZED_100, (100, 100)),
    )
    assert any("swapped" in issue for issue in parsed.issues)
    assert any("clipped" in issue for issue in parsed.issues)
    np.testing.assert_allclose(parsed.boxes[0].as_array(), [10, 10, 90, 100])


def test_model_text_never_raises():
    assert parse_answer(None, SliceCodec(BoxConvention.NORMALIZED_100, (96, 96))).boxes == []  # type: ignore[arg-type]


def test_fractions_are_reported():
    parsed = parse_answer("[0.1, 0.2, 0.3, 0.4]", SliceCodec(BoxConvention.NORMALIZED_1000, (200, 100)))
    np.testing.assert_allclose(parsed.boxes[0].as_array(), [20, 20, 60, 40])
    assert any("fractions" in issue for issue in parsed.issues)


def test_split_answer_strictness():
    assert split_answer("<think>a</think><answer>b</answer>") == ("a", "b", True)
    assert split_answer("<answer>b</answer>")[2] is False
    assert split_answer("<think>a</think>b")[1:] == ("b", False)
    assert split_answer("<think>a</think></think><answer>b</answer>")[2] is False
    assert split_answer("<think>a</think><answer>b</answer></s>") == ("a", "b", True)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from(list(BoxConvention)), st.integers(1, 2000), st.integers(1, 2000))
def test_never_raises_and_boxes_stay_inside(text, convention, width, height):
    parsed = parse_answer(text, SliceCodec(convention, (width, height), (width, height)))
    for box in parsed.boxes:
        assert 0 <= box.x1 < box.x2 <= width
        assert 0 <= box.y1 < box.y2 <= height


FRAGMENTS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<box>",
    "</box>",
    "<ref>",
    "</ref>",
    "<|box_start|>",
    "<|box_end|>",
    "[",
    "]",
    "[[",
    "]]",
    "(",
    ")",
    "{",
    "}",
    ",",
    ", ",
    '"bbox_2d": ',
    "'bbox': ",
    '"label": ',
    '"cyst"',
    "```json",
    "```",
    "\n",
    " ",
    "NaN",
    "Infinity",
    "-",
    ".",
]
model_like_text = st.lists(
    st.sampled_from(FRAGMENTS) | st.integers(-5000, 5000).map(str) | st.floats(-2, 2).map(lambda v: f"{v:.3f}"),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(model_like_text, st.sampled_from(list(BoxConvention)), st.integers(1, 600), st.integers(1, 600))
def test_model_like_fragments_never_raise_and_boxes_stay_inside(text, convention, width, height):
    parsed = parse_answer(text, SliceCodec(convention, (width, height), (448, 448)))
    for box in parsed.boxes:
        assert 0 <= box.x1 < box.x2 <= width
        assert 0 <= box.y1 < box.y2 <= height


numbers = st.integers(0, 100)


@settings(max_examples=200, deadline=None)
@given(numbers, numbers, numbers, numbers)
def test_swapping_corners_does_not_change_the_box(x1, y1, x2, y2):
    def boxes(coords):
        text = f'<think>t</think><answer>{{"label": "cyst", "bbox_2d": {list(coords)}}}</answer>'
        return [
            b.as_array().tolist()
            for b in parse_answer(text, SliceCodec(BoxConvention.NORMALIZED_100, (100, 100))).boxes
        ]

    assert boxes((x1, y1, x2, y2)) == boxes((x2, y2, x1, y1)) == boxes((x1, y2, x2, y1))


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_embedded_json_box_is_found_among_arbitrary_prose(prose):
    text = prose.replace("[", "(").replace("{", "(") + ' {"label": "cyst", "bbox_2d": [10, 20, 30, 40]}'
    parsed = parse_answer(text, SliceCodec(BoxConvention.NORMALIZED_100, (100, 100)))
    assert [10, 20, 30, 40] in [b.as_array().tolist() for b in parsed.boxes]
