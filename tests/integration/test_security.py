"""A hostile (and a careless) client against the real server: every bad request is a 4xx with a message and
leaves nothing behind; nothing outside the studies folder is read, written, deleted or run; CORS, host and
client checks; opt-in bearer auth through 3D Slicer's own client; /info/ answers while inference runs.

One server per module (oracle backend, so no model answers matter); its TMPDIR is private, so leaked upload
temp files are counted, and its peak memory (VmHWM) is read from /proc after the bomb cases.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from monailabel_evlf.annotations.slicer_markups import write_roi_markups
from monailabel_evlf.data.phantoms import write_sample_dataset
from monailabel_evlf.imaging.geometry import WorldBox

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_DIR = REPO_ROOT / "apps" / "evlf"
STUDY = "phantom_s7_000"
SECRET = "correct-horse-battery-staple-42"
CODE_RAN = "code-ran.txt"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    studies: Path
    tmp: Path
    outside: Path
    start_rss_mib: float = 0.0

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("security")
    studies = root / "studies"
    write_sample_dataset(studies, n=2, seed=7)
    outside = root / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    # the RCE payload, already in place: any Python started with this folder on its path writes CODE_RAN
    (outside / "sitecustomize.py").write_text(f"open({str(outside / CODE_RAN)!r}, 'w').write('ran')\n")
    return studies, outside


def _start(studies: Path, outside: Path, tmp: Path, conf: dict[str, str]) -> Server:
    tmp.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    base = {"backend": "tests.app.slow_backend:SlowBackend", "model": str(studies), "backend.delay": "0.1"}
    base["adapters"] = str(tmp.parent / "adapters")
    for key, value in {**base, **conf}.items():
        cmd += ["--conf", key, value]
    env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = (tmp.parent / f"{tmp.name}.log").open("w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {SECRET}"}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, (tmp.parent / f"{tmp.name}.log").read_text()[-4000:]
        try:
            if requests.get(f"{url}/info/", headers=headers, timeout=2).status_code == 200:
                server = Server(url, process, studies, tmp, outside)
                server.start_rss_mib = server.peak_rss_mib()
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not start")


def _stop(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="module")
def server(layout, tmp_path_factory) -> Iterator[Server]:
    studies, outside = layout
    started = _start(studies, outside, tmp_path_factory.mktemp("server") / "tmp", {})
    yield started
    _stop(started)


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under the roots with its bytes (the index's timestamps excluded)."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name not in ("datastore_v2.json", ".lock"):
                files[str(path)] = path.read_bytes()
    return files


# -- payloads ------------------------------------------------------------------------------------------------------


def nifti_bytes(array: np.ndarray, affine: np.ndarray | None = None, compress: bool = True) -> bytes:
    image = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    raw = image.to_bytes()
    return gzip.compress(raw, 1) if compress else raw


def lying_header(shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    """A NIfTI header claiming ``shape`` int16 voxels, followed by ``payload``, gzipped."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\0" * 4 + payload, 6)


def study_image(server: Server) -> nib.Nifti1Image:
    return nib.load(server.studies / f"{STUDY}.nii.gz")


def labelmap_bytes(server: Server, fill: float, dtype=np.uint8, affine_shift: float = 0.0, shape=None) -> bytes:
    image = study_image(server)
    array = np.zeros(shape or image.shape, dtype=dtype)
    array[10:20, 10:20, 5:10] = fill
    affine = image.affine.copy()
    affine[0, 3] += affine_shift
    return nifti_bytes(array, affine)


def markups_bytes(server: Server, center_shift: float = 0.0, size: float = 10.0, label: str | None = "cyst") -> bytes:
    affine = study_image(server).affine
    center_ras = affine @ np.array([*(np.array(study_image(server).shape) / 2), 1.0])
    center_lps = center_ras[:3] * np.array([-1, -1, 1]) + center_shift
    box = WorldBox(center=center_lps, size=np.full(3, size), orientation=np.eye(3), label=label)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "label.json"
        write_roi_markups([box], path)
        return path.read_bytes()


def sr_bytes() -> bytes:
    """A minimal, readable DICOM SR (modality SR), enough to reach the study-type check."""
    dataset = pydicom.Dataset()
    dataset.Modality = "SR"
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, write_like_original=False)
    return buffer.getvalue()


