"""/ohif/ as the app serves it (app/ohif.py): files in sub-folders are the files, not index.html; no way out."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from monailabel_evlf.app.ohif import OHIF_DIR, app_config, ohif_router


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    app.include_router(ohif_router())
    return TestClient(app)


def test_files_in_sub_folders_are_served_as_themselves(client) -> None:
    picture = next((OHIF_DIR / "assets" / "images").glob("*.png"))
    response = client.get(f"/ohif/assets/images/{picture.name}")  # MONAI Label answers this with index.html
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == picture.read_bytes()


@pytest.mark.parametrize("path", ["", "viewer", "viewer/dicomweb"])
def test_ohif_routes_get_index_html(client, path) -> None:
    response = client.get(f"/ohif/{path}")
    assert response.status_code == 200 and response.text == (OHIF_DIR / "index.html").read_text()


@pytest.mark.parametrize("path", ["assets/no-such-icon.png", "..%2F..%2Fconfig.py", "%2Fetc%2Fpasswd"])
def test_missing_files_and_paths_outside_the_build_are_404(client, path) -> None:
    assert client.get(f"/ohif/{path}").status_code == 404


def test_app_config_is_monailabel_s_with_the_evlf_customizations(client) -> None:
    response = client.get("/ohif/app-config.js")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/javascript")
    assert response.text == app_config()
    assert response.text.startswith((OHIF_DIR / "app-config.js").read_text())  # DICOMweb roots unchanged
    assert "onBeforeSRAddMeasurement" in response.text and "onBeforeSRHydration" in response.text
    assert '"monailabel-evlf"' in response.text  # only the app's own SRs are touched
