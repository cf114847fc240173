"""Saved labels -> voxel boxes, and the checks that keep unreadable labels out of the datastore."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi import HTTPException

from monailabel_evlf.annotations.labelmaps import boxes_to_labelmap, save_labelmap
from monailabel_evlf.annotations.slicer_markups import write_roi_markups
from monailabel_evlf.app.datastore import check_label_file
from monailabel_evlf.app.labels import read_label_boxes
from monailabel_evlf.imaging.geometry import VoxelBox, voxel_box_to_world
from monailabel_evlf.imaging.volume import Volume, save_like

# an oblique-ish, anisotropic, flipped grid with a non-zero origin: the boxes must survive it exactly
AFFINE = np.array(
    [
        [-0.8, 0.0, 0.0, 120.0],
        [0.0, 0.0, 2.5, -40.0],
        [0.0, 0.9, 0.0, 15.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
BOXES = [
    VoxelBox(lo=(3, 4, 2), hi=(9, 8, 5), label="cyst"),
    VoxelBox(lo=(12, 2, 6), hi=(15, 6, 8), label="hyperdense lesion"),
]


@pytest.fixture
def volume(tmp_path):
    vol = Volume(array=np.zeros((20, 12, 10), dtype=np.float32), affine=AFFINE, meta={})
    path = save_like(vol.array, vol, tmp_path / "image.nii.gz")
    return vol, path


def test_markups_label_reads_back_the_voxel_boxes(volume, tmp_path):
    vol, _ = volume
    path = tmp_path / "label.json"
    write_roi_markups([voxel_box_to_world(b, AFFINE) for b in BOXES], path)
    got = read_label_boxes(path, vol)
    assert [b.label for b in got] == ["cyst", "hyperdense lesion"]
    for expected, box in zip(BOXES, got, strict=True):
        np.testing.assert_allclose(box.lo, expected.lo, atol=1e-6)
        np.testing.assert_allclose(box.hi, expected.hi, atol=1e-6)


def test_labelmap_label_reads_back_the_voxel_boxes(volume, tmp_path):
    vol, _ = volume
    labelmap, names = boxes_to_labelmap(BOXES, vol.shape)
    path = save_labelmap(labelmap, AFFINE, tmp_path / "label.nii.gz")
    got = read_label_boxes(path, vol, names)
    assert got == [VoxelBox(b.lo, b.hi, label=b.label) for b in BOXES]


def test_labelmap_on_another_grid_is_refused(volume, tmp_path):
    vol, image_path = volume
    path = save_labelmap(np.ones((5, 5, 5), dtype=np.int16), AFFINE, tmp_path / "small.nii.gz")
    with pytest.raises(ValueError, match="shape"):
        read_label_boxes(path, vol)
    with pytest.raises(HTTPException) as caught:
        check_label_file(str(path), str(image_path))
    assert caught.value.status_code == 422 and "does not match" in caught.value.detail


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("empty.json", b"", "empty"),
        ("broken.json", b"{not json", "malformed"),
        ("wrong.json", json.dumps({"markups": [{"type": "ROI", "center": [1, 2]}]}).encode(), "malformed"),
        ("corrupt.nii.gz", b"\x1f\x8b garbage", "unreadable label map"),
        ("label.png", b"\x89PNG", "unsupported"),
        ("fake.dcm", b"DICM?", "unreadable DICOM"),
    ],
)
def test_bad_label_files_get_422(volume, tmp_path, name, content, says):
    _, image_path = volume
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(HTTPException) as caught:
        check_label_file(str(path), str(image_path))
    assert caught.value.status_code == (415 if says == "unsupported" else 422)  # 415: a format not read at all
    assert says in caught.value.detail


def test_good_labels_pass_the_check(volume, tmp_path):
    vol, image_path = volume
    markups = tmp_path / "ok.json"
    write_roi_markups([voxel_box_to_world(BOXES[0], AFFINE)], markups)
    check_label_file(str(markups), str(image_path))
    labelmap, _ = boxes_to_labelmap(BOXES, vol.shape)
    check_label_file(str(save_labelmap(labelmap, AFFINE, tmp_path / "ok.nii.gz")), str(image_path))