def deep_json(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


def put_label(server: Server, content: bytes, name: str = "label.json", tag: str = "final", params: str = "{}"):
    return requests.put(
        f"{server.url}/datastore/label",
        params={"image": STUDY, "tag": tag},
        files={"label": (name, content)},
        data={"params": params},
        timeout=60,
    )


def put_image(server: Server, content: bytes, name: str = "new.nii.gz", image: str | None = None):
    params = {"image": image} if image is not None else {}
    return requests.put(f"{server.url}/datastore/image", params=params, files={"file": (name, content)}, timeout=60)


def infer(server: Server, params: dict | str | None = None, image: str | None = STUDY, **kwargs):
    query = {"image": image} if image is not None else {}
    body = params if isinstance(params, str) else json.dumps(params or {"output": "json"})
    return requests.post(
        f"{server.url}/infer/evlf_grounding", params=query, data={"params": body}, timeout=120, **kwargs
    )


def train(server: Server, body) -> requests.Response:
    return requests.post(f"{server.url}/train/evlf_train", json=body, timeout=30)


def tar_with_escape() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = b"escaped"
        member = tarfile.TarInfo("../../escaped.txt")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def nrrd_detached(target: Path) -> bytes:
    return f"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: {target}\n\n".encode()


# every case: (name, request, expected status, a word the message must contain)
Case = tuple[str, Callable[[Server], requests.Response], int, str]
STUDY_PATH = "{studies}/" + STUDY + ".nii.gz"

CASES: list[Case] = [
    # remote code execution and traversal
    (
        "py upload as image",
        lambda s: put_image(s, b"import os\n", "sitecustomize.py", "../outside/sitecustomize"),
        415,
        "unsupported image format",
    ),
    (
        "traversal image id on upload",
        lambda s: put_image(s, nifti_bytes(np.zeros((8, 8, 8), np.int16)), image="../outside/evil"),
        422,
        "invalid image id",
    ),
    (
        "absolute image id on upload",
        lambda s: put_image(s, nifti_bytes(np.zeros((8, 8, 8), np.int16)), image=str(s.outside / "evil")),
        422,
        "invalid image id",
    ),
    (
        "url-encoded traversal",
        lambda s: requests.put(f"{s.url}/datastore/image?image=%2e%2e%2fx", files={"file": ("x.nii.gz", b"x")}),
        422,
        "invalid image id",
    ),
    ("client bundle_path", lambda s: train(s, {"bundle_path": str(s.outside)}), 422, "bundle_path"),
    (
        "client bundle_path, train all",
        lambda s: requests.post(f"{s.url}/train/", json={"evlf_train": {"bundle_path": str(s.outside)}}),
        422,
        "bundle_path",
    ),
    (
        "delete traversal",
        lambda s: requests.delete(f"{s.url}/datastore/image", params={"id": "../outside"}),
        422,
        "invalid image id",
    ),
    (
        "delete unknown image",
        lambda s: requests.delete(f"{s.url}/datastore/image", params={"id": "ghost"}),
        404,
        "ghost",
    ),
    (
        "delete label traversal tag",
        lambda s: requests.delete(f"{s.url}/datastore/label", params={"id": STUDY, "tag": "../../outside"}),
        422,
        "invalid label tag",
    ),
    (
        "infer save_label to abs dir",
        lambda s: infer(s, {"save_label": True, "label_tag": str(s.outside)}),
        422,
        "save_label",
    ),
    ("infer label_tag path", lambda s: infer(s, {"label_tag": str(s.outside)}), 422, "invalid label tag"),
    (
        "session tar escape",
        lambda s: requests.put(
            f"{s.url}/session/", params={"uncompress": "true"}, files={"files": ("x.tar.gz", tar_with_escape())}
        ),
        422,
        "session",
    ),
    (
        "infer absolute existing path",
        lambda s: infer(s, image=STUDY_PATH.format(studies=s.studies)),
        422,
        "invalid image id",
    ),
    ("infer absolute missing path", lambda s: infer(s, image="/nonexistent/x.nii.gz"), 422, "invalid image id"),
    (
        "infer image in params",
        lambda s: infer(s, {"image": STUDY_PATH.format(studies=s.studies)}),
        422,
        "cannot be set",
    ),
    (
        "nrrd detached data",
        lambda s: put_image(s, nrrd_detached(s.outside / "precious.txt"), "d.nrrd"),
        422,
        "data file",
    ),
    ("label traversal tag", lambda s: put_label(s, markups_bytes(s), tag="../../outside"), 422, "invalid label tag"),
    (
        "download traversal",
        lambda s: requests.get(f"{s.url}/datastore/image", params={"image": "../../etc/passwd"}),
        422,
        "invalid image id",
    ),
    (
        "download label traversal",
        lambda s: requests.get(f"{s.url}/datastore/label", params={"label": STUDY, "tag": "../.."}),
        422,
        "invalid label tag",
    ),
    ("logs endpoint", lambda s: requests.get(f"{s.url}/logs/"), 404, "not found"),
    # MONAI Label's model-file upload (500, temp file left) and dataset ZIP (500 with no labels, ZIP left in tmp)
    (
        "model file upload",
        lambda s: requests.put(f"{s.url}/model/evlf_grounding", files={"file": ("m.pt", b"x")}),
        404,
        "not found",
    ),
    ("model file delete", lambda s: requests.delete(f"{s.url}/model/evlf_grounding"), 404, "not found"),
    ("dataset zip, nothing labelled", lambda s: requests.get(f"{s.url}/datastore/dataset"), 404, "no labelled study"),
    ("dataset zip, limit 0", lambda s: requests.get(f"{s.url}/datastore/dataset?limit_cases=0"), 422, "limit_cases"),
    ("session by dot-dot id", lambda s: requests.delete(f"{s.url}/session/%2e%2e"), 404, "sessions"),
    # MONAI Label's DICOMweb proxy on a local studies folder (it used to answer 500)
    ("proxy read, no DICOMweb", lambda s: requests.get(f"{s.url}/proxy/dicom/qido/studies"), 404, "no DICOMweb"),
    (
        "proxy STOW-RS, no DICOMweb",
        lambda s: requests.post(
            f"{s.url}/proxy/dicom/wado/studies",
            data=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + sr_bytes() + b"\r\n--b--",
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        ),
        404,
        "no DICOMweb",
    ),
    ("batch infer", lambda s: requests.post(f"{s.url}/batch/infer/evlf_grounding"), 404, "not found"),
    # what used to be 5xx
    ("infer params not JSON", lambda s: infer(s, "{bad"), 422, "not valid json"),
    ("infer params a list", lambda s: infer(s, "[1]"), 422, "json object"),
    ("infer params too deep", lambda s: infer(s, deep_json(100_000).decode()), 422, "nested deeper"),
    (
        "image upload params not JSON",
        lambda s: requests.put(f"{s.url}/datastore/image", data={"params": "{bad"}, files={"file": ("q.nii.gz", b"x")}),
        422,
        "json",
    ),
    (
        "train params not JSON",
        lambda s: requests.post(f"{s.url}/train/evlf_train", data="{bad", headers={"content-type": "application/json"}),
        422,
        "json",
    ),
    ("no image and no file", lambda s: infer(s, image=None), 422, "no image"),
    ("unknown model", lambda s: requests.post(f"{s.url}/infer/nope", params={"image": STUDY}), 404, "nope"),
    ("unknown strategy", lambda s: requests.post(f"{s.url}/activelearning/nope"), 404, "unknown strategy"),
    ("unknown scoring", lambda s: requests.post(f"{s.url}/scoring/nope"), 404, "unknown scoring"),
    ("unknown trainer", lambda s: requests.post(f"{s.url}/train/nope"), 404, "unknown trainer"),
    ("300-char id infer", lambda s: infer(s, image="a" * 300), 422, "invalid image id"),
    ("300-char id upload", lambda s: put_image(s, b"x", image="a" * 300), 422, "invalid image id"),
    ("300-char tag", lambda s: put_label(s, markups_bytes(s), tag="t" * 300), 422, "invalid label tag"),
    (
        "bad image info",
        lambda s: requests.put(f"{s.url}/datastore/image/info", params={"image": STUDY}, data={"info": "{bad"}),
        422,
        "json",
    ),
    (
        "image info unknown image",
        lambda s: requests.put(f"{s.url}/datastore/image/info", params={"image": "ghost"}, data={"info": "{}"}),
        404,
        "ghost",
    ),
    (
        "image info of unknown image",
        lambda s: requests.get(f"{s.url}/datastore/image/info", params={"image": "ghost"}),
        404,
        "ghost",
    ),
    ("100k-deep JSON label", lambda s: put_label(s, b'{"markups": ' + deep_json(100_000) + b"}"), 422, "markups"),
    ("label params a list", lambda s: put_label(s, markups_bytes(s), params="[1]"), 422, "json object"),
    # resource exhaustion
    ("header claims 1024^3", lambda s: put_image(s, lying_header((1024, 1024, 1024)), "big.nii.gz"), 413, "voxels"),
    (
        "gzip bomb infer",
        lambda s: infer(s, image=None, files={"file": ("b.nii.gz", lying_header((64, 64, 64), b"\0" * (64 << 20)))}),
        422,
        "decompression bomb",
    ),
    (
        "gzip bomb label",
        lambda s: put_label(s, lying_header((64, 64, 64), b"\0" * (64 << 20)), "b.nii.gz"),
        422,
        "decompression bomb",
    ),
    ("3000 slices", lambda s: infer(s, {"output": "json", "slices": [0] * 3000}), 422, "slices"),
    (
        "10k VQA options",
        lambda s: requests.post(
            f"{s.url}/infer/evlf_vqa",
            params={"image": STUDY},
            data={"params": json.dumps({"question": "which?", "options": [str(i) for i in range(10_000)]})},
        ),
        422,
        "options",
    ),
    (
        "100k-char question",
        lambda s: requests.post(
            f"{s.url}/infer/evlf_vqa", params={"image": STUDY}, data={"params": json.dumps({"question": "x" * 100_000})}
        ),
        422,
        "question",
    ),
    (
        "truncated nii.gz",
        lambda s: infer(
            s, image=None, files={"file": ("t.nii.gz", nifti_bytes(np.ones((32, 32, 32), np.int16))[:-200])}
        ),
        422,
        "gzip",
    ),
    (
        "truncated plain nii",
        lambda s: infer(
            s,
            image=None,
            files={"file": ("t.nii", nifti_bytes(np.ones((32, 32, 32), np.int16), compress=False)[:-5000])},
        ),
        422,
        "truncated",
    ),
    (
        "chunked upload",
        lambda s: requests.put(f"{s.url}/datastore/image", data=iter([b"x"] * 3)),
        411,
        "content-length",
    ),
    # accepted, then broke training
    ("zero-size ROI", lambda s: put_label(s, markups_bytes(s, size=0.0)), 422, "zero size"),
    ("ROI at 1e6 mm", lambda s: put_label(s, markups_bytes(s, center_shift=1e6)), 422, "outside the image"),
    ("ROI without finding", lambda s: put_label(s, markups_bytes(s, label=None)), 422, "finding label"),
    ("ROI unknown finding", lambda s: put_label(s, markups_bytes(s, label="R_1")), 422, "finding label"),
    (
        "SR label on NIfTI study",
        lambda s: put_label(s, sr_bytes(), "sr.dcm"),
        422,
        "dicom study",
    ),
    ("float label map", lambda s: put_label(s, labelmap_bytes(s, 0.5, np.float32), "l.nii.gz"), 422, "integers"),
    ("negative label map", lambda s: put_label(s, labelmap_bytes(s, -1, np.int16), "l.nii.gz"), 422, "0..3"),
    ("out-of-range label map", lambda s: put_label(s, labelmap_bytes(s, 9), "l.nii.gz"), 422, "0..3"),
    (
        "wrong-affine label map",
        lambda s: put_label(s, labelmap_bytes(s, 1, affine_shift=5.0), "l.nii.gz"),
        422,
        "geometry",
    ),
    ("wrong-shape label map", lambda s: put_label(s, labelmap_bytes(s, 1, shape=(8, 8, 8)), "l.nii.gz"), 422, "shape"),
    ("truncated label map", lambda s: put_label(s, labelmap_bytes(s, 1)[:-300], "l.nii.gz"), 422, "gzip"),
    ("label with .py name", lambda s: put_label(s, b"print(1)", "x.py"), 415, "unsupported label format"),
    ("label as .png", lambda s: put_label(s, b"\x89PNG\r\n", "x.png"), 415, "unsupported label format"),
    ("infer on a .mha upload", lambda s: infer(s, image=None, files={"file": ("v.mha", b"x")}), 415, "unsupported"),
    ("junk image", lambda s: put_image(s, b"not a nifti at all" * 10, "junk.nii.gz"), 422, "nifti"),
    ("2D image", lambda s: put_image(s, nifti_bytes(np.zeros((16, 16), np.int16)), "flat.nii.gz"), 422, "3d"),
    ("4D image", lambda s: put_image(s, nifti_bytes(np.zeros((8, 8, 8, 3), np.int16)), "four.nii.gz"), 422, "3d"),
    (
        "overwrite a study",
        lambda s: put_image(s, nifti_bytes(np.zeros((8, 8, 8), np.int16)), image=STUDY),
        409,
        "already exists",
    ),
    ("train steps -1", lambda s: train(s, {"steps": -1}), 422, "steps"),
    ("train steps 1e9", lambda s: train(s, {"steps": 10**9}), 422, "steps"),
    ("train steps float", lambda s: train(s, {"steps": 1.5}), 422, "steps"),
    ("train bad method", lambda s: train(s, {"method": "ppo"}), 422, "method"),
    ("train gate word", lambda s: train(s, {"gate": "maybe"}), 422, "gate"),
    ("train unknown key", lambda s: train(s, {"max_epochs": 3}), 422, "unknown train parameter"),
    (
        "scoring unknown key",
        lambda s: requests.post(f"{s.url}/scoring/evlf_disagreement", json={"x": 1}),
        422,
        "unknown scoring parameter",
    ),
    (
        "strategy bad labels",
        lambda s: requests.post(f"{s.url}/activelearning/random", json={"labels": 3}),
        422,
        "labels",
    ),
]


@pytest.mark.parametrize(("name", "call", "status", "word"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_refused_with_a_message_and_leaves_nothing(server, name, call, status, word):
    before, temp_before = snapshot(server.studies, server.outside), sorted(server.tmp.iterdir())
    response = call(server)
    assert response.status_code == status, (name, response.status_code, response.text[:300])
    detail = str(response.json()["detail"])
    assert word.lower() in detail.lower(), detail
    assert "Traceback" not in response.text and str(REPO_ROOT) not in response.text
    assert str(server.tmp) not in response.text and "/tmp/" not in response.text
    assert snapshot(server.studies, server.outside) == before
    assert not (server.studies.parent / "escaped.txt").exists()
    time.sleep(0.05)  # background clean-ups run after the response
    assert sorted(server.tmp.iterdir()) == temp_before, "upload temp files leaked"


def test_bomb_cases_stay_bounded_in_memory(server):
    """Runs after the corpus in this module: a 64 MiB gzip bomb (64 KiB on the wire, header says 512 KiB) and a
    header claiming 1024^3 voxels are refused after reading at most what the header allows, so the peak stays
    within the first use of the image readers (ITK alone is ~250 MiB) of the start-up size."""
    bomb = infer(server, image=None, files={"file": ("b.nii.gz", lying_header((64,) * 3, b"\0" * (64 << 20)))})
    assert bomb.status_code == 422
    assert lying_header((1024,) * 3) and put_image(server, lying_header((1024,) * 3), "big.nii.gz").status_code == 413
    grown = server.peak_rss_mib() - server.start_rss_mib
    print(f"server peak RSS {server.peak_rss_mib():.0f} MiB, {grown:.0f} MiB above start-up")
    assert grown < 512, f"peak RSS grew by {grown:.0f} MiB"


def test_good_requests_still_work_and_name_no_server_paths(server):
    response = infer(server)
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert body["model"]["id"].startswith("slow-ground-truth-oracle")
    assert str(server.studies) not in response.text and str(REPO_ROOT) not in response.text
    upload = infer(server, image=None, files={"file": ("u.nii.gz", (server.studies / f"{STUDY}.nii.gz").read_bytes())})
    assert upload.status_code == 200 and upload.json()["boxes"] == body["boxes"]
    info = requests.get(f"{server.url}/info/", timeout=10)
    assert str(REPO_ROOT) not in info.text and str(server.studies) not in info.text


def test_train_status_shows_no_traceback_or_server_path(server):
    """A train request that fails in MONAI Label's child (no labelled study yet): GET /train/ relays the child's
    last output lines, which end in its traceback; the client sees the error line, without frames or paths."""
    assert train(server, {}).status_code == 200
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = requests.get(f"{server.url}/train/", timeout=10).json()
        if status["status"] not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(1)
    assert status["status"] == "ERROR", status
    shown = requests.get(f"{server.url}/train/", params={"all": True}, timeout=10).text
    assert "need 2+" in shown, shown[-2000:]
    assert 'File "' not in shown and str(REPO_ROOT) not in shown and sys.prefix not in shown, shown[-2000:]
    log = (server.tmp.parent / f"{server.tmp.name}.log").read_text()
    assert "Traceback (most recent call last)" in log  # the server log keeps it
    assert requests.get(f"{server.url}/scoring/", timeout=10).status_code in (200, 404)


def test_bounded_load_gets_answers_or_429_and_info_stays_up(server):
    """16 grounding requests at once against a queue of 4: every one is answered 200 or 429 (never 5xx, never a
    hang), and /info/ keeps answering meanwhile."""
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(infer(server).status_code)) for _ in range(16)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    latencies = []
    while any(thread.is_alive() for thread in threads):
        began = time.perf_counter()
        assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200
        latencies.append(time.perf_counter() - began)
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    took = time.perf_counter() - started
    counts = {code: results.count(code) for code in sorted(set(results))}
    print(
        f"load: 16 concurrent grounding requests in {took:.1f} s -> {counts}; /info/ max {max(latencies) * 1000:.0f} ms"
    )
    assert len(results) == 16 and set(results) <= {200, 429} and 200 in results, counts


def test_valid_uploads_are_stored_atomically_and_not_overwritten(server):
    image = nifti_bytes(np.zeros((12, 12, 6), np.int16))
    first = put_image(server, image, "fresh.nii.gz")
    assert first.status_code == 200 and first.json() == {"image": "fresh"}
    assert (server.studies / "fresh.nii.gz").read_bytes() == image
    assert put_image(server, image, "fresh.nii.gz").status_code == 409
    saved = put_label(server, markups_bytes(server))
    assert saved.status_code == 200, saved.text
    assert (server.studies / "labels" / "final" / f"{STUDY}.json").is_file()
    assert not list(server.studies.rglob("*.tmp"))
    assert requests.delete(f"{server.url}/datastore/image", params={"id": "fresh"}).status_code == 200
    assert not (server.studies / "fresh.nii.gz").exists()
    assert (server.outside / "precious.txt").read_text() == "keep me"


def test_cors_allows_only_the_servers_own_origin(server):
    port = server.url.rsplit(":", 1)[1]
    evil = {"Origin": "http://evil.example", "Access-Control-Request-Method": "PUT"}
    preflight = requests.options(f"{server.url}/datastore/image", headers=evil)
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    assert requests.get(f"{server.url}/info/", headers={"Origin": "http://evil.example"}).status_code == 403
    assert requests.get(f"{server.url}/info/", headers={"Origin": "null"}).status_code == 403
    own = f"http://localhost:{port}"
    ok = requests.get(f"{server.url}/info/", headers={"Origin": own})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] in (own, "*")
    rebinding = requests.get(f"{server.url}/info/", headers={"Host": f"evil.example:{port}"})
    assert rebinding.status_code == 403


def test_info_answers_while_grounding_runs(server):
    """A burst of grounding requests (each slice costs the slow backend 0.05 s) while /info/ is polled."""
    done = threading.Event()
    statuses: list[int] = []

    def burst() -> None:
        for _ in range(3):
            statuses.append(infer(server).status_code)
        done.set()

    worker = threading.Thread(target=burst)
    worker.start()
    latencies = []
    while not done.is_set():
        started = time.perf_counter()
        assert requests.get(f"{server.url}/info/", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.05)
    worker.join()
    assert statuses == [200, 200, 200] and len(latencies) >= 5
    p95 = statistics.quantiles(latencies, n=20)[-1]
    print(f"/info/ during grounding: n={len(latencies)} p95={p95 * 1000:.0f} ms max={max(latencies) * 1000:.0f} ms")
    assert p95 < 1.0


def test_busy_model_answers_429_beyond_the_queue(layout, tmp_path_factory):
    studies, outside = layout
    server = _start(
        studies, outside, tmp_path_factory.mktemp("queue") / "tmp", {"max_queued_requests": "1", "backend.delay": "0.3"}
    )
    try:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(infer(server).status_code)) for _ in range(3)]
        for thread in threads:
            thread.start()
            time.sleep(0.1)
        for thread in threads:
            thread.join()
        assert sorted(results) == [200, 429, 429]
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def timeout_server(layout, tmp_path_factory) -> Iterator[Server]:
    """A server with short time limits: 2 s per infer request, 3 s for a request body to arrive."""
    studies, outside = layout
    conf = {"infer_timeout_s": "2", "backend.delay": "0.4", "batch_size": "1", "max_queued_requests": "1"}
    conf["upload_timeout_s"] = "3"
    started = _start(studies, outside, tmp_path_factory.mktemp("timeout") / "tmp", conf)
    yield started
    _stop(started)


