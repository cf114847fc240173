"""Answer boxes -> image pixels for every convention, with hand-computed numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monailabel_evlf.model.backend import BoxConvention, from_image_pixels, to_image_pixels


def test_normalized_100_on_a_non_square_image():
    # 200 px wide, 50 px high: x scales by 2, y by 0.5
    assert to_image_pixels([10, 20, 60, 100], BoxConvention.NORMALIZED_100, (200, 50)) == (20.0, 10.0, 120.0, 50.0)


def test_normalized_1000():
    assert to_image_pixels([250, 500, 750, 1000], BoxConvention.NORMALIZED_1000, (64, 32)) == (16.0, 16.0, 48.0, 32.0)


def test_absolute_model_input_rescales_from_the_resized_image():
    # a 90 x 40 slice seen as 84 x 28 (Qwen2.5-VL smart_resize): x * 90/84, y * 40/28
    box = to_image_pixels([42, 14, 84, 28], BoxConvention.ABSOLUTE_MODEL_INPUT, (90, 40), model_input_size=(84, 28))
    assert box == pytest.approx((45.0, 20.0, 90.0, 40.0))


def test_swapped_corners_are_reordered():
    assert to_image_pixels([60, 100, 10, 20], BoxConvention.NORMALIZED_100, (100, 100)) == (10.0, 20.0, 60.0, 100.0)


@pytest.mark.parametrize(
    ("box", "convention", "size", "model_size", "match"),
    [
        ([1, 2, 3], BoxConvention.NORMALIZED_100, (10, 10), None, "4 coordinates"),
        ([1, 2, 3, 4], BoxConvention.ABSOLUTE_MODEL_INPUT, (10, 10), None, "model_input_size"),
        ([1, 2, 3, 4], BoxConvention.NORMALIZED_100, (0, 10), None, "positive"),
        ([1, 2, 3, 4], "no_such_convention", (10, 10), None, "no_such_convention"),
    ],
)
def test_bad_input_raises(box, convention, size, model_size, match):
    with pytest.raises(ValueError, match=match):
        to_image_pixels(box, convention, size, model_size)


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
    answer = from_image_pixels((x1, y1, x2, y2), convention, image_size, model_size)
    assert to_image_pixels(answer, convention, image_size, model_size) == pytest.approx((x1, y1, x2, y2), abs=1e-9)
