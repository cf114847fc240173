"""DICOMweb round trip: phantom CT series in a real Orthanc, the EVLF app serving it, SR / SEG stored back.

Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) runs on 127.0.0.1 with free ports, a temporary storage folder
and a JSON config (tests/e2e/orthanc.py, shared with the browser test); the tests skip with the reason when it is
not installed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient

from monailabel_evlf.annotations.dicom_common import is_model_output
from monailabel_evlf.annotations.dicom_seg import read_segmentation_boxes
from monailabel_evlf.annotations.dicom_sr import read_sr_boxes
from monailabel_evlf.annotations.provenance import model_identity
from monailabel_evlf.annotations.slicer_markups import write_roi_markups
from monailabel_evlf.app.bench import running_server
from monailabel_evlf.data.phantoms import write_sample_dataset
from monailabel_evlf.imaging.geometry import WorldBox
from tests.e2e import orthanc as orthanc_server

pytestmark = pytest.mark.integration

ORACLE = "tests.app.gt_backend:GroundTruthBackend"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> str:
    if not orthanc_server.available():
        pytest.skip(orthanc_server.MISSING)
    with orthanc_server.running_orthanc(tmp_path_factory.mktemp("orthanc")) as url:
        yield url


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory, orthanc) -> tuple[Path, dict]:
    """One phantom with three lesions, its DICOM series stored in Orthanc through STOW-RS."""
    root = tmp_path_factory.mktemp("phantoms")
    (study,) = write_sample_dataset(root, n=1, seed=7, dicom=True)
    sidecar = json.loads((root / "ground_truth" / f"{study}.json").read_text())
    datasets = [pydicom.dcmread(p) for p in sorted((root / "dicom" / study).glob("*.dcm"))]
    DICOMwebClient(orthanc).store_instances(datasets)
    return root, sidecar


@pytest.fixture(scope="module")
def server(orthanc, phantoms, tmp_path_factory) -> str:
    root, _ = phantoms
    cache = tmp_path_factory.mktemp("dicomweb-cache")
    conf = {"backend": ORACLE, "model": str(root)}
    with running_server(orthanc, conf, timeout=180, env={"MONAI_LABEL_DATASTORE_CACHE_PATH": str(cache)}) as url:
        yield url


def _stored_series(orthanc: str, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    client = DICOMwebClient(orthanc)
    found = client.search_for_series(search_filters={"StudyInstanceUID": study_uid, "Modality": modality})
    series_uids = [pydicom.Dataset.from_json(s).SeriesInstanceUID for s in found]
    return [ds for uid in series_uids for ds in client.retrieve_series(study_uid, uid)]


def _truth_on_central_slices(sidecar: dict) -> set[tuple]:
    boxes = set()
    for lesion in sidecar["lesions"]:
        lo, hi = lesion["voxel_box"]["lo"], lesion["voxel_box"]["hi"]
        boxes.add(((lo[2] + hi[2]) // 2, float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]), lesion["label"]))
    return boxes


def test_next_sample_comes_from_orthanc(server, phantoms):
    _, sidecar = phantoms
    response = requests.post(f"{server}/activelearning/first", json={}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == sidecar["dicom"]["series_instance_uid"]


def _ground(server: str, sidecar: dict, output: str) -> dict:
    """Grounding on the phantom's DICOM series with the given output; the result JSON."""
    response = requests.post(
        f"{server}/infer/evlf_grounding",
        params={"image": sidecar["dicom"]["series_instance_uid"]},
        data={"params": json.dumps({"output": output})},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_dicom_sr_is_stored_back_through_stow_rs(server, orthanc, phantoms):
    _, sidecar = phantoms
    study_uid = sidecar["dicom"]["study_instance_uid"]
    body = _ground(server, sidecar, "dicom_sr")
    assert body["dicom"]["stored"] == "stow-rs" and body["dicom"]["study_instance_uid"] == study_uid

    (sr,) = _stored_series(orthanc, study_uid, "SR")
    assert str(sr.SOPInstanceUID) == body["dicom"]["sop_instance_uid"]
    findings = read_sr_boxes(sr, sidecar["dicom"]["sop_instance_uids"])
    got = {(f.k, f.box.x1, f.box.y1, f.box.x2, f.box.y2, f.label) for f in findings}
    assert got == _truth_on_central_slices(sidecar)


def test_dicom_seg_is_stored_back_through_stow_rs(server, orthanc, phantoms):
    _, sidecar = phantoms
    study_uid = sidecar["dicom"]["study_instance_uid"]
    assert _ground(server, sidecar, "dicom_seg")["dicom"]["stored"] == "stow-rs"
    (seg,) = _stored_series(orthanc, study_uid, "SEG")
    boxes = read_segmentation_boxes(seg, sidecar["dicom"]["sop_instance_uids"])
    got = sorted((b.label, b.lo.tolist(), b.hi.tolist()) for b in boxes)
    want = sorted(
        (
            lesion["label"],
            np.asarray(lesion["voxel_box"]["lo"], float).tolist(),
            np.asarray(lesion["voxel_box"]["hi"], float).tolist(),
        )
        for lesion in sidecar["lesions"]
    )
    assert got == want


# -- the DICOMweb datastore as the app needs it: corrections, not AI outputs, are labels --------------------------


def test_ai_outputs_do_not_label_a_study(server, orthanc, phantoms):
    _, sidecar = phantoms
    _ground(server, sidecar, "dicom_sr")
    _ground(server, sidecar, "dicom_seg")
    # the study now has the app's SR and SEG, yet it is still unlabelled: active learning still offers it
    response = requests.post(f"{server}/activelearning/first", json={}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == sidecar["dicom"]["series_instance_uid"]


def _put_label(server: str, image: str, path: Path, tag: str = "final") -> requests.Response:
    with path.open("rb") as handle:
        return requests.put(
            f"{server}/datastore/label",
            params={"image": image, "tag": tag},
            files={"label": (path.name, handle)},
            timeout=300,
        )


def test_bad_labels_are_refused_with_4xx(server, orthanc, phantoms, tmp_path):
    root, sidecar = phantoms
    image = sidecar["dicom"]["series_instance_uid"]
    study_uid = sidecar["dicom"]["study_instance_uid"]
    (ai_sr,) = _stored_series(orthanc, study_uid, "SR")[:1]
    ai_sr.save_as(tmp_path / "ai.dcm")
    ct = sorted((root / "dicom").rglob("*.dcm"))[0]
    (tmp_path / "ct.dcm").write_bytes(ct.read_bytes())
    (tmp_path / "garbage.dcm").write_bytes(b"not dicom at all" * 10)
    (tmp_path / "notes.txt").write_text("a box somewhere")
    world = {**sidecar["lesions"][0]["world_box"], "label": "no-such-finding"}
    write_roi_markups([WorldBox.from_dict(world)], tmp_path / "unknown.json")
    cases = {
        "unknown image": (_put_label(server, "1.2.3.4.5", tmp_path / "unknown.json"), 404),
        "the app's AI SR": (_put_label(server, image, tmp_path / "ai.dcm"), 422),
        "a CT instance": (_put_label(server, image, tmp_path / "ct.dcm"), 422),
        "not DICOM": (_put_label(server, image, tmp_path / "garbage.dcm"), 422),
        "unsupported format": (_put_label(server, image, tmp_path / "notes.txt"), 415),
        "unknown finding": (_put_label(server, image, tmp_path / "unknown.json"), 422),
        "other tag": (_put_label(server, image, tmp_path / "unknown.json", tag="original"), 422),
    }
    got = {name: (r.status_code, r.text[:160]) for name, (r, _) in cases.items()}
    assert {name: status for name, (status, _) in got.items()} == {n: want for n, (_, want) in cases.items()}, got
    # nothing was stored: still no person's SR / SEG
    assert all(is_model_output(ds) for m in ("SR", "SEG") for ds in _stored_series(orthanc, study_uid, m))


def test_saved_markups_become_a_manual_seg_correction(server, orthanc, phantoms, tmp_path):
    _, sidecar = phantoms
    image = sidecar["dicom"]["series_instance_uid"]
    study_uid = sidecar["dicom"]["study_instance_uid"]
    boxes = [WorldBox.from_dict({**les["world_box"], "label": les["label"]}) for les in sidecar["lesions"]]
    write_roi_markups(boxes, tmp_path / "correction.json")
    response = _put_label(server, image, tmp_path / "correction.json")
    assert response.status_code == 200, response.text

    manual = [ds for ds in _stored_series(orthanc, study_uid, "SEG") if not is_model_output(ds)]
    assert len(manual) == 1
    stored = read_segmentation_boxes(manual[0], sidecar["dicom"]["sop_instance_uids"])
    assert sorted(b.label for b in stored) == sorted(les["label"] for les in sidecar["lesions"])
    # a person's correction labels the study: active learning has nothing left to offer
    response = requests.post(f"{server}/activelearning/first", json={}, timeout=120)
    assert response.status_code in (200, 404) and response.json().get("id") != image, response.text


MOVED = 2.0  # columns the reader of the OHIF-style SR below moved its first box by


@pytest.mark.filterwarnings("ignore:The value length")  # OHIF's 19-character free-text code value
def test_an_ohif_style_enhanced_sr_is_stored_as_the_newest_correction(server, orthanc, phantoms, tmp_path):
    """An Enhanced SR laid out as OHIF 3.x writes it (label in a free-text Finding Site code; built by the
    hand-made fixture of tests/annotations/test_dicom_sr.py, not by a running OHIF) is taken as a correction.
    The reader left two of the AI boxes as they were and moved the first one: the label info says which."""
    from tests.annotations.test_dicom_sr import ENHANCED_SR, ohif_sr

    root, sidecar = phantoms
    image = sidecar["dicom"]["series_instance_uid"]
    series = [pydicom.dcmread(p) for p in sorted((root / "dicom").rglob("*.dcm"))]
    groups = []
    for n, lesion in enumerate(sidecar["lesions"]):
        lo, hi = lesion["voxel_box"]["lo"], lesion["voxel_box"]["hi"]
        dx = MOVED if n == 0 else 0.0
        x1, y1, x2, y2 = float(lo[0]) + dx, float(lo[1]), float(hi[0]) + dx, float(hi[1])
        rectangle = [x1, y1, x2, y1, x2, y2, x1, y2, x1, y1]
        groups.append(((lo[2] + hi[2]) // 2, "POLYLINE", rectangle, lesion["label"]))
    sr = ohif_sr(series, groups, site_scheme="CORNERSTONEJS", sop_class=ENHANCED_SR)
    sr.ContentDate, sr.ContentTime = "29991231", "235959"  # newer than the SEG correction saved above
    sr.save_as(tmp_path / "ohif.dcm", write_like_original=False)
    response = _put_label(server, image, tmp_path / "ohif.dcm")
    assert response.status_code == 200, response.text

    study_uid = sidecar["dicom"]["study_instance_uid"]
    people = [ds for ds in _stored_series(orthanc, study_uid, "SR") if not is_model_output(ds)]
    assert [str(ds.SOPInstanceUID) for ds in people] == [str(sr.SOPInstanceUID)]
    moved_label = sidecar["lesions"][0]["label"]
    got = set()
    for f in read_sr_boxes(people[0], series):
        dx = MOVED if f.label == moved_label else 0.0
        got.add((f.k, f.box.x1 - dx, f.box.y1, f.box.x2 - dx, f.box.y2, f.label))
    assert got == _truth_on_central_slices(sidecar)

    # per box: which the reader left as the model drew them (matched against the newest AI SR), which they moved
    info = requests.get(f"{server}/datastore/label/info", params={"label": image, "tag": "final"}, timeout=300)
    assert info.status_code == 200, info.text
    provenance = info.json()["provenance"]
    ai_srs = [ds for ds in _stored_series(orthanc, study_uid, "SR") if is_model_output(ds)]
    newest_ai = max(ai_srs, key=lambda ds: f"{ds.ContentDate}{ds.ContentTime}")
    model, version = model_identity(newest_ai)
    assert model and version
    assert provenance["model_output"] == {
        "series_uid": str(newest_ai.SeriesInstanceUID),
        "model": model,
        "adapter_version": version,
    }
    by_label = {box["label"]: box for box in provenance["boxes"]}
    assert by_label[moved_label]["source"] == "human" and by_label[moved_label]["iou"] < 0.99
    for lesion in sidecar["lesions"][1:]:
        box = by_label[lesion["label"]]
        assert (box["source"], box["model"], box["adapter_version"]) == ("model", model, version), box
        assert box["iou"] >= 0.99
    assert (provenance["model_unchanged"], provenance["human"]) == (2, 1), provenance


@pytest.fixture(scope="module")
def tiny_server(orthanc, phantoms, tmp_path_factory) -> str:
    """A trainable (tiny, random) model on the same Orthanc, its adapters in a temp folder."""
    cache, adapters = tmp_path_factory.mktemp("dicomweb-cache-tiny"), tmp_path_factory.mktemp("adapters")
    conf = {"model": "tiny", "image_size": "64", "max_slices": "6", "max_new_tokens": "24", "adapters": str(adapters)}
    env = {"MONAI_LABEL_DATASTORE_CACHE_PATH": str(cache)}
    with running_server(orthanc, conf, timeout=240, env=env) as url:
        yield url


def test_training_reads_the_correction_from_orthanc(tiny_server, phantoms):
    """After the corrections above: evlf_train reads the newest one (the OHIF-style SR) from Orthanc -> new adapter."""
    response = requests.post(
        f"{tiny_server}/train/evlf_train", json={"method": "grpo", "steps": 1, "gate": False}, timeout=60
    )
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 400
    while (status := requests.get(f"{tiny_server}/train/", timeout=30).json()).get("status") not in ("DONE", "ERROR"):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    details = "\n".join(status.get("details", []))
    assert status["status"] == "DONE", details[-3000:]
    assert "unsupported label file" not in details
    # the training log says which boxes of the correction are the reader's acceptance of model boxes
    assert "3 boxes: 2 left as the model drew them (" in details and "1 drawn or changed by a reader" in details, (
        details[-3000:]
    )
    stats = requests.get(f"{tiny_server}/info/", timeout=30).json()["train_stats"]["evlf_train"]
    assert stats["adapter_versions"] == ["v0001"], stats