def test_inference_past_infer_timeout_s_gets_504_and_frees_the_model(timeout_server):
    """One slice per generate call, 0.4 s each: a 40-slice grounding takes 16 s, past a 2 s limit. The client
    gets 504 at the limit; the worker stops at its next batch, so a one-slice request is served right after.
    This is the server's first infer request: ITK was loaded at start-up, so its import cannot delay the 504."""
    server = timeout_server
    assert "imaging warmed up" in (server.tmp.parent / f"{server.tmp.name}.log").read_text()
    started = time.monotonic()
    slow = infer(server)
    waited = time.monotonic() - started
    assert slow.status_code == 504 and "infer_timeout_s" in slow.json()["detail"], slow.text[:300]
    assert waited < 6, f"answered after {waited:.1f} s, not at the 2 s limit"
    assert requests.get(f"{server.url}/info/", timeout=5).status_code == 200
    statuses = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # 429 until the stopped worker lets go of the model (one batch)
        statuses.append(infer(server, {"output": "json", "slices": [20]}).status_code)
        if statuses[-1] != 429:
            break
        time.sleep(0.2)
    assert statuses[-1] == 200, statuses
    assert "stopped after 2 s" in (server.tmp.parent / f"{server.tmp.name}.log").read_text()
    print(f"timeout: 504 after {waited:.1f} s; then {statuses}")


