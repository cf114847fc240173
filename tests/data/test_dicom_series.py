"""DICOM CT series writer: known pixel layout, ITK/GDCM round trip, validity, determinism, input checks."""

from __future__ import annotations

import shutil
import subprocess

import itk
import numpy as np
import pydicom
import pytest

from monailabel_evlf.data.dicom_series import write_dicom_series
from monailabel_evlf.data.phantoms import ORIENTATIONS, make_phantom


def _known_volume() -> tuple[np.ndarray, np.ndarray]:
    """Every voxel a different HU: 100 i + 10 j + k - 500, on an anisotropic grid with a non-zero origin."""
    i, j, k = np.meshgrid(np.arange(5), np.arange(4), np.arange(3), indexing="ij")
    array = (100 * i + 10 * j + k - 500).astype(np.float32)
    affine = np.diag([0.7, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-12.5, 30.0, -101.25]
    return array, affine


def test_pixel_layout_and_plane_attributes(tmp_path):
    array, affine = _known_volume()
    paths = write_dicom_series(array, affine, tmp_path)
    assert [p.name for p in paths] == ["slice_0000.dcm", "slice_0001.dcm", "slice_0002.dcm"]
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == (4, 5)  # rows run along j, columns along i
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu[2, 3] == 100 * 3 + 10 * 2 + k - 500  # (row j=2, column i=3) = array[3, 2, k]
        np.testing.assert_array_equal(hu, array[:, :, k].T)
        assert [float(v) for v in ds.PixelSpacing] == [0.9, 0.7]  # [row spacing (j), column spacing (i)]
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.ImagePositionPatient] == [-12.5, 30.0, -101.25 + 2.5 * k]
        assert float(ds.SliceThickness) == 2.5


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_itk_series_reader_round_trip(tmp_path, orientation):
    phantom = make_phantom(2, shape=(32, 28, 10), orientation=orientation)
    write_dicom_series(phantom.image, phantom.affine, tmp_path)
    names = itk.GDCMSeriesFileNames.New(Directory=str(tmp_path))
    files = names.GetFileNames(names.GetSeriesUIDs()[0])
    assert len(files) == 10
    image = itk.imread(files)
    array = itk.array_from_image(image).transpose(2, 1, 0)
    np.testing.assert_array_equal(array, phantom.image)
    affine = np.eye(4)
    affine[:3, :3] = itk.array_from_matrix(image.GetDirection()) * np.asarray(image.GetSpacing())
    affine[:3, 3] = np.asarray(image.GetOrigin())
    corners = np.array([[0, 0, 0, 1], [31, 27, 9, 1]], dtype=float).T
    np.testing.assert_allclose(affine @ corners, phantom.affine @ corners, atol=1e-3)
    np.testing.assert_allclose(affine, phantom.affine, atol=1e-4)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy not installed")
def test_dciodvfy_reports_no_errors(tmp_path):
    phantom = make_phantom(1, shape=(16, 16, 8), orientation="oblique", n_lesions=0)
    path = write_dicom_series(phantom.image, phantom.affine, tmp_path, series_description="check")[3]
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    assert "CTImage" in report
    assert "Error" not in report, report


def test_uids_follow_the_seed_and_explicit_uids_win(tmp_path):
    array, affine = _known_volume()
    first = write_dicom_series(array, affine, tmp_path / "a", seed=3)
    again = write_dicom_series(array, affine, tmp_path / "b", seed=3)
    other = write_dicom_series(array, affine, tmp_path / "c", seed=4)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    a, c = pydicom.dcmread(first[0]), pydicom.dcmread(other[0])
    assert a.StudyInstanceUID != c.StudyInstanceUID and a.SOPInstanceUID != c.SOPInstanceUID
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in first}
    assert len(uids) == 3 and all(pydicom.dcmread(p).SeriesInstanceUID == a.SeriesInstanceUID for p in first)
    given = write_dicom_series(array, affine, tmp_path / "d", study_instance_uid="1.2.3", series_instance_uid="1.2.3.4")
    ds = pydicom.dcmread(given[1])
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == ("1.2.3", "1.2.3.4")


@pytest.mark.parametrize(
    ("array", "affine", "message"),
    [
        (np.zeros((4, 4)), np.eye(4), "3D"),
        (np.zeros((2, 2, 2)), np.eye(3), "4x4"),
        (np.full((2, 2, 2), -2000.0), np.eye(4), "HU range"),
        (np.full((2, 2, 2), np.nan), np.eye(4), "NaN"),
        (np.zeros((2, 2, 2)), np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "sheared"),
        (np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
    ],
)
def test_bad_input_raises_value_error(tmp_path, array, affine, message):
    with pytest.raises(ValueError, match=message):
        write_dicom_series(array, affine, tmp_path)
