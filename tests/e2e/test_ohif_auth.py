"""OHIF with token auth (``--conf auth_token_file``) in a real browser.

One EVLF server with token auth over a private Orthanc (tests/e2e/orthanc.py) that holds one phantom CT study.
Without a token: OHIF's own files load (the guard serves ``/ohif/`` without one, they hold no study data) but
every DICOMweb call through ``/proxy/dicom`` is 401. With the token in OHIF's ``?token=`` parameter: the study
list shows the study, the token is taken out of the address bar and kept for the tab, and the viewer loads the CT
(checked in OHIF's display sets and Cornerstone's viewport, as tests/e2e/test_ohif.py does). Skips without
chromium or Orthanc.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient

from monailabel_evlf.app.bench import running_server
from monailabel_evlf.data.phantoms import write_sample_dataset
from tests.e2e import orthanc
from tests.e2e.browser import Chromium
from tests.e2e.ohif_page import OHIF

pytestmark = pytest.mark.integration

ORACLE = "tests.app.gt_backend:GroundTruthBackend"
SECRET = "ohif-token-secret-0123456789"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not orthanc.available():
        pytest.skip(orthanc.MISSING)
    root = tmp_path_factory.mktemp("ohif-auth")
    (root / "orthanc").mkdir()
    secret = root / "token"
    secret.write_text(SECRET + "\n")
    with orthanc.running_orthanc(root / "orthanc") as dicomweb:
        (study,) = write_sample_dataset(root / "phantoms", n=1, seed=7, dicom=True)
        sidecar = json.loads((root / "phantoms" / "ground_truth" / f"{study}.json").read_text())
        series = [pydicom.dcmread(p) for p in sorted((root / "phantoms" / "dicom" / study).glob("*.dcm"))]
        DICOMwebClient(dicomweb).store_instances(series)
        conf = {"backend": ORACLE, "model": str(root / "phantoms"), "auth_token_file": str(secret)}
        env = {"MONAI_LABEL_DATASTORE_CACHE_PATH": str(root / "cache")}
        ready = {"Authorization": f"Bearer {SECRET}"}
        with running_server(dicomweb, conf, timeout=300, env=env, headers=ready) as url:
            yield {"url": url, "sidecar": sidecar, "patient": str(series[0].PatientID), "root": root}


def test_without_the_token_ohif_files_load_and_dicomweb_is_401(stack):
    url = stack["url"]
    for path in ("/ohif/", "/ohif/viewer", "/ohif/app-config.js"):
        response = requests.get(f"{url}{path}", timeout=30)
        assert response.status_code == 200, (path, response.status_code, response.text[:200])
    assert "evlf-token" in requests.get(f"{url}/ohif/app-config.js", timeout=30).text
    assert SECRET not in requests.get(f"{url}/ohif/app-config.js", timeout=30).text
    study = stack["sidecar"]["dicom"]["study_instance_uid"]
    for path in ("/proxy/dicom/qido/studies", f"/proxy/dicom/wado/studies/{study}/series", "/info/"):
        response = requests.get(f"{url}{path}", timeout=30)
        assert response.status_code == 401, (path, response.status_code)
    stow = requests.post(f"{url}/proxy/dicom/stow/studies", data=b"x", timeout=30)
    assert stow.status_code == 401
    assert requests.post(f"{url}/ohif/app-config.js", timeout=30).status_code == 401  # only reads are open
    wrong = {"Authorization": "Bearer wrong"}
    assert requests.get(f"{url}/proxy/dicom/qido/studies", headers=wrong, timeout=30).status_code == 401


def test_ohif_with_the_token_lists_the_study_and_loads_the_ct(stack, browser: Chromium):
    url = stack["url"]
    issued = requests.post(f"{url}/auth/token", data={"username": "reader", "password": SECRET}, timeout=30)
    assert issued.status_code == 200, issued.text
    token = issued.json()["access_token"]
    study = stack["sidecar"]["dicom"]["study_instance_uid"]
    browser.goto(f"{url}/ohif/?token={token}")
    # the study list is OHIF's QIDO-RS search through /proxy/dicom: it lists the study only if OHIF sent the token
    # (without it the search is 401 and the list stays empty)
    browser.wait_for(
        f"document.body && document.body.innerText.includes({json.dumps(stack['patient'])})",
        timeout=180,
        what="the phantom study in OHIF's study list",
    )
    assert "token" not in browser.evaluate("window.location.href")  # out of the address bar at once
    assert browser.evaluate("sessionStorage.getItem('evlf-token')") == token

    ohif = OHIF(browser, url)  # a new page load in the same tab: the token is kept for the tab
    ohif.open_study(study, modalities=("CT",))
    shown = browser.evaluate(
        """(() => { const v = cornerstone.getEnabledElements().find(e => e.viewport.type === 'stack'
             && e.viewport.getCornerstoneImage && e.viewport.getCornerstoneImage()).viewport;
             const meta = cornerstone.metaData.get('instance', v.getCurrentImageId());
             return { study: meta.StudyInstanceUID, modality: meta.Modality, images: v.getImageIds().length }; })()"""
    )
    assert shown["study"] == study and shown["modality"] == "CT", shown
    assert shown["images"] == len(stack["sidecar"]["dicom"]["sop_instance_uids"]), shown
    assert not ohif.errors()
