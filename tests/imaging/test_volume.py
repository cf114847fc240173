"""load_volume keeps the stored index order and returns the LPS affine, for NIfTI, NRRD and DICOM folders."""

from __future__ import annotations

import math
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pydicom
import pytest

from monailabel_evlf.data.dicom_series import write_dicom_series
from monailabel_evlf.imaging.geometry import lps_to_ras
from monailabel_evlf.imaging.volume import Volume, load_volume, save_like

C = math.sqrt(0.5)


def _affine(linear, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "flipped i and j (typical NIfTI from a scanner)": _affine(np.diag([-0.75, -0.75, 2.5]), (90, 80, -40)),
    "oblique, permuted": _affine(np.array([[0, -C, C], [0, C, C], [1.5, 0, 0]]) * [1, 0.8, 2], (5, -10, 20)),
    "left-handed": _affine(np.diag([1.0, 1.0, -3.0]), (0, 0, 0)),
}


def _ramp(shape=(5, 6, 7)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


@pytest.mark.parametrize("name", AFFINES, ids=list(AFFINES))
def test_nifti_written_in_ras_loads_with_the_same_lps_affine_and_index_order(tmp_path: Path, name: str) -> None:
    affine = AFFINES[name]
    nib.save(nib.Nifti1Image(_ramp(), lps_to_ras(affine)), tmp_path / "image.nii.gz")
    volume = load_volume(tmp_path / "image.nii.gz")
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, _ramp())
    assert volume.array.dtype == np.float32
    assert volume.meta["source"] == str(tmp_path / "image.nii.gz")


def test_nrrd_loads_with_its_lps_affine(tmp_path: Path) -> None:
    affine = AFFINES["oblique, permuted"]
    image = itk.image_from_array(np.ascontiguousarray(_ramp().transpose(2, 1, 0)))  # ITK arrays are (k, j, i)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    image.SetDirection(itk.matrix_from_array(affine[:3, :3] / spacing))
    itk.imwrite(image, str(tmp_path / "image.nrrd"))
    volume = load_volume(tmp_path / "image.nrrd")
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(volume.array, _ramp())


def test_dicom_folder_orders_slices_along_the_normal_and_names_their_instances(tmp_path: Path) -> None:
    affine = _affine(np.array([[0, -0.8, 0], [0.7, 0, 0], [0, 0, 2.5]]), (10, -5, 30))
    hu = np.round(_ramp() - 100)
    files = write_dicom_series(hu, affine, tmp_path / "dicom", series_description="test")
    volume = load_volume(tmp_path / "dicom")
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, hu)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    by_number = sorted(headers, key=lambda h: int(h.InstanceNumber))
    assert volume.meta["sop_instance_uids"] == [h.SOPInstanceUID for h in by_number]
    assert volume.meta["series_instance_uid"] == headers[0].SeriesInstanceUID
    assert volume.meta["study_instance_uid"] == headers[0].StudyInstanceUID


def test_dicom_series_stored_against_the_normal_loads_reversed_and_consistent(tmp_path: Path) -> None:
    """DICOM knows no k direction but the slice normal: k then runs along it, and the UIDs follow."""
    affine = _affine(np.diag([1.0, 1.0, -3.0]), (0, 0, 30))
    hu = np.round(_ramp() - 100)
    files = write_dicom_series(hu, affine, tmp_path / "dicom")
    volume = load_volume(tmp_path / "dicom")
    np.testing.assert_allclose(volume.affine, _affine(np.diag([1.0, 1.0, 3.0]), (0, 0, 12)), atol=1e-5)
    np.testing.assert_array_equal(volume.array, hu[:, :, ::-1])
    numbers = {pydicom.dcmread(f).SOPInstanceUID: int(pydicom.dcmread(f).InstanceNumber) for f in files}
    assert [numbers[uid] for uid in volume.meta["sop_instance_uids"]] == [7, 6, 5, 4, 3, 2, 1]


def test_dicom_folder_with_two_series_needs_a_choice(tmp_path: Path) -> None:
    affine = _affine(np.eye(3), (0, 0, 0))
    write_dicom_series(np.zeros((4, 4, 3)), affine, tmp_path / "a", series_instance_uid="1.2.3.1")
    write_dicom_series(np.ones((4, 4, 2)), affine, tmp_path / "b", series_instance_uid="1.2.3.2")
    with pytest.raises(ValueError, match="holds 2 series"):
        load_volume(tmp_path)
    assert load_volume(tmp_path, series_instance_uid="1.2.3.2").shape == (4, 4, 2)
    with pytest.raises(ValueError, match=r"no series '9\.9'"):
        load_volume(tmp_path, series_instance_uid="9.9")


def test_dicom_series_with_a_missing_slice_is_rejected(tmp_path: Path) -> None:
    files = write_dicom_series(np.zeros((4, 4, 5)), _affine(np.eye(3), (0, 0, 0)), tmp_path / "dicom")
    middle = next(f for f in files if int(pydicom.dcmread(f).InstanceNumber) == 3)
    middle.unlink()
    with pytest.raises(ValueError, match="regular grid"):
        load_volume(tmp_path / "dicom")


@pytest.mark.parametrize("shape", [(4, 5, 6, 2), (4, 5)])
def test_non_3d_images_are_rejected(tmp_path: Path, shape) -> None:
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.float32), np.eye(4)), tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="3D scalar image"):
        load_volume(tmp_path / "x.nii.gz")


def test_missing_or_unreadable_files_raise_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_volume(tmp_path / "absent.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        load_volume(tmp_path / "junk.nii.gz")
    (tmp_path / "no_dicom").mkdir()
    (tmp_path / "no_dicom" / "notes.txt").write_text("not DICOM")
    with pytest.raises(ValueError, match="no DICOM image"):
        load_volume(tmp_path / "no_dicom")


def test_save_like_writes_a_label_map_on_the_reference_grid(tmp_path: Path) -> None:
    reference = Volume(array=_ramp(), affine=AFFINES["oblique, permuted"])
    labels = np.zeros(reference.shape, dtype=np.int16)
    labels[1:3, 2:4, 5] = 2
    save_like(labels, reference, tmp_path / "labels.nii.gz")
    back = load_volume(tmp_path / "labels.nii.gz", dtype=np.int16)
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.affine, reference.affine, atol=1e-5)
    assert nib.load(tmp_path / "labels.nii.gz").get_data_dtype() == np.int16
    with pytest.raises(ValueError, match="does not match"):
        save_like(labels[:, :, :3], reference, tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match="NIfTI"):
        save_like(labels, reference, tmp_path / "labels.nrrd")