def _slow_body(server: Server, method: str, path: str, declared: int, sent: bytes) -> tuple[bytes, float]:
    """Headers with a true Content-Length, ``sent`` of the body, then silence (a slow-loris upload): what the
    server answered and after how many seconds it closed the connection."""
    host, port = server.url.removeprefix("http://").split(":")
    boundary = "slowloris"
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {declared}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + sent)
        answer = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            answer += chunk
    return answer, time.monotonic() - started


def test_a_slow_loris_upload_gets_408_at_upload_timeout_s_and_leaves_nothing(timeout_server):
    server = timeout_server
    before = snapshot(server.studies, server.outside)
    part = b'--slowloris\r\nContent-Disposition: form-data; name="file"; filename="slow.nii.gz"\r\n\r\n' + b"x" * 100
    answers = []
    calls = [("PUT", "/datastore/image?image=slow"), ("PUT", f"/datastore/label?image={STUDY}&tag=final")]
    for method, path in [*calls, ("POST", "/infer/evlf_grounding")]:
        answer, waited = _slow_body(server, method, path, 10_000_000, part)
        status = answer.split(b" ", 2)[1] if answer else b""
        assert status == b"408" and b"upload_timeout_s" in answer, answer[:300]
        assert 2.5 < waited < 8, f"{path}: closed after {waited:.1f} s, the limit is 3 s"
        answers.append(round(waited, 1))
    assert requests.get(f"{server.url}/info/", timeout=5).status_code == 200
    assert snapshot(server.studies, server.outside) == before
    assert not list(server.tmp.glob("evlf-upload-*"))
    fast = put_image(server, nifti_bytes(np.zeros((12, 12, 6), np.int16)), "quick.nii.gz")
    assert fast.status_code == 200, fast.text  # a body that arrives in time is unaffected
    assert requests.delete(f"{server.url}/datastore/image", params={"id": "quick"}).status_code == 200
    print(f"slow-loris uploads: 408 and closed after {answers} s")


