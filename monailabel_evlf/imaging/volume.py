"""Load a 3D image as stored (index order and all) with its voxel -> LPS affine, and write label maps on its grid.

Nothing is resampled or reoriented: boxes found on the loaded array are boxes on the user's own file, so label
maps and DICOM SEG/SR written back line up voxel for voxel in 3D Slicer and OHIF (docs/conventions.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import itk
import nibabel as nib
import numpy as np
import pydicom
from monai.data import ITKReader

from monailabel_evlf.imaging.geometry import affine_spacing_and_directions, lps_to_ras, world_to_voxel

__all__ = ["Volume", "load_volume", "save_like"]

_SLICE_POSITION_TOLERANCE = 0.1  # voxels; larger misfits mean gaps or irregular spacing in a DICOM series


@dataclass
class Volume:
    """A 3D scalar image: ``array`` (I, J, K) as stored, ``affine`` voxel-centre index -> LPS mm, ``meta``."""

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.affine = np.asarray(self.affine, dtype=float)
        if self.array.ndim != 3:
            raise ValueError(f"a Volume needs a 3D array, got shape {self.array.shape}")
        affine_spacing_and_directions(self.affine)  # validates: finite, invertible, not sheared

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        return affine_spacing_and_directions(self.affine)[0]

    @property
    def directions(self) -> np.ndarray:
        """Unit direction cosines of axes i, j, k in LPS, as columns."""
        return affine_spacing_and_directions(self.affine)[1]


def load_volume(path_or_dir: str | Path, *, series_instance_uid: str | None = None, dtype: Any = np.float32) -> Volume:
    """Read NIfTI (.nii/.nii.gz), NRRD or any other ITK-readable 3D file, or a folder holding a DICOM series.

    ITK does the reading (it turns NIfTI's RAS into LPS and applies DICOM rescale slope/intercept); MONAI's
    ``ITKReader`` turns the ITK image into an (I, J, K) array and a voxel -> LPS affine. For DICOM folders,
    ``meta["sop_instance_uids"][k]`` names the instance slice ``k`` came from; pick one series of several with
    ``series_instance_uid``. Label maps keep their integers with ``dtype=np.int16``.
    """
    path = Path(path_or_dir)
    if not path.exists():
        raise FileNotFoundError(f"no image at {path}")
    meta: dict[str, Any] = {"source": str(path)}
    if path.is_dir():
        image, dicom_meta, positions = _read_dicom_series(path, series_instance_uid)
        array, affine = _to_array_and_affine(image, path)
        _check_slice_order(positions, affine, path)
        meta.update(dicom_meta)
    else:
        array, affine = _to_array_and_affine(_read_itk(str(path)), path)
    meta["spacing"] = affine_spacing_and_directions(affine)[0].tolist()
    return Volume(array=array.astype(dtype, copy=False), affine=affine, meta=meta)


def save_like(array: np.ndarray, reference: Volume, path: str | Path) -> Path:
    """Write ``array`` (e.g. a label map) as NIfTI on ``reference``'s grid: same shape, same affine (stored RAS)."""
    array = np.asarray(array)
    if array.shape != reference.shape:
        raise ValueError(f"array shape {array.shape} does not match the reference volume {reference.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"save_like writes NIfTI; give a .nii or .nii.gz path, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    ras_affine = lps_to_ras(reference.affine)
    image = nib.Nifti1Image(array, ras_affine)
    image.set_qform(ras_affine, code=1)  # qform too, so ITK and Slicer read the same grid as nibabel
    image.set_sform(ras_affine, code=1)
    nib.save(image, str(path))
    return path


def _read_itk(name: str | list[str]) -> Any:
    try:
        return itk.imread(name)
    except (RuntimeError, OSError) as error:  # ITK reports unreadable files as RuntimeError
        raise ValueError(f"ITK cannot read {name if isinstance(name, str) else name[0]}: {error}") from error


def _to_array_and_affine(image: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    dimension = image.GetImageDimension()
    components = image.GetNumberOfComponentsPerPixel()
    if dimension != 3 or components != 1:
        raise ValueError(
            f"{path}: need a 3D scalar image, got {dimension}D with {components} component(s) per voxel "
            "(4D / vector / RGB images are not supported; split them into 3D volumes first)"
        )
    array, meta = ITKReader(affine_lps_to_ras=False).get_data(image)
    return np.asarray(array), np.asarray(meta["affine"], dtype=float)


def _read_dicom_series(folder: Path, series_instance_uid: str | None) -> tuple[Any, dict[str, Any], np.ndarray]:
    """Read one series with ITK from files we sorted along the slice normal, and record each slice's instance.

    We read the headers with pydicom (rather than let ITK pick a series) to know which SOP instance is slice
    ``k`` — DICOM SR and SEG must reference it — and to choose a series explicitly when a folder holds several.
    """
    series: dict[str, list[tuple[Path, Any]]] = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        if "ImagePositionPatient" in header and "ImageOrientationPatient" in header:
            series.setdefault(str(header.SeriesInstanceUID), []).append((file, header))
    if not series:
        raise ValueError(f"{folder}: no DICOM image with a position and orientation")
    if series_instance_uid is None:
        if len(series) > 1:
            raise ValueError(
                f"{folder} holds {len(series)} series; choose one with series_instance_uid: {sorted(series)}"
            )
        series_instance_uid = next(iter(series))
    if series_instance_uid not in series:
        raise ValueError(f"{folder}: no series {series_instance_uid!r}; found {sorted(series)}")
    instances = series[series_instance_uid]
    orientation = np.asarray(instances[0][1].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([np.asarray(h.ImagePositionPatient, dtype=float) for _, h in instances])
    order = np.argsort(positions @ normal, kind="stable")
    instances = [instances[n] for n in order]
    image = _read_itk([str(file) for file, _ in instances] if len(instances) > 1 else str(instances[0][0]))
    first = instances[0][1]
    meta = {
        "series_instance_uid": series_instance_uid,
        "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "sop_instance_uids": [str(h.SOPInstanceUID) for _, h in instances],
        "modality": str(first.get("Modality", "")),
    }
    return image, meta, positions[order]


def _check_slice_order(positions: np.ndarray, affine: np.ndarray, folder: Path) -> None:
    """Slice ``k`` must sit at voxel k of the affine ITK built; otherwise SR/SEG would point at wrong instances."""
    k = world_to_voxel(positions, affine)[:, 2] - 0.5
    expected = np.arange(len(positions))
    if not np.allclose(k, expected, atol=_SLICE_POSITION_TOLERANCE):
        worst = int(np.argmax(np.abs(k - expected)))
        raise ValueError(
            f"{folder}: DICOM slice positions do not form a regular grid (slice {worst} sits at k={k[worst]:.3f}); "
            "missing slices or irregular spacing are not supported"
        )
