"""Train from a saved correction while the server keeps answering; later results name the new adapter."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from monailabel_evlf.annotations.slicer_markups import write_roi_markups
from monailabel_evlf.app.bench import running_server
from monailabel_evlf.data.phantoms import write_sample_dataset
from monailabel_evlf.imaging.geometry import WorldBox

# ~2 min on 2 shared cores: the child process re-creates the app and model before it trains
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    write_sample_dataset(root, n=1, seed=7, shape=(64, 64, 24))
    return root


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory) -> str:
    adapters = tmp_path_factory.mktemp("adapters")
    conf = {"model": "tiny", "image_size": "64", "max_slices": "6", "max_new_tokens": "24", "adapters": str(adapters)}
    with running_server(studies, conf, timeout=240) as url:
        yield url


def _infer(server: str, study: str) -> dict:
    response = requests.post(
        f"{server}/infer/evlf_grounding", params={"image": study}, data={"params": json.dumps({"output": "json"})}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_train_from_saved_markups_gives_a_new_adapter_version(server, studies, tmp_path):
    study = "phantom_s7_000"
    truth = json.loads((studies / "ground_truth" / f"{study}.json").read_text())
    assert _infer(server, study)["model"]["adapter_version"] is None

    markups = tmp_path / "correction.json"
    boxes = [WorldBox.from_dict({**les["world_box"], "label": les["label"]}) for les in truth["lesions"]]
    write_roi_markups(boxes, markups)
    with markups.open("rb") as handle:
        saved = requests.put(
            f"{server}/datastore/label", params={"image": study, "tag": "final"}, files={"label": handle}
        )
    assert saved.status_code == 200, saved.text

    started = requests.post(f"{server}/train/evlf_train", json={"method": "sft", "steps": 1, "gate": False})
    assert started.status_code == 200, started.text
    served_while_training = 0
    deadline = time.monotonic() + 300
    while True:
        status = requests.get(f"{server}/train/", params={"check_if_running": False}).json()
        if status.get("status") in ("DONE", "ERROR"):
            break
        assert time.monotonic() < deadline, status
        _infer(server, study)  # the server keeps answering while the child process trains
        served_while_training += 1
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    assert any("evlf_train" in line for line in status.get("details", []))

    result = _infer(server, study)
    assert result["model"]["adapter_version"] == "v0001"
    assert served_while_training >= 1
