"""What DICOM SR and SEG writing share: slice order of a source series and coded concepts for our labels.

Labels and organs are free text in this project (the phantom's lesion kinds, a model's answer). When the text names
a SNOMED CT concept in pydicom's code dictionary (e.g. "cyst" -> SCT 367643001 "Cyst", "liver" -> SCT 10200004)
the DICOM objects carry that code, so other viewers understand them; otherwise the generic SCT "Lesion" concept is
used and the exact label travels as text (SR Comment / SEG Segment Label).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

LESION = CodedConcept(value="52988006", scheme_designator="SCT", meaning="Lesion")


def _sct_concept(text: str) -> CodedConcept | None:
    keyword = "".join(word.capitalize() for word in text.replace("_", " ").replace("-", " ").split())
    if not keyword:
        return None
    try:
        code = getattr(codes.SCT, keyword)
    except (AttributeError, RuntimeError):  # unknown name, or a name with several code values
        return None
    return CodedConcept(value=code.value, scheme_designator=code.scheme_designator, meaning=code.meaning)


def finding_concept(label: str) -> CodedConcept:
    """The SNOMED CT concept a finding label names, or SCT "Lesion" when it names none."""
    return _sct_concept(label) or LESION


def anatomy_concept(organ: str) -> CodedConcept | None:
    """The SNOMED CT concept an organ name names (e.g. "liver"), or ``None``."""
    return _sct_concept(organ)


def order_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Single-frame instances of one series in slice order ``k``: ascending position along the slice normal.

    The normal is row direction x column direction of ImageOrientationPatient, the order ITK / GDCM use when
    they load a series, so ``k`` here is the volume's third index (docs/conventions.md).
    """
    if not datasets:
        raise ValueError("the source series has no instances")
    series_uids = {ds.SeriesInstanceUID for ds in datasets}
    if len(series_uids) != 1:
        raise ValueError(f"instances belong to {len(series_uids)} series, expected one")
    for ds in datasets:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient") if k not in ds]
        if missing or int(ds.get("NumberOfFrames", 1)) != 1:
            raise ValueError(f"instance {ds.SOPInstanceUID} is not a single-frame image with {missing or 'one frame'}")
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))))


def slice_uids(series: Sequence[Dataset] | Sequence[str]) -> list[str]:
    """SOPInstanceUID of slice ``k`` for each ``k``: from datasets (ordered by :func:`order_slices`) or as given."""
    if all(isinstance(item, str) for item in series):
        return [str(uid) for uid in series]
    return [str(ds.SOPInstanceUID) for ds in order_slices(series)]


MANUFACTURER = "monailabel-evlf"  # the Manufacturer of every SR / SEG this package writes


def is_model_output(dataset: Dataset) -> bool:
    """Whether an SR / SEG is the app's own AI output rather than a person's correction.

    A SEG is the model's when every segment is AUTOMATIC (corrections saved through the app are MANUAL, OHIF
    and Slicer write MANUAL / SEMIAUTOMATIC); an SR is the model's when this package wrote it (OHIF's
    "Create SR" writes a new SR of its own, even when it carries the AI measurements a reader accepted).
    """
    if dataset.get("Modality") == "SEG":
        kinds = {str(s.get("SegmentAlgorithmType", "")) for s in dataset.get("SegmentSequence", [])}
        return kinds == {"AUTOMATIC"}
    return str(dataset.get("Manufacturer", "")) == MANUFACTURER
