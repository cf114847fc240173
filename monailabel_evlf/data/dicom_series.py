"""Write a volume as a DICOM CT Image Storage series, so the DICOM paths (Orthanc, OHIF, SR/SEG references)
can be tested on data whose geometry is known exactly.

Layout follows docs/conventions.md: slice ``k`` is one instance (InstanceNumber ``k + 1``) whose pixel at
(column ``i``, row ``j``) is ``array[i, j, k]``; ImageOrientationPatient holds the LPS directions of ``i`` then
``j`` and ImagePositionPatient the centre of voxel ``(0, 0, k)``. Readers (ITK/GDCM, MONAI Label, OHIF) order
instances along ``cross(row direction, column direction)``, so a right-handed affine reloads with the same ``k``
order; a left-handed one reloads with ``k`` reversed (same voxels, same world positions).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

import monailabel_evlf
from monailabel_evlf.imaging.geometry import affine_spacing_and_directions

# Stored values are HU + 1024 in unsigned 16 bit, the usual CT encoding (air at -1024 HU stores as 0).
RESCALE_INTERCEPT = -1024.0
_STORED_MAX = np.iinfo(np.uint16).max
_CONTENT_DATE = "20240101"  # fixed so that the same inputs give the same bytes
_CONTENT_TIME = "120000"


def _ds(values: Sequence[float]) -> list[DSfloat]:
    """Decimal strings are limited to 16 characters; auto_format keeps as many digits as fit."""
    return [DSfloat(float(v), auto_format=True) for v in values]


def _uid(*parts: object) -> str:
    """Deterministic UID under pydicom's root: the same parts always give the same UID."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def write_dicom_series(
    array: np.ndarray,
    affine: np.ndarray,
    out_dir: str | pathlib.Path,
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    patient_id: str = "EVLF-PHANTOM",
    series_description: str = "",
    seed: int | Sequence[int] = 0,
) -> list[pathlib.Path]:
    """Write ``array`` (HU, shape ``(I, J, K)``, voxel-centre index -> LPS ``affine``) as one CT instance per
    slice ``k`` into ``out_dir`` (``slice_0000.dcm`` ...). UIDs not given are derived from ``seed`` so a
    phantom's series is reproducible. HU are rounded to integers and must lie in [-1024, 64511]."""
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=float)
    if array.ndim != 3:
        raise ValueError(f"array must be 3D (I, J, K), got shape {array.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("array contains NaN or infinite values")
    stored = np.rint(array.astype(np.float64) - RESCALE_INTERCEPT)
    if stored.min() < 0 or stored.max() > _STORED_MAX:
        raise ValueError(
            f"HU range [{array.min()}, {array.max()}] does not fit the stored range "
            f"[{RESCALE_INTERCEPT}, {_STORED_MAX + RESCALE_INTERCEPT}]"
        )
    stored = stored.astype(np.uint16)
    voxel_spacing, directions = affine_spacing_and_directions(affine)  # DICOM planes need perpendicular axes

    seed_key = "-".join(str(s) for s in np.atleast_1d(seed))
    study_uid = study_instance_uid or _uid("evlf-phantom", seed_key, "study")
    series_uid = series_instance_uid or _uid("evlf-phantom", seed_key, study_uid, "series")
    frame_uid = _uid("evlf-phantom", series_uid, "frame-of-reference")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    paths = []
    n_i, n_j, n_k = array.shape
    for k in range(n_k):
        sop_uid = _uid(series_uid, "instance", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"EVLF_{monailabel_evlf.__version__}"[:16]
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        # SOP Common
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        # Patient
        ds.PatientName = "Phantom^EVLF"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        # General Study
        ds.StudyInstanceUID = study_uid
        ds.StudyDate, ds.StudyTime = _CONTENT_DATE, _CONTENT_TIME
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.StudyDescription = "EVLF synthetic phantom"
        # General Series
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = series_description
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "ABDOMEN"
        # Frame of Reference
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        # General Equipment
        ds.Manufacturer = "monailabel-evlf"
        ds.ManufacturerModelName = "synthetic phantom"
        ds.SoftwareVersions = monailabel_evlf.__version__
        # General Image / General Acquisition
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate, ds.ContentTime = _CONTENT_DATE, _CONTENT_TIME
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.DerivationDescription = "Synthetic CT phantom generated by monailabel-evlf"
        ds.BurnedInAnnotation = "NO"
        # Image Plane
        ds.PixelSpacing = _ds([voxel_spacing[1], voxel_spacing[0]])  # row spacing (along j), column spacing (along i)
        ds.ImageOrientationPatient = _ds([*directions[:, 0], *directions[:, 1]])
        position = affine @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = _ds(position[:3])
        ds.SliceThickness = DSfloat(float(voxel_spacing[2]), auto_format=True)
        ds.SliceLocation = DSfloat(float(position[:3] @ np.cross(directions[:, 0], directions[:, 1])), auto_format=True)
        # Image Pixel + CT Image
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = n_j, n_i
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = DSfloat(RESCALE_INTERCEPT, auto_format=True)
        ds.RescaleSlope = DSfloat(1.0, auto_format=True)
        ds.RescaleType = "HU"
        ds.KVP = ""
        ds.WindowCenter, ds.WindowWidth = DSfloat(40.0, auto_format=True), DSfloat(400.0, auto_format=True)
        # rows run along j, columns along i
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = out_dir / f"slice_{k:04d}.dcm"
        pydicom.dcmwrite(path, ds, write_like_original=False)
        paths.append(path)
    return paths
