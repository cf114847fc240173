"""A bad ``--conf`` option stops the server at start-up with one line naming it, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "evlf"


@pytest.mark.parametrize(
    ("conf", "says"),
    [
        ({"batch_size": "0"}, "--conf batch_size: must be >= 1"),
        ({"backend": "no_such.module:Backend", "model": "/nowhere"}, "no_such.module"),
    ],
)
def test_bad_option_stops_start_up_with_its_name(tmp_path, conf, says):
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(tmp_path)]
    cmd += ["--host", "127.0.0.1", "--port", str(_free_port())]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=APP_DIR.parents[1])
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert says in output
    assert "Traceback" not in output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