def test_token_auth_with_3d_slicers_client(layout, tmp_path_factory, slicer_client_class):
    studies, outside = layout
    root = tmp_path_factory.mktemp("auth")
    secret = root / "token"
    secret.write_text(SECRET + "\n")
    server = _start(studies, outside, root / "tmp", {"auth_token_file": str(secret)})
    try:
        assert requests.get(f"{server.url}/info/").status_code == 401
        assert requests.get(f"{server.url}/info/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        client = slicer_client_class(server.url, tmpdir=str(root))
        assert client.auth_enabled() is True
        with pytest.raises(Exception, match="401"):
            client.auth_token("radiologist", "guess")
        client.update_auth(client.auth_token("radiologist", SECRET))
        assert client.auth_valid_token() is True
        assert "evlf_grounding" in client.info()["models"]
        result_file, params = client.infer("evlf_grounding", STUDY, {})
        assert Path(result_file).is_file() and params["boxes"]
        static = requests.get(f"{server.url}/info/", headers={"Authorization": f"Bearer {SECRET}"})
        assert static.status_code == 200
    finally:
        _stop(server)


BAD_IDS = ["../x", "../../etc/passwd", "/etc/passwd", "%2e%2e%2fx", "a" * 300, " ", ".", "..", "x/y", "x\\y", "-x"]
# not a JSON object at all (refused everywhere), and objects asking for server-side keys (refused where params
# drive work; image / label info is free-form metadata, so it only gets the first list)
NOT_OBJECTS = ["{bad", "[1]", "1", '"s"', deep_json(5000).decode()]
SERVER_KEYS = ['{"bundle_path": "/tmp"}', '{"image": "/etc/passwd"}', '{"_upload": true}', '{"slices": "all"}']
BAD_TRAIN = [
    {"bundle_path": "/tmp"},
    {"steps": "many"},
    {"steps": 0},
    {"method": None},
    {"label_tag": "../x"},
    {"gate": []},
    {"model": "x"},
]


def sweep_requests(url: str) -> list[tuple[str, Callable[[], requests.Response]]]:
    """Endpoint x bad value: ids and tags that are paths or too long, params that are not JSON objects or ask
    for server-side keys, train / scoring / strategy bodies of the wrong shape."""
    calls: list[tuple[str, Callable[[], requests.Response]]] = []
    tiny = nifti_bytes(np.zeros((4, 4, 4), np.int16))
    for bad in BAD_IDS:
        calls += [
            (
                f"infer image={bad[:20]}",
                lambda b=bad: requests.post(f"{url}/infer/evlf_diagnosis", params={"image": b}),
            ),
            (
                f"put image={bad[:20]}",
                lambda b=bad: requests.put(
                    f"{url}/datastore/image", params={"image": b}, files={"file": ("t.nii.gz", tiny)}
                ),
            ),
            (f"get image={bad[:20]}", lambda b=bad: requests.get(f"{url}/datastore/image", params={"image": b})),
            (f"head image={bad[:20]}", lambda b=bad: requests.head(f"{url}/datastore/image", params={"image": b})),
            (f"delete image={bad[:20]}", lambda b=bad: requests.delete(f"{url}/datastore/image", params={"id": b})),
            (f"image info={bad[:20]}", lambda b=bad: requests.get(f"{url}/datastore/image/info", params={"image": b})),
            (
                f"put label image={bad[:20]}",
                lambda b=bad: requests.put(
                    f"{url}/datastore/label", params={"image": b, "tag": "final"}, files={"label": ("l.json", b"{}")}
                ),
            ),
            (
                f"put label tag={bad[:20]}",
                lambda b=bad: requests.put(
                    f"{url}/datastore/label", params={"image": STUDY, "tag": b}, files={"label": ("l.json", b"{}")}
                ),
            ),
            (
                f"get label tag={bad[:20]}",
                lambda b=bad: requests.get(f"{url}/datastore/label", params={"label": STUDY, "tag": b}),
            ),
            (
                f"delete label tag={bad[:20]}",
                lambda b=bad: requests.delete(f"{url}/datastore/label", params={"id": STUDY, "tag": b}),
            ),
            (
                f"label info tag={bad[:20]}",
                lambda b=bad: requests.put(
                    f"{url}/datastore/label/info", params={"label": STUDY, "tag": b}, data={"info": "{}"}
                ),
            ),
            (
                f"upload name={bad[:20]}",
                lambda b=bad: requests.put(f"{url}/datastore/image", files={"file": (f"{b}.nii.gz", tiny)}),
            ),
        ]
    json_body = {"content-type": "application/json"}
    for bad in NOT_OBJECTS + SERVER_KEYS:
        for model in ("evlf_grounding", "evlf_diagnosis", "evlf_vqa"):
            calls.append(
                (
                    f"infer {model} params={bad[:20]}",
                    lambda b=bad, m=model: requests.post(
                        f"{url}/infer/{m}", params={"image": STUDY}, data={"params": b}
                    ),
                )
            )
        for path in ("train/evlf_train", "scoring/evlf_disagreement", "activelearning/evlf_disagreement"):
            calls.append(
                (
                    f"{path} body={bad[:20]}",
                    lambda b=bad, p=path: requests.post(f"{url}/{p}", data=b, headers=json_body),
                )
            )
    for bad in NOT_OBJECTS:
        calls += [
            (
                f"put image params={bad[:20]}",
                lambda b=bad: requests.put(
                    f"{url}/datastore/image",
                    params={"image": "sweep"},
                    data={"params": b},
                    files={"file": ("t.nii.gz", tiny)},
                ),
            ),
            (
                f"put label params={bad[:20]}",
                lambda b=bad: requests.put(
                    f"{url}/datastore/label",
                    params={"image": STUDY},
                    data={"params": b},
                    files={"label": ("l.json", b"{}")},
                ),
            ),
            (
                f"image info={bad[:20]}",
                lambda b=bad: requests.put(f"{url}/datastore/image/info", params={"image": STUDY}, data={"info": b}),
            ),
        ]
    for body in BAD_TRAIN:
        calls.append((f"train {body}", lambda b=body: requests.post(f"{url}/train/evlf_train", json=b)))
        calls.append((f"train all {body}", lambda b=body: requests.post(f"{url}/train/", json={"evlf_train": b})))
    for name in ("nope", "a" * 300, "..%2f..%2fx"):
        for path in ("infer", "train", "scoring", "activelearning"):
            calls.append((f"{path}/{name[:20]}", lambda p=path, n=name: requests.post(f"{url}/{p}/{n}")))
    for path in ("model/evlf_grounding", "model/info/evlf_grounding", "session/x", "session/%2e%2e"):
        for method in ("get", "put", "delete"):
            calls.append((f"{method} {path}", lambda m=method, p=path: requests.request(m, f"{url}/{p}", data=b"x")))
    stow_type = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    for operation in ("qido", "wado", "stow", ""):
        for rest in ("studies", "studies/1.2.3", "%2e%2e/%2e%2e/system", "a" * 300):
            target = f"{url}/proxy/dicom/{operation}/{rest}".replace("dicom//", "dicom/")
            calls.append((f"proxy get {operation}/{rest[:20]}", lambda t=target: requests.get(t)))
            calls.append((f"proxy stow {operation}/{rest[:20]}", lambda t=target: requests.post(t, data=b"--b--")))
            calls.append(
                (f"proxy stow typed {operation}/{rest[:20]}", lambda t=target: requests.post(t, headers=stow_type))
            )
    return calls


def test_sweep_of_bad_requests_gets_no_5xx_and_writes_nothing(server):
    before = snapshot(server.studies, server.outside)
    temp_before = sorted(server.tmp.iterdir())
    statuses: dict[str, int] = {}
    for name, call in sweep_requests(server.url):
        statuses[name] = call().status_code
    server_errors = {name: status for name, status in statuses.items() if status >= 500}
    accepted = {name: status for name, status in statuses.items() if status < 400}
    print(f"sweep: {len(statuses)} requests, {len(server_errors)} 5xx, {len(accepted)} accepted")
    assert not server_errors and not accepted, (server_errors, sorted(accepted))
    assert snapshot(server.studies, server.outside) == before
    time.sleep(0.1)
    assert sorted(server.tmp.iterdir()) == temp_before


def test_no_client_request_ran_code(server):
    """Last in the module: the sitecustomize.py beside the studies (the issue's RCE payload) never ran, after every
    request above that named its folder as bundle_path, image or label tag."""
    ran = (server.outside / CODE_RAN).exists()
    print(f"code executed: {int(ran)}")
    assert not ran
