"""The EVLF app in a real MONAI Label server, driven by the HTTP clients 3D Slicer and scripts use.

One server per module (start-up costs ~15 s) serves phantoms through the ground-truth oracle backend
(``tests/app/gt_backend.py``, loaded by import path): it answers each slice's TRUE boxes, so the ROIs that come
back must land on the sidecar's lesions if every step between slice pixels and LPS millimetres is right.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from monailabel_evlf.annotations.slicer_markups import read_roi_markups, validate_markups, write_roi_markups
from monailabel_evlf.app.bench import running_server
from monailabel_evlf.data.phantoms import write_sample_dataset
from monailabel_evlf.imaging.geometry import VoxelBox, WorldBox

pytestmark = pytest.mark.integration

ORACLE = "tests.app.gt_backend:GroundTruthBackend"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    write_sample_dataset(root, n=3, seed=7)  # 000: three lesions, 001: normal, 002: oblique with a cyst
    return root


@pytest.fixture(scope="module")
def server(dataset) -> str:
    conf = {"backend": ORACLE, "model": str(dataset), "image_size": "96", "batch_size": "8"}
    with running_server(dataset, conf, timeout=180) as url:
        yield url


def as_json(params) -> dict:
    """MONAI Label's clients return a JSON-only result (no file) as raw bytes."""
    return json.loads(params) if isinstance(params, bytes | str) else params


def sidecar(dataset: Path, study: str) -> dict:
    return json.loads((dataset / "ground_truth" / f"{study}.json").read_text())


def datastore_state(dataset: Path) -> dict:
    """What must not change on a refused request: image files and the saved labels."""
    labels = sorted(str(p.relative_to(dataset)) for p in (dataset / "labels").rglob("*") if p.is_file())
    images = sorted(p.name for p in dataset.glob("*.nii.gz"))
    return {"images": images, "labels": labels}


def test_info_lists_tasks_with_types_and_labels(server):
    info = MONAILabelClient(server).info()
    models = info["models"]
    assert models["evlf_grounding"]["type"] == "detection"
    assert models["evlf_diagnosis"]["type"] == "classification"
    assert models["evlf_vqa"]["type"] == "others"
    assert set(models["evlf_grounding"]["labels"]) == {"cyst", "hyperdense lesion", "ring-enhancing lesion"}
    assert "normal" in models["evlf_diagnosis"]["labels"]
    assert "evlf_train" in info["trainers"]
    assert {"evlf_disagreement", "random", "first"} <= set(info["strategies"])
    assert "evlf_disagreement" in info["scoring"]


@pytest.mark.parametrize("study", ["phantom_s7_000", "phantom_s7_002"])
def test_slicer_client_grounding_markups_land_on_the_lesions(server, dataset, tmp_path, study, slicer_client_class):
    client = slicer_client_class(server, tmpdir=str(tmp_path))
    result_file, params = client.infer("evlf_grounding", study, {})

    doc = json.loads(Path(result_file).read_text())
    validate_markups(doc)
    got = read_roi_markups(doc)
    truth = [
        WorldBox.from_dict({**lesion["world_box"], "label": lesion["label"]})
        for lesion in sidecar(dataset, study)["lesions"]
    ]
    assert len(got) == len(truth)
    spacing = np.asarray(sidecar(dataset, study)["spacing"])
    for expected in truth:
        match = min(got, key=lambda b: np.linalg.norm(b.center - expected.center))
        assert match.label == expected.label
        np.testing.assert_allclose(match.center, expected.center, atol=1e-3 * spacing.max())
        np.testing.assert_allclose(match.size, expected.size, atol=1e-3 * spacing.max())

    assert params["model"]["id"].startswith("ground-truth-oracle")
    assert "adapter_version" in params["model"]
    assert params["slices"]["axis"] == 2 and params["slices"]["indices"]
    assert params["latency_s"]["request"] > 0
    voxel_truth = {
        (tuple(les["voxel_box"]["lo"]), tuple(les["voxel_box"]["hi"])) for les in sidecar(dataset, study)["lesions"]
    }
    voxel_got = {(tuple(b["voxel_box"]["lo"]), tuple(b["voxel_box"]["hi"])) for b in params["boxes"]}
    assert voxel_got == {(tuple(map(float, lo)), tuple(map(float, hi))) for lo, hi in voxel_truth}
    for box in params["boxes"]:
        assert 0 < box["score"] <= 1 and box["slices"] and set(box["world_box"]) >= {"center", "size", "orientation"}


