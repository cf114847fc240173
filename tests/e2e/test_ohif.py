"""The OHIF loop in a real browser: AI boxes drawn by OHIF on their slices, corrected there, trained on.

Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on a free loopback port holds one phantom CT study. Two EVLF
servers use it as their DICOMweb datastore: one answers grounding with the ground-truth oracle
(tests/app/gt_backend.py, so the boxes are known and the test is about the viewer, not the model), one has a
trainable tiny model. OHIF 3.10 as MONAI Label serves it at ``/ohif/`` runs in headless Debian Chromium, driven
over the DevTools protocol; every check reads OHIF's own state (display sets, measurement service, Cornerstone
annotations), never pixels. The tests run in order and share the study. Skips without chromium or Orthanc.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient

from monailabel_evlf.annotations.dicom_common import MANUFACTURER, is_model_output
from monailabel_evlf.annotations.dicom_sr import read_sr_boxes
from monailabel_evlf.app.bench import running_server
from monailabel_evlf.data.phantoms import write_sample_dataset
from tests.e2e import orthanc
from tests.e2e.browser import Chromium, poll
from tests.e2e.ohif_page import OHIF

pytestmark = pytest.mark.integration

ORACLE = "tests.app.gt_backend:GroundTruthBackend"
CORRECTION = "EVLF reader correction"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Orthanc with the phantom study, the oracle server and the trainable server (started side by side)."""
    if not orthanc.available():
        pytest.skip(orthanc.MISSING)
    root = tmp_path_factory.mktemp("ohif-e2e")
    (root / "orthanc").mkdir()
    with orthanc.running_orthanc(root / "orthanc") as dicomweb:
        (study,) = write_sample_dataset(root / "phantoms", n=1, seed=7, dicom=True)
        sidecar = json.loads((root / "phantoms" / "ground_truth" / f"{study}.json").read_text())
        series = [pydicom.dcmread(p) for p in sorted((root / "phantoms" / "dicom" / study).glob("*.dcm"))]
        DICOMwebClient(dicomweb).store_instances(series)
        oracle = running_server(
            dicomweb,
            {"backend": ORACLE, "model": str(root / "phantoms")},
            timeout=240,
            env={"MONAI_LABEL_DATASTORE_CACHE_PATH": str(root / "cache-oracle")},
        )
        tiny = running_server(
            dicomweb,
            {"model": "tiny", "image_size": "64", "max_slices": "6", "max_new_tokens": "24",
             "adapters": str(root / "adapters")},
            timeout=240,
            env={"MONAI_LABEL_DATASTORE_CACHE_PATH": str(root / "cache-tiny")},
        )  # fmt: skip
        with _both(oracle, tiny) as (oracle_url, tiny_url):
            yield {"dicomweb": dicomweb, "oracle": oracle_url, "tiny": tiny_url, "sidecar": sidecar, "root": root}


class _both(AbstractContextManager):
    """Enter two server context managers at the same time (each start is mostly waiting), leave both."""

    def __init__(self, *managers: AbstractContextManager) -> None:
        self.managers = managers
        self.entered: list[AbstractContextManager] = []

    def __enter__(self) -> tuple:
        with ThreadPoolExecutor(len(self.managers)) as pool:
            futures = [pool.submit(m.__enter__) for m in self.managers]
            errors = []
            values = []
            for manager, future in zip(self.managers, futures, strict=True):
                try:
                    values.append(future.result())
                    self.entered.append(manager)
                except Exception as exc:  # the other one still has to be stopped
                    errors.append(exc)
        if errors:
            self.__exit__(None, None, None)
            raise errors[0]
        return tuple(values)

    def __exit__(self, *exc: object) -> None:
        for manager in reversed(self.entered):
            manager.__exit__(None, None, None)


