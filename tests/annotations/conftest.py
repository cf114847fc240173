"""Fixtures for the annotation tests: a small CT series with known geometry, and dciodvfy as a validator."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from monailabel_evlf.data.dicom_series import write_dicom_series

# I = 40 columns, J = 30 rows, K = 6 slices; 0.8 x 0.7 x 2.5 mm, axis-aligned LPS.
CT_SHAPE = (40, 30, 6)
CT_AFFINE = np.array([[0.8, 0.0, 0.0, -100.0], [0.0, 0.7, 0.0, -90.0], [0.0, 0.0, 2.5, 30.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="session")
def ct_affine() -> np.ndarray:
    return CT_AFFINE.copy()


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    """The CT instances in shuffled order (readers must not rely on file order)."""
    array = np.full(CT_SHAPE, -1000.0, dtype=np.float32)
    paths = write_dicom_series(array, CT_AFFINE, tmp_path_factory.mktemp("ct"), seed=7)
    datasets = [pydicom.dcmread(p) for p in paths]
    return [datasets[n] for n in (3, 0, 5, 1, 4, 2)]


@pytest.fixture
def dciodvfy_errors() -> Callable[[Path], list[str]]:
    """``errors(path)``: the 'Error' lines dciodvfy (Debian dicom3tools) prints for a file; warnings are allowed."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")

    def errors(path: Path) -> list[str]:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]

    return errors
