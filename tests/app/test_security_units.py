"""The validators and the guard without a server: ids, JSON, volume headers (NRRD and NIfTI), STOW-RS bodies,
auth and origin decisions, the inference deadline, and kill -9 during atomic writes (label files and the
datastore index)."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from types import SimpleNamespace

import jwt
import nibabel as nib
import numpy as np
import pydicom
import pytest
from fastapi import HTTPException
from pydicom.uid import generate_uid

from monailabel_evlf.app.config import ConfigError, parse_app_config
from monailabel_evlf.app.datastore import CheckedLocalDatastore
from monailabel_evlf.app.security import (
    MAX_STOW_INSTANCES,
    Limits,
    check_id,
    check_tag,
    check_uid,
    check_volume_file,
    contained,
    parse_bool,
    parse_json_object,
    read_stow_body,
    remove_stale_uploads,
    scrub,
    stow_boundary,
    upload_dir,
)
from monailabel_evlf.app.server import (
    _DEADLINE,
    Guard,
    InferRunner,
    InferTimeout,
    TokenAuth,
    _deadline_checked,
    _proxy_path,
)
from monailabel_evlf.app.train import EVLFTrainTask
from monailabel_evlf.data.phantoms import write_sample_dataset
from monailabel_evlf.training import finetune

LIMITS = Limits(max_voxels=100_000)


def status_of(call, *args) -> int:
    with pytest.raises(HTTPException) as caught:
        call(*args)
    return caught.value.status_code


@pytest.mark.parametrize(
    "bad", ["../x", "/etc/passwd", "a/b", "..", ".hidden", "-x", "", "a" * 129, "x\x00y", "x y", 7, None]
)
def test_ids_that_are_paths_or_odd_are_refused(bad):
    assert status_of(check_id, bad) == 422


def test_ordinary_ids_and_tags_pass():
    assert check_id("phantom_s7_000") == "phantom_s7_000"
    assert check_id("1.2.840.113619.2.55") == "1.2.840.113619.2.55"  # DICOM UIDs
    assert check_tag("final") == "final"
    assert status_of(check_tag, "a.b") == 422


def test_contained_follows_symlinks(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    assert contained(root, root / "a.nii.gz") == (root / "a.nii.gz").resolve()
    assert status_of(contained, root, root / "link" / "x") == 422


def test_json_objects_only_bounded_depth():
    assert parse_json_object('{"a": [1, {"b": 2}]}', "params", LIMITS) == {"a": [1, {"b": 2}]}
    assert parse_json_object("", "params", LIMITS) == {}
    for text in ("[1]", "null", "{", "[" * 100_000 + "]" * 100_000, '{"a":' * 40 + "1" + "}" * 40):
        assert status_of(parse_json_object, text, "params", LIMITS) == 422
    assert status_of(parse_json_object, "{}" + " " * (LIMITS.max_json_bytes + 1), "params", LIMITS) == 413


def test_boolean_params_are_422_naming_the_param():
    assert parse_bool("off", "gate") is False and parse_bool(True, "gate") is True
    with pytest.raises(HTTPException) as caught:
        parse_bool("sometimes", "gate")
    assert caught.value.status_code == 422 and "'gate' must be a boolean" in caught.value.detail
    assert "true/false" in caught.value.detail


def test_scrub_removes_server_paths():
    text = scrub(f"cannot read {sys.prefix}/lib/x.py and /tmp/evlf-upload-1/upload.nii.gz at http://h/a/b")
    assert sys.prefix not in text and "/tmp/" not in text and "http://h/a/b" in text


def nrrd(fields: str, data: bytes) -> bytes:
    return f"NRRD0004\n{fields}\n\n".encode() + data


@pytest.mark.parametrize(
    ("name", "content", "status", "says"),
    [
        ("ok.nrrd", nrrd("type: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw", b"\0" * 128), None, ""),
        (
            "gz.nrrd",
            nrrd("type: uchar\ndimension: 3\nsizes: 8 8 8\nencoding: gzip", gzip.compress(b"\1" * 512)),
            None,
            "",
        ),
        ("detached.nrrd", nrrd("type: short\nsizes: 4 4 4\ndata file: /etc/passwd", b""), 422, "data file"),
        ("lower.nrrd", nrrd("type: short\nsizes: 4 4 4\ndatafile: x.raw", b""), 422, "data file"),
        ("bomb.nrrd", nrrd("type: uchar\nsizes: 8 8 8\nencoding: gzip", gzip.compress(b"\0" * (8 << 20))), 422, "bomb"),
        ("short.nrrd", nrrd("type: short\nsizes: 4 4 4\nencoding: raw", b"\0" * 100), 422, "truncated"),
        ("huge.nrrd", nrrd("type: short\nsizes: 1000 1000 1000\nencoding: raw", b""), 413, "voxels"),
        ("flat.nrrd", nrrd("type: short\nsizes: 4 4\nencoding: raw", b"\0" * 32), 422, "3D"),
        ("bz.nrrd", nrrd("type: short\nsizes: 4 4 4\nencoding: bzip2", b"x"), 415, "encoding"),
        ("nomagic.nrrd", b"hello\n\n", 422, "NRRD"),
        ("script.py", b"print(1)", 415, "unsupported"),
        ("volume.mha", b"ObjectType = Image\n", 415, "unsupported"),
    ],
)
def test_volume_headers_are_checked_before_reading(tmp_path, name, content, status, says):
    path = tmp_path / name
    path.write_bytes(content)
    if status is None:
        check_volume_file(path, LIMITS)
        return
    with pytest.raises(HTTPException) as caught:
        check_volume_file(path, LIMITS)
    assert caught.value.status_code == status and says in caught.value.detail


def test_nifti_honest_header_passes_and_lies_do_not(tmp_path):
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.int16), np.eye(4)), good)
    check_volume_file(good, LIMITS)
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "bomb.nii.gz").write_bytes(gzip.compress(raw + b"\0" * (4 << 20)))
    assert status_of(check_volume_file, tmp_path / "bomb.nii.gz", LIMITS) == 422
    (tmp_path / "cut.nii").write_bytes(raw[:-10])
    assert status_of(check_volume_file, tmp_path / "cut.nii", LIMITS) == 422
    big = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((50, 50, 50), np.uint8), np.eye(4)), big)
    assert status_of(check_volume_file, big, LIMITS) == 413


# -- the guard's decisions -----------------------------------------------------------------------------------------


def scope(path="/info/", method="GET", client="127.0.0.1", headers=(), server=("127.0.0.1", 8000)) -> dict:
    given = dict(headers)
    given.setdefault("host", f"{server[0]}:{server[1]}")
    raw = [(k.lower().encode(), v.encode()) for k, v in given.items()]
    return {"type": "http", "method": method, "path": path, "client": (client, 5555), "server": server, "headers": raw}


def guard(**conf) -> Guard:
    config = parse_app_config(conf)
    auth = TokenAuth("s" * 20) if conf.get("auth_token_file") else None
    return Guard(None, config, auth)


def test_guard_serves_loopback_and_refuses_remote_clients_without_auth():
    assert guard().check(scope()) is None
    assert guard().check(scope(client="192.168.1.20"))[0] == 403
    assert guard(auth_token_file="x").check(scope(client="192.168.1.20"))[0] == 401


def test_guard_origin_and_host():
    plain = guard()
    assert plain.check(scope(headers=[("origin", "http://localhost:8000")])) is None
    assert plain.check(scope(headers=[("origin", "http://localhost:9999")]))[0] == 403
    assert plain.check(scope(headers=[("origin", "https://evil.example")]))[0] == 403
    assert plain.check(scope(headers=[("host", "evil.example:8000")]))[0] == 403
    configured = guard(cors_origins="https://ohif.hospital.example")
    assert configured.check(scope(headers=[("origin", "https://ohif.hospital.example")])) is None


def test_guard_logs_blocked_unless_enabled_and_body_caps():
    assert guard().check(scope("/logs/"))[0] == 404
    assert guard(logs_endpoint="true").check(scope("/logs/")) is None
    big = scope("/datastore/image", "PUT", headers=[("content-length", str(5 << 30))])
    assert guard().check(big)[0] == 413
    chunked = scope("/datastore/image", "PUT", headers=[("transfer-encoding", "chunked")])
    assert guard().check(chunked)[0] == 411


def test_ohif_files_load_without_the_token_and_dicomweb_does_not():
    auth = guard(auth_token_file="x")
    for path in ("/ohif", "/ohif/", "/ohif/viewer", "/ohif/app-config.js", "/ohif/assets/x.svg"):
        assert auth.check(scope(path)) is None, path
        assert auth.check(scope(path, "HEAD")) is None, path
    assert auth.check(scope("/ohif/app-config.js", "POST"))[0] == 401
    assert auth.check(scope("/ohifx/"))[0] == 401
    for path in ("/proxy/dicom/qido/studies", "/proxy/dicom/wado/studies/1.2/series", "/info/", "/datastore/"):
        assert auth.check(scope(path))[0] == 401, path
        good = [("authorization", "Bearer " + "s" * 20)]
        assert auth.check(scope(path, headers=good)) is None, path
    assert auth.check(scope("/ohif/", client="192.168.1.20")) is None  # the files only, as on loopback


def _asgi(guard_: Guard, messages: list[dict], path: str = "/datastore/image") -> tuple[list[dict], list[dict]]:
    """Run one PUT through the guard: ``messages`` are what the client sends (then it goes quiet); the messages
    the guard sends back, and what the inner app received."""
    received: list[dict] = []
    sent: list[dict] = []
    queue = list(messages)

    async def client_receive() -> dict:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # a slow-loris client: the rest of the body never comes
        return {"type": "http.disconnect"}

    async def inner(scope_, receive, send) -> None:
        while True:
            message = await receive()
            received.append(message)
            if message["type"] == "http.disconnect":
                await send({"type": "http.response.start", "status": 400, "headers": []})
                await send({"type": "http.response.body", "body": b'{"detail": "body"}'})
                return
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: dict) -> None:
        sent.append(message)

    guard_.inner = inner
    headers = [("content-length", "100")]
    asyncio.run(guard_(scope(path, "PUT", headers=headers), client_receive, send))
    return sent, received


def test_a_request_body_slower_than_upload_timeout_s_gets_408_and_frees_the_worker():
    slow = guard()
    slow.upload_timeout_s = 0.3
    started = time.monotonic()
    sent, received = _asgi(slow, [{"type": "http.request", "body": b"x" * 10, "more_body": True}])
    assert time.monotonic() - started < 2
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert b"upload_timeout_s" in sent[1]["body"]
    assert received[-1]["type"] == "http.disconnect"
    # a body that arrives in time is passed through untouched
    sent, received = _asgi(slow, [{"type": "http.request", "body": b"x" * 10, "more_body": True},
                                  {"type": "http.request", "body": b"y" * 90, "more_body": False}])  # fmt: skip
    assert sent[0]["status"] == 200 and len(received) == 2


def test_upload_timeout_s_is_an_app_option_the_guard_reads_and_is_checked():
    assert parse_app_config({"model": "tiny", "upload_timeout_s": "30"}).upload_timeout_s == 30
    assert parse_app_config({}).upload_timeout_s == Limits.upload_timeout_s == 300
    assert guard(upload_timeout_s="30").upload_timeout_s == 30 and guard().upload_timeout_s == 300
    for bad in ("0", "-1", "soon", "1.5"):
        with pytest.raises(ConfigError, match="upload_timeout_s"):
            parse_app_config({"upload_timeout_s": bad})


def test_upload_folders_of_dead_servers_are_removed_at_start_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with upload_dir() as mine:
        assert mine.name.startswith(f"evlf-upload-{os.getpid()}-")
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        stale = tmp_path / f"evlf-upload-{int(dead.stdout)}-abc"
        (stale / "sub").mkdir(parents=True)
        (stale / "sub" / "upload.nii.gz").write_bytes(b"half")
        other = tmp_path / "evlf-upload-notapid-x"  # not ours to judge
        other.mkdir()
        assert remove_stale_uploads(tmp_path) == 1
        assert not stale.exists() and mine.is_dir() and other.is_dir()
    assert not mine.exists()


def test_token_auth_issues_verifies_and_expires():
    auth = TokenAuth("s" * 20)
    assert auth.issue("reader", "wrong") is None
    token = auth.issue("reader", "s" * 20)
    assert auth.user(f"Bearer {token}") == "reader"
    assert auth.user(f"Bearer {'s' * 20}") == "token"
    assert auth.user(f"Basic {token}") is None and auth.user(None) is None
    expired = jwt.encode({"sub": "reader", "exp": int(time.time()) - 10}, "s" * 20, algorithm="HS256")
    assert auth.user(f"Bearer {expired}") is None
    forged = jwt.encode({"sub": "admin", "exp": int(time.time()) + 60}, "other-secret-xxxxxxxx", algorithm="HS256")
    assert auth.user(f"Bearer {forged}") is None
    with pytest.raises(ValueError):
        TokenAuth("short")
    open_path = guard(auth_token_file="x")
    assert open_path.check(scope("/auth/")) is None and open_path.check(scope("/auth/token", "POST")) is None
    assert open_path.check(scope(headers=[("authorization", f"Bearer {token}")])) is None
    assert open_path.check(scope())[0] == 401


# -- kill -9 during writes -----------------------------------------------------------------------------------------

# the datastore writes its index and labels through write_atomic; the child imports only that (monai takes ~5 s)
WRITER = """
import itertools, json, sys
from monailabel_evlf.atomic import write_atomic
label, index = sys.argv[1], sys.argv[2]
base = json.loads(open(index).read())
print("ready", flush=True)
for n in itertools.count():
    write_atomic(label, bytes([n % 2 + 65]) * (4 << 20))
    write_atomic(index, json.dumps({**base, "pad": "x" * (n % 7) * 200000}).encode())
