"""Tiny random-weight models built once per test session, offline, into temporary directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    from monailabel_evlf.model.tiny import build_tiny_evlf, build_tiny_qwen2_5_vl, build_tiny_qwen3_vl

    dirs = {}
    for name, builder in (
        ("evlf", build_tiny_evlf),
        ("qwen2_5_vl", build_tiny_qwen2_5_vl),
        ("qwen3_vl", build_tiny_qwen3_vl),
    ):
        dirs[name] = tmp_path_factory.mktemp(f"tiny-{name}")
        builder(dirs[name])
    return dirs


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rgb_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)]
