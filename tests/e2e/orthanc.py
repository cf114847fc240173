"""A private Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) for tests: loopback only, free port, temp storage."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MISSING = "Orthanc with the DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"


def available() -> bool:
    return bool(ORTHANC) and DICOMWEB_PLUGIN.is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_orthanc(root: Path, timeout: float = 60) -> Iterator[str]:
    """Orthanc with its storage, index, config and log under ``root``; yields its DICOMweb root URL."""
    port = _free_port()
    config = {
        "Name": "evlf-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # loopback clients only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log_path = root / "orthanc.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"Orthanc exited with {process.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    if requests.get(f"{url}/system", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start within {timeout} s")
                time.sleep(0.3)
            yield f"{url}/dicom-web"
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