"""


def test_kill_minus_9_mid_write_leaves_whole_files_and_a_loadable_index(tmp_path):
    studies = tmp_path / "studies"
    write_sample_dataset(studies, n=1, seed=1, shape=(16, 16, 8))
    CheckedLocalDatastore(str(studies), extensions=("*.nii.gz",))
    label, index = studies / "labels" / "final" / "phantom_s1_000.json", studies / "datastore_v2.json"
    for attempt in range(4):
        process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(label), str(index)], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.17 * attempt)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert label.read_bytes() in (b"A" * (4 << 20), b"B" * (4 << 20)), f"torn label after kill {attempt}"
        json.loads(index.read_text())
    datastore = CheckedLocalDatastore(str(studies), extensions=("*.nii.gz",))
    assert datastore.list_images() == ["phantom_s1_000"]
    assert not list(studies.glob(".*.tmp")) and not list(studies.glob("labels/*/.*.tmp"))


def test_a_torn_index_is_set_aside_and_rebuilt_from_the_files(tmp_path):
    studies = tmp_path / "studies"
    write_sample_dataset(studies, n=2, seed=1, shape=(16, 16, 8))
    CheckedLocalDatastore(str(studies), extensions=("*.nii.gz",))
    index = studies / "datastore_v2.json"
    index.write_text(index.read_text()[:50])  # what an in-place write killed half-way leaves
    datastore = CheckedLocalDatastore(str(studies), extensions=("*.nii.gz",))
    assert sorted(datastore.list_images()) == ["phantom_s1_000", "phantom_s1_001"]
    assert list(studies.glob("datastore_v2.json.torn-*"))
    json.loads(index.read_text())


# -- STOW-RS bodies ------------------------------------------------------------------------------------------------

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
BOUNDARY = "evlf-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


def dicom_bytes(sop_class: str = COMPREHENSIVE_SR, modality: str = "SR", study: str = STUDY_UID, **values) -> bytes:
    dataset = pydicom.Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID, dataset.Modality = sop_class, generate_uid(), modality
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, generate_uid()
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = sop_class
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, write_like_original=False)
    return buffer.getvalue()


def multipart(*parts: bytes, part_type: str = "application/dicom") -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "application/json",
        "multipart/form-data; boundary=x",
        'multipart/related; type="application/dicom+json"; boundary=x',
        'multipart/related; type="application/dicom"',
        'multipart/related; type="application/dicom"; boundary="a;b"',
        "",
    ],
)
def test_stow_media_types_other_than_multipart_related_dicom_get_415(content_type):
    assert status_of(stow_boundary, content_type) == 415


def test_stow_boundary_of_the_clients_that_send_corrections():
    assert stow_boundary(STOW_TYPE) == BOUNDARY
    # dicomweb-client (Python), and dcmjs / OHIF (no type parameter in some versions)
    assert stow_boundary('multipart/related; type="application/dicom"; boundary="0f3cf5c0-70e0"') == "0f3cf5c0-70e0"
    assert stow_boundary("multipart/related; boundary=abc") == "abc"


def test_stow_body_yields_the_sr_and_seg_it_holds():
    sr, seg = dicom_bytes(), dicom_bytes("1.2.840.10008.5.1.4.1.1.66.4", "SEG")
    datasets = read_stow_body(multipart(sr, seg), BOUNDARY, STUDY_UID)
    assert [d.Modality for d in datasets] == ["SR", "SEG"]
    assert [d.SOPInstanceUID for d in datasets] == [pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID for b in (sr, seg)]


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (multipart(dicom_bytes(), part_type="text/plain"), 415, "application/dicom"),
        (multipart(dicom_bytes(), part_type="application/dicom+json"), 415, "application/dicom"),
        (multipart(b"not dicom at all" * 20), 422, "pydicom"),
        (multipart(dicom_bytes()[:-7]), 422, "pydicom"),
        (multipart(dicom_bytes()[128:]), 422, "pydicom"),  # no preamble / DICM prefix
        (multipart(dicom_bytes(CT_IMAGE, "CT")), 422, "CT Image Storage"),
        (multipart(dicom_bytes("1.2.840.10008.5.1.4.1.1.104.1", "DOC")), 422, "only DICOM SR"),  # encapsulated PDF
        (multipart(dicom_bytes(modality="SEG")), 422, "Modality SR"),
        (multipart(dicom_bytes(study="1.2.3.4")), 422, "not to"),
        (multipart(dicom_bytes(study="../../x")), 422, "StudyInstanceUID"),
        (multipart(dicom_bytes(), dicom_bytes(CT_IMAGE, "CT")), 422, "part 2"),
        (multipart(*[dicom_bytes()] * (MAX_STOW_INSTANCES + 1)), 413, "limit"),
        (multipart(), 422, "malformed"),
        (b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + dicom_bytes(), 422, "malformed"),
        (b"garbage without any boundary", 422, "malformed"),
        (f"--{BOUNDARY}\r\nno header block\r\n--{BOUNDARY}--".encode(), 422, "malformed"),
    ],
)
def test_stow_bodies_that_are_not_sr_or_seg_objects_are_refused(body, status, says):
    with pytest.raises(HTTPException) as caught:
        read_stow_body(body, BOUNDARY, STUDY_UID)
    assert caught.value.status_code == status and says in caught.value.detail, caught.value.detail


@pytest.mark.parametrize("bad", ["", "1.2.x", "../1", "1" * 65, "1..2", None])
def test_uids_are_digits_and_dots(bad):
    assert status_of(check_uid, bad, "uid") == 422
    assert check_uid("1.2.840.10008.5.1.4.1.1.88.22", "uid") == "1.2.840.10008.5.1.4.1.1.88.22"


def test_proxy_paths_keep_to_dicomweb():
    assert _proxy_path("wado/studies/1.2/series/3.4/metadata") == ("wado", "studies/1.2/series/3.4/metadata")
    assert _proxy_path("studies") == ("", "studies")
    for bad in ("wado/../../tools/execute-script", "qido/studies/..", "./studies", "wado/a\\..\\b"):
        assert status_of(_proxy_path, bad) == 422


# -- the inference deadline ----------------------------------------------------------------------------------------


class SlowModel:
    """An app whose inference calls a deadline-checked ``generate`` 50 times, 0.05 s each (2.5 s in all)."""

    def __init__(self) -> None:
        self.generate = _deadline_checked(lambda: time.sleep(0.05))
        self.batches = 0
        self.stopped = threading.Event()

    def infer(self, request):
        try:
            for _ in range(50):
                self.generate()
                self.batches += 1
            return {"file": None, "params": {"batches": self.batches}}
        finally:
            self.stopped.set()


def test_a_request_over_its_deadline_gets_504_and_the_worker_stops_at_the_next_batch():
    app = SlowModel()
    runner = InferRunner(app, timeout_s=1, workers=1)
    released = threading.Event()
    cleanup = ExitStack()
    cleanup.callback(released.set)
    started = time.monotonic()
    with pytest.raises(HTTPException) as caught:
        runner.run({"model": "evlf_grounding"}, cleanup)
    waited = time.monotonic() - started
    assert caught.value.status_code == 504 and "infer_timeout_s" in caught.value.detail
    assert 0.9 < waited < 2.0, waited  # answered at the deadline (1 s), not when the model is done (2.5 s)
    assert app.stopped.wait(1.0) and released.wait(1.0), "the worker kept the model / its queue slot"
    assert app.batches < 30, app.batches  # stopped after ~1 s of 0.05 s batches, not after all 50


def test_requests_within_the_deadline_get_their_result_and_generate_outside_one_is_unchecked():
    app = SlowModel()
    assert InferRunner(app, timeout_s=10, workers=1).run({"model": "m"}, ExitStack()) == {
        "file": None,
        "params": {"batches": 50},
    }
    _deadline_checked(lambda: None)()  # no request context (training, scoring): never raises
    token = _DEADLINE.set(time.monotonic() - 1)
    try:
        with pytest.raises(InferTimeout):
            _deadline_checked(lambda: None)()
    finally:
        _DEADLINE.reset(token)


# -- the train task's request: one boolean parser, the configured max_new_tokens for the held-out gate --------------


@pytest.mark.parametrize(("gate", "tolerance"), [("off", float("inf")), ("true", 0.0), (False, float("inf"))])
def test_train_task_gates_with_the_configured_max_new_tokens_and_reads_gate_words(monkeypatch, gate, tolerance):
    calls = []

    def fake_finetune(backend, train, held, registry, stages, **kwargs):
        calls.append(kwargs)
        version = SimpleNamespace(name="v0001", meta={"parent": None})
        return SimpleNamespace(version=version, promoted=True, metrics={}, baseline_metrics={})

    monkeypatch.setattr(finetune, "finetune_adapter", fake_finetune)
    config = parse_app_config({"max_new_tokens": "40"})
    served = SimpleNamespace(backend=SimpleNamespace(cannot_train=None, has_proposals=False), registry=None)
    task = EVLFTrainTask(served, config)
    monkeypatch.setattr(task, "collect_samples", lambda datastore, tag: [SimpleNamespace(task="grounding")] * 8)
    task({"model": "evlf_train", "gate": gate, "steps": 1}, datastore=None)
    assert calls[0]["max_new_tokens"] == 40 and calls[0]["tolerance"] == tolerance
    with pytest.raises(HTTPException) as caught:
        task({"model": "evlf_train", "gate": "maybe"}, datastore=None)
    assert caught.value.status_code == 422 and "'gate' must be a boolean" in caught.value.detail
