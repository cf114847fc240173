"""STOW-RS through MONAI Label's DICOMweb proxy (OHIF's "Create SR"), against a real Orthanc: every body that
is not a correction training can use is refused with a 4xx and a message, and nothing reaches Orthanc; an
OHIF-style Enhanced SR and a MANUAL SEG are stored and become the study's label.

Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) and the phantom study come from the fixtures of
test_dicomweb.py (a fresh Orthanc for this module); the tests skip with the reason when Orthanc is absent.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from monailabel_evlf.annotations.dicom_common import is_model_output
from monailabel_evlf.annotations.dicom_seg import write_segmentation
from monailabel_evlf.annotations.dicom_sr import SliceFinding, write_measurement_report
from monailabel_evlf.app.bench import running_server
from monailabel_evlf.imaging.geometry import Box2D, VoxelBox
from tests.annotations.test_dicom_sr import ENHANCED_SR, ohif_sr
from tests.integration.test_dicomweb import ORACLE, orthanc, phantoms  # noqa: F401  (module fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:The value length")]

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(orthanc, phantoms, tmp_path_factory) -> str:  # noqa: F811
    root, _ = phantoms
    cache = tmp_path_factory.mktemp("dicomweb-cache")
    conf = {"backend": ORACLE, "model": str(root)}
    with running_server(orthanc, conf, timeout=180, env={"MONAI_LABEL_DATASTORE_CACHE_PATH": str(cache)}) as url:
        yield url


@pytest.fixture(scope="module")
def series(phantoms) -> list[pydicom.Dataset]:  # noqa: F811
    root, _ = phantoms
    return [pydicom.dcmread(p) for p in sorted((root / "dicom").rglob("*.dcm"))]


def encode(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, write_like_original=False)
    return buffer.getvalue()


def multipart(parts: list[bytes], part_type: str = "application/dicom") -> tuple[bytes, str]:
    """A STOW-RS body as dicomweb-client and dcmjs (OHIF) write it, and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return body + f"--{boundary}--".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(server: str, parts: list[bytes], path: str = "wado/studies", **kwargs) -> requests.Response:
    body, content_type = multipart(parts, **kwargs)
    return requests.post(f"{server}/proxy/dicom/{path}", data=body, headers={"Content-Type": content_type}, timeout=120)


def instances(orthanc: str) -> int:  # noqa: F811
    return int(requests.get(f"{orthanc.removesuffix('/dicom-web')}/statistics", timeout=10).json()["CountInstances"])