def test_grounding_labelmap_output_fills_the_true_voxels(server, dataset, tmp_path):
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    result_file, params = client.infer("evlf_grounding", "phantom_s7_002", {"output": "labelmap"})
    labelmap = np.asarray(nib.load(result_file).dataobj)
    lesion = sidecar(dataset, "phantom_s7_002")["lesions"][0]
    lo, hi = lesion["voxel_box"]["lo"], lesion["voxel_box"]["hi"]
    expected = np.zeros_like(labelmap)
    expected[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    np.testing.assert_array_equal(labelmap, expected)
    assert params["label_names"] == {"1": "cyst"}


def test_normal_study_gives_empty_markups_and_normal_diagnosis(server, tmp_path):
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    result_file, params = client.infer("evlf_grounding", "phantom_s7_001", {})
    assert read_roi_markups(Path(result_file).read_text()) == []
    assert params["labels"] == ["normal"]
    diagnosis = as_json(client.infer("evlf_diagnosis", "phantom_s7_001", {})[1])
    assert diagnosis["labels"] == ["normal"]


def test_diagnosis_and_vqa_answer_with_reasoning(server):
    client = MONAILabelClient(server)
    diagnosis = as_json(client.infer("evlf_diagnosis", "phantom_s7_002", {})[1])
    assert diagnosis["labels"] == ["cyst"]
    assert diagnosis["scores"]["cyst"] > 0 and diagnosis["reasoning"]
    vqa = as_json(
        client.infer("evlf_vqa", "phantom_s7_002", {"question": "Is there a lesion?", "options": ["yes", "no"]})[1]
    )
    assert vqa["answer"] in ("yes", "no") and vqa["reasoning"] and vqa["question"] == "Is there a lesion?"


def test_study_questions_are_answered_from_the_3d_findings(server, dataset):
    """Presence and counts come from the study's 3D boxes (the oracle's are the truth), not from a slice vote:
    most slices of an abnormal study show no lesion, and a lesion on several slices is counted once."""
    client = MONAILabelClient(server)
    for image in ("phantom_s7_001", "phantom_s7_002"):
        lesions = sidecar(dataset, image)["lesions"]
        presence = as_json(
            client.infer("evlf_vqa", image, {"question": "Is there a lesion in this study?", "options": ["Yes", "No"]})[
                1
            ]
        )
        assert presence["scope"] == "study" and presence["answer"] == ("Yes" if lesions else "No")
        count = as_json(client.infer("evlf_vqa", image, {"question": "How many lesions are in this study?"})[1])
        assert count["answer"] == str(len(lesions)) and count["reasoning"]
    voted = as_json(
        client.infer("evlf_vqa", "phantom_s7_002", {"question": "Is there a lesion in this study?", "scope": "slices"})[
            1
        ]
    )
    assert voted["scope"] == "slices"
    refused = requests.post(
        f"{server}/infer/evlf_vqa",
        params={"image": "phantom_s7_002"},
        data={"params": json.dumps({"question": "How many?", "scope": "everything"})},
        timeout=60,
    )
    assert refused.status_code == 422 and "scope" in refused.json()["detail"]


def test_save_label_accepts_slicer_markups_and_refuses_malformed(server, dataset, tmp_path, slicer_client_class):
    lesion = sidecar(dataset, "phantom_s7_002")["lesions"][0]
    markups = tmp_path / "label.json"
    write_roi_markups([WorldBox.from_dict({**lesion["world_box"], "label": "cyst"})], markups)
    client = slicer_client_class(server, tmpdir=str(tmp_path))
    saved = client.save_label("phantom_s7_002", str(markups), tag="final")
    assert saved["label"] == "phantom_s7_002"
    before = datastore_state(dataset)
    assert "labels/final/phantom_s7_002.json" in before["labels"]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"markups": [{"type": "ROI", "center": "nowhere"}]}))
    with bad.open("rb") as handle:
        response = requests.put(
            f"{server}/datastore/label", params={"image": "phantom_s7_002", "tag": "final"}, files={"label": handle}
        )
    assert response.status_code == 422 and "markups" in response.json()["detail"]
    assert datastore_state(dataset) == before


