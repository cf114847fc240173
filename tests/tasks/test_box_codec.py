"""The box codec: answer numbers <-> image pixels for every convention, with hand-computed numbers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import monailabel_evlf
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention, SliceCodec

ABSOLUTE, N1000, N100 = BoxConvention.ABSOLUTE_MODEL_INPUT, BoxConvention.NORMALIZED_1000, BoxConvention.NORMALIZED_100


def test_normalized_100_on_a_non_square_image_and_its_transpose():
    # 200 px wide, 50 px high: x scales by 2, y by 0.5; the transposed image swaps the scales, not the numbers
    assert SliceCodec(N100, (200, 50)).to_pixels([10, 20, 60, 100]) == (20.0, 10.0, 120.0, 50.0)
    assert SliceCodec(N100, (50, 200)).to_pixels([10, 20, 60, 100]) == (5.0, 40.0, 30.0, 200.0)


def test_normalized_1000():
    assert SliceCodec(N1000, (64, 32)).to_pixels([250, 500, 750, 1000]) == (16.0, 16.0, 48.0, 32.0)
    assert SliceCodec(N1000, (32, 64)).from_pixels((8, 16, 32, 64)) == (250.0, 250.0, 1000.0, 1000.0)


def test_absolute_model_input_rescales_from_the_resized_image():
    # a 90 x 40 slice seen as 84 x 28 (Qwen2.5-VL smart_resize): x * 90/84, y * 40/28
    box = SliceCodec(ABSOLUTE, (90, 40), (84, 28)).to_pixels([42, 14, 84, 28])
    assert box == pytest.approx((45.0, 20.0, 90.0, 40.0))


def test_swapped_corners_are_reordered():
    assert SliceCodec(N100, (100, 100)).to_pixels([60, 100, 10, 20]) == (10.0, 20.0, 60.0, 100.0)


def test_backend_codec_binds_the_image_and_its_resize():
    seen = []

    def resize(size):
        seen.append(size)
        return size[0] * 2, size[1] * 3

    codec = BoxCodec(ABSOLUTE, resize)
    assert codec.for_image((90, 40)) == SliceCodec(ABSOLUTE, (90, 40), (180, 120))
    assert seen == [(90, 40)], "the resize rule gets (width, height), once"
    # the normalized conventions never ask for the resize: their numbers are fractions of any size
    assert BoxCodec(N1000, resize).for_image((90, 40)).model_input_size is None
    assert BoxCodec("normalized_100").for_image((7, 9)) == SliceCodec(N100, (7, 9))


def test_prompt_words_name_each_coordinate_system():
    words = {c: BoxCodec(c, lambda s: s).prompt_words for c in BoxConvention}
    assert words == {
        ABSOLUTE: "as pixel coordinates of the image",
        N1000: "scaled to 0-1000 of the image width and height",
        N100: "scaled to 0-100 of the image width and height",
    }


def test_answer_numbers_known_values():
    # 96 x 64 image: NORMALIZED_100 units are 0.96 px along x and 0.64 px along y
    box = (24, 16, 48, 32)
    assert SliceCodec(N100, (96, 64)).answer_numbers(box) == [25, 25, 50, 50]
    assert SliceCodec(N1000, (96, 64)).answer_numbers(box) == [250, 250, 500, 500]
    assert SliceCodec(ABSOLUTE, (96, 64), (192, 128)).answer_numbers(box) == [48, 32, 96, 64]
    assert SliceCodec(N100, (64, 96)).answer_numbers(box) == [38, 17, 75, 33]  # the transposed image
    # a sub-unit box at the far edge stays one unit wide and inside the image
    assert SliceCodec(N100, (96, 64)).answer_numbers((95.8, 63.9, 96, 64)) == [99, 99, 100, 100]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SliceCodec(N100, (10, 10)).to_pixels([1, 2, 3]), "4 coordinates"),
        (lambda: SliceCodec(ABSOLUTE, (10, 10)), "model_input_size"),
        (lambda: SliceCodec(ABSOLUTE, (10, 10), (0, 10)), "positive"),
        (lambda: SliceCodec(N100, (0, 10)), "positive"),
        (lambda: BoxCodec(N100).for_image((10, -1)), "positive"),
        (lambda: BoxCodec(ABSOLUTE), "resize rule"),
        (lambda: BoxCodec("no_such_convention"), "no_such_convention"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@given(
    st.tuples(*[st.floats(0, 1) for _ in range(4)]),
    st.sampled_from(list(BoxConvention)),
    st.tuples(st.integers(1, 2048), st.integers(1, 2048)),
    st.tuples(st.integers(1, 2048), st.integers(1, 2048)),
)
def test_round_trip(fractions, convention, image_size, model_size):
    w, h = image_size
    x1, x2 = sorted((fractions[0] * w, fractions[2] * w))
    y1, y2 = sorted((fractions[1] * h, fractions[3] * h))
    codec = BoxCodec(convention, lambda size: model_size).for_image(image_size)
    assert codec.to_pixels(codec.from_pixels((x1, y1, x2, y2))) == pytest.approx((x1, y1, x2, y2), abs=1e-9)


@given(st.floats(0, 95), st.floats(0, 63), st.floats(1, 10), st.floats(1, 10))
def test_answer_numbers_round_trip_within_half_a_unit(x, y, w, h):
    box = (x, y, min(x + w, 96), min(y + h, 64))
    for convention, unit in ((N1000, 96 / 1000), (N100, 96 / 100)):
        codec = SliceCodec(convention, (96, 64))
        back = codec.to_pixels(codec.answer_numbers(box))
        assert all(abs(b - v) <= unit / 2 + 1e-9 for b, v in zip(back, box, strict=True))


def test_tasks_do_not_import_the_model():
    """Reading and scoring answers needs no model: nothing ``tasks/`` reaches, at any depth, imports ``model/``."""
    root = Path(monailabel_evlf.__file__).parent.parent
    todo = [f"monailabel_evlf.tasks.{p.stem}" for p in (root / "monailabel_evlf" / "tasks").glob("*.py")]
    reached: set[str] = set()
    while todo:
        name = todo.pop()
        path = root / f"{name.replace('.', '/')}.py"
        path = path if path.is_file() else path.with_suffix("") / "__init__.py"
        if name in reached or not name.startswith("monailabel_evlf") or not path.is_file():
            continue  # seen, outside the package, or a name (not a module) imported from one
        reached.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
    assert "monailabel_evlf.imaging.geometry" in reached  # the walk follows imports
    assert sorted(m for m in reached if m.startswith("monailabel_evlf.model")) == []
