"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest

from monailabel_evlf.model.tiny import build_tiny_evlf


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """A tiny EVLF checkpoint folder (random weights), built once per test module."""
    path = tmp_path_factory.mktemp("tiny-evlf")
    build_tiny_evlf(path, image_size=32, hidden_size=32, num_layers=1, pixel_pool=1)
    return path