@pytest.mark.parametrize(
    ("what", "call", "status", "message"),
    [
        (
            "unknown model",
            lambda s, d: requests.post(f"{s}/infer/nope", params={"image": "phantom_s7_000"}),
            404,
            "nope",
        ),
        (
            "missing image",
            lambda s, d: requests.post(f"{s}/infer/evlf_grounding", params={"image": "ghost"}),
            404,
            "ghost",
        ),
        (
            "corrupt upload",
            lambda s, d: requests.post(f"{s}/infer/evlf_grounding", files={"file": ("x.nii.gz", b"not a nifti")}),
            422,
            "cannot read",
        ),
        (
            "empty upload",
            lambda s, d: requests.post(f"{s}/infer/evlf_grounding", files={"file": ("x.nii.gz", b"")}),
            422,
            "empty",
        ),
        (
            "label for a missing image",
            lambda s, d: requests.put(
                f"{s}/datastore/label", params={"image": "ghost", "tag": "final"}, files={"label": ("l.json", b"{}")}
            ),
            404,
            "ghost",
        ),
        (
            "empty label",
            lambda s, d: requests.put(
                f"{s}/datastore/label", params={"image": "phantom_s7_000"}, files={"label": ("l.json", b"")}
            ),
            422,
            "empty",
        ),
        (
            "slice outside the volume",
            lambda s, d: requests.post(
                f"{s}/infer/evlf_grounding",
                params={"image": "phantom_s7_000"},
                data={"params": json.dumps({"slices": [0, 400]})},
            ),
            422,
            "outside",
        ),
        (
            "vqa without question",
            lambda s, d: requests.post(f"{s}/infer/evlf_vqa", params={"image": "phantom_s7_000"}),
            422,
            "question",
        ),
    ],
)
def test_bad_requests_get_4xx_with_message_and_leave_datastore_intact(server, dataset, what, call, status, message):
    before = datastore_state(dataset)
    response = call(server, dataset)
    assert response.status_code == status, (what, response.status_code, response.text)
    assert message in response.json()["detail"]
    assert datastore_state(dataset) == before


def test_4d_upload_is_refused(server, dataset, tmp_path):
    path = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), dtype=np.int16), np.eye(4)), path)
    before = datastore_state(dataset)
    with path.open("rb") as handle:
        response = requests.post(f"{server}/infer/evlf_grounding", files={"file": ("four_d.nii.gz", handle)})
    assert response.status_code == 422 and "3D" in response.json()["detail"]
    assert datastore_state(dataset) == before


def test_next_sample_returns_an_unlabeled_study(server):
    client = MONAILabelClient(server)
    sample = client.next_sample("evlf_disagreement", {})
    assert sample["id"] in {"phantom_s7_000", "phantom_s7_001", "phantom_s7_002"}
    assert Path(sample["path"]).is_file()


def test_around_hint_limits_the_slices(server):
    params = {"output": "json", "around": 20, "radius": 1}
    body = as_json(MONAILabelClient(server).infer("evlf_grounding", "phantom_s7_002", params)[1])
    assert body["slices"]["indices"] == [19, 20, 21]


def test_voxel_box_schema_in_result_json(server):
    params = as_json(MONAILabelClient(server).infer("evlf_grounding", "phantom_s7_002", {"output": "json"})[1])
    box = VoxelBox.from_dict(params["boxes"][0]["voxel_box"])
    assert box.volume > 0 and params["output"] == "json"
