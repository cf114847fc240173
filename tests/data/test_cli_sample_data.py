"""``evlf make-sample-data``: the documented layout, and MONAI Label's local datastore lists only the studies."""

from __future__ import annotations

import json

import pydicom
import pytest

from monailabel_evlf.cli import main

DOCUMENTED_STUDY_FIELDS = {
    "study_id",
    "generator",
    "modality",
    "body_part",
    "shape",
    "spacing",
    "orientation",
    "affine_lps",
    "anatomy_center_lps",
    "organ_attenuation_hu",
    "organs",
    "diagnosis",
    "report",
    "lesions",
    "files",
    "dicom",
}
DOCUMENTED_LESION_FIELDS = {
    "id",
    "label",
    "organ",
    "side",
    "position",
    "finding",
    "center_lps",
    "diameter_mm",
    "attenuation_hu",
    "rim_attenuation_hu",
    "voxel_count",
    "voxel_box",
    "world_box",
    "bounds_lps",
    "slice_boxes",
}


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    argv = ["make-sample-data", str(out), "--n", "3", "--seed", "1", "--shape", "32", "30", "12", "--dicom"]
    assert main(argv) == 0
    return out


def test_cli_writes_the_documented_layout(sample_dir, capsys):
    ids = ["phantom_s1_000", "phantom_s1_001", "phantom_s1_002"]
    assert sorted(p.name for p in sample_dir.glob("*.nii.gz")) == [f"{i}.nii.gz" for i in ids]
    assert sorted(p.name for p in sample_dir.iterdir()) == ["dicom", "ground_truth", *(f"{i}.nii.gz" for i in ids)]
    for study_id in ids:
        truth = json.loads((sample_dir / "ground_truth" / f"{study_id}.json").read_text())
        assert set(truth) == DOCUMENTED_STUDY_FIELDS
        assert truth["study_id"] == study_id and truth["modality"] == "CT" and truth["shape"] == [32, 30, 12]
        for lesion in truth["lesions"]:
            assert set(lesion) == DOCUMENTED_LESION_FIELDS
        assert truth["files"] == {
            "image": f"{study_id}.nii.gz",
            "lesion_labelmap": f"ground_truth/{study_id}_lesions.nii.gz",
            "vqa": f"ground_truth/{study_id}_vqa.jsonl",
            "dicom": f"dicom/{study_id}",
        }
        for rel in truth["files"].values():
            assert (sample_dir / rel).exists(), rel
        slices = sorted((sample_dir / "dicom" / study_id).glob("*.dcm"))
        assert len(slices) == 12
        first = pydicom.dcmread(slices[0], stop_before_pixels=True)
        assert first.StudyInstanceUID == truth["dicom"]["study_instance_uid"]
        assert first.SeriesInstanceUID == truth["dicom"]["series_instance_uid"]
        assert [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in slices] == truth["dicom"][
            "sop_instance_uids"
        ]


def test_cli_rejects_unknown_kinds_with_a_clear_message(tmp_path, capsys):
    assert main(["make-sample-data", str(tmp_path), "--n", "1", "--kinds", "tumour"]) == 2
    err = capsys.readouterr().err
    assert "tumour" in err and "cyst" in err


def test_monailabel_local_datastore_lists_only_the_studies(sample_dir):
    from monailabel.datastore.local import LocalDatastore

    datastore = LocalDatastore(str(sample_dir), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    assert sorted(datastore.list_images()) == ["phantom_s1_000", "phantom_s1_001", "phantom_s1_002"]
