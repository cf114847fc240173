"""DICOM SEG of box findings: filled boxes as a binary segmentation OHIF overlays on the source series.

One segment per label (the exact label as Segment Label, its SNOMED CT concept or "Lesion" as the segmented
property type), so segments may overlap where boxes of different labels do. Frame ``k`` of the source series
(docs/conventions.md) holds ``mask[:, :, k].T``: DICOM rows run along ``j`` and columns along ``i``.
Reading back gives one box per connected component of each segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from monailabel_evlf.annotations.dicom_common import finding_concept, order_slices, slice_uids
from monailabel_evlf.annotations.labelmaps import boxes_to_labelmap, labelmap_to_boxes
from monailabel_evlf.imaging.geometry import VoxelBox

_SEGMENT_LABEL_MAX = 64  # Segment Label is an LO element


def write_segmentation(
    boxes: Sequence[VoxelBox],
    series_datasets: Sequence[Dataset],
    *,
    slice_uid_order: Sequence[str] | None = None,
    algorithm_name: str = "EVLF",
    algorithm_version: str = "0",
    series_number: int = 9002,
    series_description: str = "EVLF boxes",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    manual: bool = False,
) -> hd.seg.Segmentation:
    """A binary DICOM SEG of the filled voxel ``boxes`` (volume edge coordinates) on the source series.

    ``manual=True`` marks the segments as a person's (Segment Algorithm Type MANUAL, no algorithm), which is how a
    correction saved through the DICOMweb datastore is told from the model's own AUTOMATIC output.

    Slice ``k`` is the instance at position ``k`` of ``slice_uid_order`` (``Volume.meta["sop_instance_uids"]``)
    or, by default, of :func:`order_slices`. Save with ``seg.save_as(path)``.
    """
    if not boxes:
        raise ValueError("a DICOM SEG needs at least one box")
    ordered = order_slices(series_datasets)
    if slice_uid_order is not None:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in ordered}
        if unknown := [uid for uid in slice_uid_order if uid not in by_uid]:
            raise ValueError(f"slice_uid_order names {len(unknown)} instances not in the series, e.g. {unknown[0]}")
        ordered = [by_uid[uid] for uid in slice_uid_order]
    shape = (int(ordered[0].Columns), int(ordered[0].Rows), len(ordered))
    labels = list(dict.fromkeys(box.label or "" for box in boxes))
    if too_long := [label for label in labels if not label or len(label) > _SEGMENT_LABEL_MAX]:
        raise ValueError(f"segment labels must have 1..{_SEGMENT_LABEL_MAX} characters, got {too_long}")
    masks = [
        boxes_to_labelmap([b for b in boxes if b.label == label], shape, {label: 1})[0].astype(bool) for label in labels
    ]
    pixel_array = np.stack([mask.transpose(2, 1, 0) for mask in masks], axis=-1)  # (K, rows=J, cols=I, segments)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=finding_concept(label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL
            if manual
            else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=None if manual else algorithm,
        )
        for n, label in enumerate(labels, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer="monailabel-evlf",
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number="0",
        series_description=series_description,
    )


def read_segmentation_boxes(seg_dataset: Dataset, series: Sequence[Dataset] | Sequence[str]) -> list[VoxelBox]:
    """One ``VoxelBox`` per connected component of each segment, labelled with its Segment Label.

    ``series`` gives the slice order: the source series' datasets (ordered by :func:`order_slices`) or the
    SOPInstanceUID of each slice ``k``. Frames on instances outside that list raise ``ValueError``.
    """
    if seg_dataset.get("Modality") != "SEG":
        raise ValueError(f"not a DICOM SEG (Modality {seg_dataset.get('Modality')!r})")
    seg = hd.seg.Segmentation.from_dataset(seg_dataset, copy=True)
    uids = slice_uids(series)
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    if outside := referenced - set(uids):
        raise ValueError(f"the SEG references {len(outside)} instances outside this series, e.g. {min(outside)}")
    pixels = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)
    boxes = []
    for n, number in enumerate(seg.segment_numbers):
        label = seg.get_segment_description(number).SegmentLabel
        mask = pixels[..., n].transpose(2, 1, 0).astype(np.int16)  # (K, rows, cols) -> (I, J, K)
        boxes.extend(labelmap_to_boxes(mask, {1: str(label)}))
    return boxes
