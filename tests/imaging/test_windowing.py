"""Window presets, parsing of configured windows, and scaling to [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest

from monailabel_evlf.imaging.windowing import (
    CT_WINDOWS,
    FALLBACK_WINDOW,
    MODEL_WINDOW,
    Channel,
    PercentileWindow,
    Window,
    apply_window,
    parse_window,
    resolve_window,
    window_bounds,
    window_channels,
)


def test_lung_window_maps_level_to_half_and_edges_to_zero_and_one() -> None:
    bounds = window_bounds(np.zeros(1), "lung")
    assert bounds == (-1350.0, 150.0)
    scaled = apply_window(np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0]), bounds)
    np.testing.assert_allclose(scaled, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert scaled.dtype == np.float32


@pytest.mark.parametrize(
    ("spec", "modality", "expected"),
    [
        ("Soft_Tissue", "CT", Window(40.0, 400.0)),
        ("auto", "CT", CT_WINDOWS["soft_tissue"]),
        ("auto", "MR", PercentileWindow(0.5, 99.5)),
        ("-600, 1500", "CT", Window(-600.0, 1500.0)),
        ("percentile:1,99", "MR", PercentileWindow(1.0, 99.0)),
        ("percentile", "CT", PercentileWindow()),
        ((50, 350), "CT", Window(50.0, 350.0)),
    ],
)
def test_parse_window(spec, modality: str, expected) -> None:
    assert parse_window(spec, modality) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("abdomen_wide", "unknown window"),
        ("__import__('os')", "unknown window"),
        ("40,0", "width must be positive"),
        ("percentile:90,10", "percentiles need"),
        ((1, 2, 3), "cannot read a window"),
        ("nan,400", "finite"),
    ],
)
def test_bad_windows_raise_value_error(spec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_window(spec)


def test_percentile_window_uses_the_whole_volume() -> None:
    volume = np.arange(1001, dtype=np.float32)  # percentile p of 0..1000 is 10 * p
    assert window_bounds(volume, "percentile:1,99", "MR") == pytest.approx((10.0, 990.0))
    np.testing.assert_allclose(apply_window(np.array([10.0, 500.0, 990.0]), (10.0, 990.0)), [0, 0.5, 1], atol=1e-6)


def test_constant_image_gives_a_valid_window_not_nan() -> None:
    low, high = window_bounds(np.full((4, 4), 7.0), "auto", "MR")
    assert high > low
    assert np.all(apply_window(np.full((4, 4), 7.0), (low, high)) == 0)
    with pytest.raises(ValueError, match="low < high"):
        apply_window(np.zeros(3), (1.0, 1.0))


def test_three_windows_one_per_channel_from_a_string_or_a_list() -> None:
    assert window_channels("abdomen/liver/40,80") == [Channel("abdomen"), Channel("liver"), Channel("40,80")]
    assert [c.window for c in window_channels(["lung", "soft_tissue", "bone"])] == ["lung", "soft_tissue", "bone"]
    assert window_channels("liver") == [Channel("liver", 0)] and window_channels((50, 350)) == [Channel((50, 350))]


def test_a_channel_may_show_a_neighbouring_slice() -> None:
    assert window_channels("liver@-1/liver/ liver @ 2") == [
        Channel("liver", -1),
        Channel("liver", 0),
        Channel("liver", 2),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("abdomen/liver", "one window or three"),
        ("abdomen/liver/nope", "unknown window"),
        ("liver@up/liver/liver", "whole number of slices"),
        ("liver@1.5/liver/liver", "whole number of slices"),
    ],
)
def test_bad_channel_windows_raise(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        window_channels(spec)


def test_model_window_resolves_to_what_the_model_records_else_the_fallback() -> None:
    assert resolve_window(MODEL_WINDOW, "abdomen/liver/40,80") == "abdomen/liver/40,80"
    assert resolve_window(MODEL_WINDOW, None) == FALLBACK_WINDOW
    assert resolve_window("lung", "abdomen/liver/40,80") == "lung"  # a configured window wins