def rectangles(sidecar: dict, label: str | None = "") -> list[tuple]:
    """OHIF RectangleROI groups on each lesion's central slice; ``label`` "" keeps the lesion's own."""
    groups = []
    for lesion in sidecar["lesions"]:
        lo, hi = lesion["voxel_box"]["lo"], lesion["voxel_box"]["hi"]
        x1, y1, x2, y2 = float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])
        name = lesion["label"] if label == "" else label
        groups.append(((lo[2] + hi[2]) // 2, "POLYLINE", [x1, y1, x2, y1, x2, y2, x1, y2, x1, y1], name))
    return groups


def ohif(series: list[pydicom.Dataset], sidecar: dict, label: str | None = "") -> pydicom.Dataset:
    return ohif_sr(series, rectangles(sidecar, label), site_scheme="CORNERSTONEJS", sop_class=ENHANCED_SR)


def elsewhere(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """The same SR in a study and on instances this datastore does not have."""
    dataset.StudyInstanceUID = generate_uid()
    for study in dataset.CurrentRequestedProcedureEvidenceSequence:
        study.StudyInstanceUID = dataset.StudyInstanceUID
        for item in study.ReferencedSeriesSequence:
            item.SeriesInstanceUID = generate_uid()
    stack = list(dataset.ContentSequence)
    while stack:
        item = stack.pop()
        for ref in item.get("ReferencedSOPSequence", []):
            ref.ReferencedSOPInstanceUID = generate_uid()
        stack.extend(item.get("ContentSequence", []))
    return dataset


def segmentation(series: list[pydicom.Dataset], sidecar: dict, manual: bool = True) -> pydicom.Dataset:
    """A SEG of the lesions' boxes: MANUAL as a reader's correction, AUTOMATIC as the app's own output."""
    boxes = [
        VoxelBox(lo=les["voxel_box"]["lo"], hi=les["voxel_box"]["hi"], label=les["label"]) for les in sidecar["lesions"]
    ]
    return write_segmentation(boxes, series, slice_uid_order=sidecar["dicom"]["sop_instance_uids"], manual=manual)


def cut_pixels(dataset: pydicom.Dataset) -> pydicom.Dataset:
    dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 3]
    return dataset


def odd_region(series: list[pydicom.Dataset], sidecar: dict) -> pydicom.Dataset:
    """An OHIF SR whose rectangle has 9 coordinates (no x, y pairs)."""
    k, kind, points, label = rectangles(sidecar)[0]
    return ohif_sr(series, [(k, kind, points[:-1], label)], site_scheme="CORNERSTONEJS", sop_class=ENHANCED_SR)


def ai_sr(series: list[pydicom.Dataset], sidecar: dict) -> pydicom.Dataset:
    lesion = sidecar["lesions"][0]
    lo, hi = lesion["voxel_box"]["lo"], lesion["voxel_box"]["hi"]
    box = Box2D(x1=float(lo[0]), y1=float(lo[1]), x2=float(hi[0]), y2=float(hi[1]), label=lesion["label"])
    finding = SliceFinding(k=(lo[2] + hi[2]) // 2, box=box, label=lesion["label"], score=0.9)
    return write_measurement_report([finding], series, slice_uid_order=sidecar["dicom"]["sop_instance_uids"])


def test_bodies_that_are_not_usable_corrections_are_refused_and_nothing_is_stored(server, orthanc, phantoms, series):  # noqa: F811
    _, sidecar = phantoms
    good = encode(ohif(series, sidecar))
    ct = encode(series[0])
    wrong_type = {"Content-Type": "application/dicom"}
    cases = {
        "one bare DICOM file": (
            lambda: requests.post(f"{server}/proxy/dicom/wado/studies", data=good, headers=wrong_type, timeout=60),
            415,
            "multipart/related",
        ),
        "DICOM JSON metadata": (
            lambda: requests.post(
                f"{server}/proxy/dicom/stow/studies",
                data=b"[]",
                headers={"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=x'},
                timeout=60,
            ),
            415,
            "application/dicom+json",
        ),
        "a text part": (lambda: stow(server, [b"a box somewhere"], part_type="text/plain"), 415, "application/dicom"),
        "not DICOM": (lambda: stow(server, [b"not dicom at all" * 10]), 422, "pydicom"),
        "a CT image": (lambda: stow(server, [ct]), 422, "CT Image Storage"),
        "the app's AI SR": (lambda: stow(server, [encode(ai_sr(series, sidecar))]), 422, "AI output"),
        "the app's AI SEG": (lambda: stow(server, [encode(segmentation(series, sidecar, False))]), 422, "AI output"),
        "SEG with cut pixel data": (
            lambda: stow(server, [encode(cut_pixels(segmentation(series, sidecar)))]),
            422,
            "part 1",
        ),
        "SR region of 9 numbers": (lambda: stow(server, [encode(odd_region(series, sidecar))]), 422, "part 1"),
        "SR without labels": (lambda: stow(server, [encode(ohif(series, sidecar, label=None))]), 422, "finding label"),
        "SR unknown finding": (lambda: stow(server, [encode(ohif(series, sidecar, label="R_1"))]), 422, "R_1"),
        "SR of an unknown study": (
            lambda: stow(server, [encode(elsewhere(ohif(series, sidecar)))]),
            422,
            "no image series",
        ),
        "good SR + CT in one body": (lambda: stow(server, [good, ct]), 422, "part 2"),
        "study of the URL differs": (lambda: stow(server, [good], path="stow/studies/1.2.3.4"), 422, "1.2.3.4"),
        "URL study not a UID": (lambda: stow(server, [good], path="stow/studies/x'y"), 422, "StudyInstanceUID"),
        "not a STOW path": (lambda: stow(server, [good], path="wado/instances"), 404, "proxy/dicom/stow/studies"),
        "traversal to Orthanc's REST API": (
            lambda: requests.post(
                f"{server}/proxy/dicom/stow/%2e%2e/%2e%2e/tools/execute-script", data=b"x", timeout=60
            ),
            422,
            "segments",
        ),
        "traversal read": (
            lambda: requests.get(f"{server}/proxy/dicom/wado/%2e%2e/%2e%2e/system", timeout=60),
            422,
            "segments",
        ),
    }
    before = instances(orthanc)
    got = {}
    for name, (call, status, word) in cases.items():
        response = call()
        detail = str(response.json().get("detail", ""))
        got[name] = (response.status_code, detail[:200])
        assert response.status_code == status and word.lower() in detail.lower(), (name, got[name])
        assert "Traceback" not in response.text and str(REPO_ROOT) not in response.text and "/tmp/" not in detail
    print(f"STOW-RS: {len(cases)} hostile requests, {sum(s >= 500 for s, _ in got.values())} 5xx")
    print("\n".join(f"  {name}: {status} {detail[:110]}" for name, (status, detail) in got.items()))
    assert instances(orthanc) == before, "a refused STOW-RS body reached Orthanc"


def test_an_ohif_enhanced_sr_and_a_manual_seg_are_stored_as_corrections(server, orthanc, phantoms, series):  # noqa: F811
    _, sidecar = phantoms
    image = sidecar["dicom"]["series_instance_uid"]
    study = sidecar["dicom"]["study_instance_uid"]
    assert requests.get(f"{server}/proxy/dicom/qido/studies", timeout=60).status_code == 200  # reads still pass
    sr = ohif(series, sidecar)
    before = instances(orthanc)
    response = stow(server, [encode(sr)])  # where MONAI Label's OHIF (no stowRoot) sends "Create SR"
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    assert instances(orthanc) == before + 1
    seg = segmentation(series, sidecar)
    response = stow(server, [encode(seg)], path=f"stow/studies/{study}")
    assert response.status_code == 200, response.text
    assert instances(orthanc) == before + 2
    stored = requests.get(f"{orthanc}/studies/{study}/series", params={"Modality": "SR"}, timeout=30).json()
    assert any(s["0020000E"]["Value"][0] == sr.SeriesInstanceUID for s in stored)
    # the corrections label the study: the datastore hands out the newest one to training
    info = requests.get(f"{server}/datastore/label/info", params={"label": image, "tag": "final"}, timeout=60)
    assert info.status_code == 200 and info.json().get("series_uid") in (sr.SeriesInstanceUID, seg.SeriesInstanceUID)
    assert not is_model_output(seg)