def _expected_rectangles(result: dict, sidecar: dict) -> dict[str, tuple[str, list[float]]]:
    """Per box of the grounding result: the SOP instance of its central slice and its rectangle there."""
    uids = sidecar["dicom"]["sop_instance_uids"]
    expected = {}
    for box in result["boxes"]:
        lo, hi = box["voxel_box"]["lo"], box["voxel_box"]["hi"]
        k = int((lo[2] + hi[2]) // 2)
        expected[box["label"]] = (uids[k], [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])])
    return expected


def _sr_series(dicomweb: str, study_uid: str) -> list[pydicom.Dataset]:
    client = DICOMwebClient(dicomweb)
    found = client.search_for_series(search_filters={"StudyInstanceUID": study_uid, "Modality": "SR"})
    uids = [str(pydicom.Dataset.from_json(s).SeriesInstanceUID) for s in found]
    return [ds for uid in uids for ds in client.retrieve_series(study_uid, uid)]


@pytest.fixture(scope="module")
def grounding(stack) -> dict[str, Any]:
    sidecar = stack["sidecar"]
    response = requests.post(
        f"{stack['oracle']}/infer/evlf_grounding",
        params={"image": sidecar["dicom"]["series_instance_uid"]},
        data={"params": json.dumps({"output": "dicom_sr"})},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["dicom"]["stored"] == "stow-rs" and result["boxes"], result
    stack["ai_sr_series"] = result["dicom"]["series_instance_uid"]
    stack["ai_model"] = result["model"]["id"][:64]
    return result


@pytest.fixture(scope="module")
def ohif(stack, browser: Chromium) -> OHIF:
    return OHIF(browser, stack["oracle"])


def _close(a: list[float], b: list[float], tolerance: float = 1e-3) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def test_ohif_draws_every_ai_box_on_its_slice_with_its_text(stack, grounding, ohif):
    expected = _expected_rectangles(grounding, stack["sidecar"])
    ohif.open_study(stack["sidecar"]["dicom"]["study_instance_uid"])
    ohif.show_series(grounding["dicom"]["series_instance_uid"])
    drawn = ohif.ai_boxes(len(expected))
    assert not ohif.errors()

    on_slice = {box["label"]: box for box in drawn}
    assert sorted(on_slice) == sorted(expected), drawn  # N/N, each labelled with its finding
    for label, (sop, rectangle) in expected.items():
        box = on_slice[label]
        assert box["sop"] == sop, f"{label}: drawn on instance {box['sop']}, its central slice is {sop}"
        assert _close(box["bounds"], rectangle), (label, box["bounds"], rectangle)
        lines = dict(box["lines"])
        # the text under the rectangle: finding, confidence, the model's reasoning, study diagnosis, model
        result_box = next(b for b in grounding["boxes"] if b["label"] == label)
        assert lines["Finding"] == label
        assert float(lines["Confidence"]) == pytest.approx(result_box["score"], abs=0.005)
        assert lines["Reasoning"] and lines["Diagnosis"] == ", ".join(grounding["labels"])
        assert lines["Model"].startswith(grounding["model"]["id"])  # + the adapter version ("base" before training)


@pytest.mark.filterwarnings("ignore:The value length")  # OHIF's CORNERSTONEFREETEXT code values (SH is 16)
def test_a_reader_corrects_a_box_and_saves_an_sr_from_ohif(stack, grounding, ohif):
    expected = _expected_rectangles(grounding, stack["sidecar"])
    taken = {m["label"]: m for m in ohif.take_over(len(expected))}
    # every AI rectangle is now an editable Cornerstone RectangleROI, labelled with its finding, unmoved
    assert sorted(taken) == sorted(expected)
    for label, (sop, rectangle) in expected.items():
        assert taken[label]["tool"] == "RectangleROI" and taken[label]["sop"] == sop
        assert _close(taken[label]["bounds"], rectangle), (label, taken[label]["bounds"], rectangle)

    edited = ohif.shown_measurement()  # OHIF shows the first one's slice
    x1, y1, x2, y2 = expected[edited][1]
    ohif.drag_corner(edited, (x2 + 4, y2 + 3))  # the reader makes the box 4 columns wider and 3 rows taller
    moved = {m["label"]: m for m in ohif.measurements(len(expected))}[edited]["bounds"]
    assert _close(moved[:2], [x1, y1]) and _close(moved[2:], [x2 + 4, y2 + 3], tolerance=0.5), moved

    assert not ohif.errors()
    ohif.create_sr(CORRECTION)
    study_uid = stack["sidecar"]["dicom"]["study_instance_uid"]
    saved = poll(
        lambda: [ds for ds in _sr_series(stack["dicomweb"], study_uid) if not is_model_output(ds)],
        timeout=60,
        what="OHIF's SR in Orthanc",
    )
    (sr,) = saved
    assert sr.SeriesDescription == CORRECTION and sr.get("Manufacturer") != MANUFACTURER
    findings = {f.label: f for f in read_sr_boxes(sr, stack["sidecar"]["dicom"]["sop_instance_uids"])}
    assert sorted(findings) == sorted(expected)  # every label OHIF wrote is read back
    uids = stack["sidecar"]["dicom"]["sop_instance_uids"]
    for label, (sop, rectangle) in expected.items():
        f = findings[label]
        assert uids[f.k] == sop
        want = moved if label == edited else rectangle
        assert _close([f.box.x1, f.box.y1, f.box.x2, f.box.y2], want, tolerance=1e-3), (label, f.box, want)
    stack["ohif_sr"], stack["edited"] = sr, edited
    sr.save_as(Path(stack["root"]) / "ohif-correction.dcm", write_like_original=False)


def test_training_uses_the_ohif_correction_and_makes_a_new_adapter(stack):
    assert "ohif_sr" in stack, "needs the SR saved from OHIF by the test before"
    image = stack["sidecar"]["dicom"]["series_instance_uid"]
    tiny = stack["tiny"]
    # the study now counts as labelled by the reader's SR, and that SR is the label training reads
    response = requests.post(f"{tiny}/activelearning/first", json={}, timeout=120)
    assert response.status_code in (200, 404) and response.json().get("id") != image, response.text

    label = requests.get(f"{tiny}/datastore/label", params={"label": image, "tag": "final"}, timeout=120)
    assert label.status_code == 200, label.text
    assert pydicom.dcmread(io.BytesIO(label.content)).SOPInstanceUID == stack["ohif_sr"].SOPInstanceUID

    # per box: OHIF wrote new tracking UIDs for all three, yet the two the reader left alone are the model's
    # (matched against the AI SR by geometry and label), the one they dragged is theirs
    info = requests.get(f"{tiny}/datastore/label/info", params={"label": image, "tag": "final"}, timeout=120)
    assert info.status_code == 200, info.text
    provenance = info.json()["provenance"]
    assert provenance["model_output"]["series_uid"] == stack["ai_sr_series"], provenance
    sources = {box["label"]: (box["source"], box["model"]) for box in provenance["boxes"]}
    model = stack["ai_model"]
    assert sources == {label: ("human", "") if label == stack["edited"] else ("model", model) for label in sources}, (
        provenance
    )
    assert len(sources) == 3 and (provenance["model_unchanged"], provenance["human"]) == (2, 1), provenance

    response = requests.post(f"{tiny}/train/evlf_train", json={"method": "grpo", "steps": 1, "gate": False}, timeout=60)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 400
    while (status := requests.get(f"{tiny}/train/", timeout=30).json()).get("status") not in ("DONE", "ERROR"):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    details = "\n".join(status.get("details", []))
    assert status["status"] == "DONE", details[-3000:]
    boxes = len(read_sr_boxes(stack["ohif_sr"], stack["sidecar"]["dicom"]["sop_instance_uids"]))
    assert f"evlf_train: {image} -> {boxes} boxes" in details, details[-3000:]
    assert f"{boxes} boxes: 2 left as the model drew them ({model}" in details, details[-3000:]
    stats = requests.get(f"{tiny}/info/", timeout=30).json()["train_stats"]["evlf_train"]
    assert stats["adapter_versions"] == ["v0001"], stats
