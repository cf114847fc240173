"""The README's main command underneath: a real MONAI Label server with the EVLF app answers /info/."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.integration


def test_server_starts_and_answers_info(monailabel_server, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    server = monailabel_server(studies)

    info = requests.get(f"{server.url}/info/", timeout=30)

    assert info.status_code == 200
    body = info.json()
    assert body["name"] == "EVLF"
    assert body["version"]
    assert server.process.poll() is None, "server died after answering"
