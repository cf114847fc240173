"""Which boxes of a reader's correction are the model's, left as it drew them, and which a person drew or changed.

OHIF's "Create SR" writes a new SR of its own: new Tracking Unique Identifiers, its own Finding codes, a Person
observer and no Algorithm Identification, even for the AI rectangles a reader took over and left alone. Nothing in
that SR links a box back to the model, so the link is made by geometry: a box of the correction is
"model, unchanged" when the newest AI output of the study (our own SR / SEG, :func:`is_model_output`) has a box
with the same label on the same slice(s) with IoU >= :data:`MIN_IOU`; the box then carries that output's model id
and adapter version. Every other box is "human": drawn, moved, resized or relabelled by a reader. Each model box
vouches for at most one box of the correction (pairs are taken best IoU first).

SR rectangles are compared as the one-slice voxel boxes they outline (``slice_finding_to_box``), so two
rectangles match only on the same referenced instance; SEG boxes are compared in 3D.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from monailabel_evlf.imaging.geometry import VoxelBox, box_iou_3d

MIN_IOU = 0.99
MODEL = "model"  # left as the model drew it: the reader's acceptance of a model box
HUMAN = "human"  # drawn, moved, resized or relabelled by a person


@dataclass(frozen=True)
class BoxOrigin:
    """Where one box of a correction came from; ``model`` / ``adapter_version`` name the AI output it matched."""

    source: str  # MODEL or HUMAN
    model: str = ""
    adapter_version: str = ""
    iou: float = 0.0  # best IoU with a model box of the same label (0.0: none on those slices)

    def as_dict(self) -> dict[str, str | float]:
        return {**asdict(self), "iou": round(self.iou, 4)}


def _label(text: str | None) -> str:
    return " ".join(str(text or "").lower().split())


def _content_text(item: Dataset, code) -> str | None:
    names = item.get("ConceptNameCodeSequence", [])
    if names and (names[0].CodeValue, names[0].CodingSchemeDesignator) == (code.value, code.scheme_designator):
        return str(item.get("TextValue", ""))
    return None


def model_identity(dataset: Dataset) -> tuple[str, str]:
    """``(model id, adapter version)`` an AI SR / SEG of this package names (``("", "")`` when it names none).

    SR: the first measurement group's Algorithm Identification (TID 4019 Algorithm Name / Version), else the
    Device observer's name and model name; SEG: the first segment's algorithm, else Manufacturer's Model Name and
    Software Versions (what ``write_segmentation`` fills)."""
    if dataset.get("Modality") == "SEG":
        for segment in dataset.get("SegmentSequence", []):
            for algorithm in segment.get("SegmentationAlgorithmIdentificationSequence", []):
                return str(algorithm.get("AlgorithmName", "")), str(algorithm.get("AlgorithmVersion", ""))
        return str(dataset.get("ManufacturerModelName", "")), str(dataset.get("SoftwareVersions", ""))
    name = version = device = device_model = ""
    stack = list(dataset.get("ContentSequence", []))
    while stack and not (name and version):
        item = stack.pop(0)
        name = name or (_content_text(item, codes.DCM.AlgorithmName) or "")
        version = version or (_content_text(item, codes.DCM.AlgorithmVersion) or "")
        device = device or (_content_text(item, codes.DCM.DeviceObserverName) or "")
        device_model = device_model or (_content_text(item, codes.DCM.DeviceObserverModelName) or "")
        stack.extend(item.get("ContentSequence", []))
    return (name or device), (version or device_model)


def match_origins(
    boxes: Sequence[VoxelBox],
    model_boxes: Sequence[VoxelBox],
    model: str = "",
    adapter_version: str = "",
    min_iou: float = MIN_IOU,
) -> list[BoxOrigin]:
    """The origin of each of ``boxes`` (a correction) given the boxes of the model's output it was made from."""
    if not boxes:
        return []
    iou = np.zeros((len(boxes), len(model_boxes)))
    if len(model_boxes):
        iou = np.asarray(box_iou_3d(list(boxes), list(model_boxes)), dtype=float).reshape(len(boxes), -1)
        iou = np.nan_to_num(iou, nan=0.0)  # two empty boxes
        same = np.array([[_label(a.label) == _label(b.label) for b in model_boxes] for a in boxes])
        iou = np.where(same, iou, 0.0)
    best = iou.max(axis=1) if iou.size else np.zeros(len(boxes))
    matched: dict[int, int] = {}
    taken: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        n, m = divmod(int(flat), iou.shape[1])
        if iou[n, m] < min_iou:
            break
        if n not in matched and m not in taken:
            matched[n] = m
            taken.add(m)
    return [
        BoxOrigin(MODEL, model, adapter_version, float(iou[n, matched[n]]))
        if n in matched
        else BoxOrigin(HUMAN, iou=float(best[n]))
        for n in range(len(boxes))
    ]


def summary(origins: Sequence[BoxOrigin]) -> str:
    """One line for a log or a message: how many boxes a reader left as the model drew them, how many are theirs."""
    kept = [o for o in origins if o.source == MODEL]
    models = sorted({f"{o.model} {o.adapter_version}".strip() for o in kept})
    left = f"{len(kept)} left as the model drew them ({', '.join(models)})" if kept else "0 left as the model drew them"
    return f"{len(origins)} boxes: {left}, {len(origins) - len(kept)} drawn or changed by a reader"
