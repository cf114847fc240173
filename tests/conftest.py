"""Fixtures shared by every test area: free loopback ports and a real MONAI Label server process."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "evlf"
# the monailabel wheel installs the 3D Slicer plugin as data files under the environment prefix
SLICER_CLIENT = Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel" / "MONAILabelLib" / "client.py"


@pytest.fixture(scope="session")
def slicer_client_class() -> type:
    """``MONAILabelClient`` exactly as 3D Slicer's MONAI Label module ships and uses it."""
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", SLICER_CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MONAILabelClient


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _start_server(app_dir: Path, studies: Path, conf: dict[str, str], log_path: Path, timeout: float) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log_file = log_path.open("w")
    process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    server = ServerProcess(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-5000:]}")
        try:
            if requests.get(f"{server.url}/info/", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not answer /info/ within {timeout} s:\n{server.log()[-5000:]}")


def _stop_server(server: ServerProcess) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture
def monailabel_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start ``monailabel start_server`` with our app on 127.0.0.1 and a free port; stopped after the test."""
    started: list[ServerProcess] = []

    def start(studies: Path, conf: dict[str, str] | None = None, app_dir: Path = APP_DIR, timeout: float = 180):
        server = _start_server(app_dir, studies, conf or {}, tmp_path / f"server-{len(started)}.log", timeout)
        started.append(server)
        return server

    yield start
    for server in started:
        _stop_server(server)
