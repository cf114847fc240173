"""The whole loop as 3D Slicer drives it: infer -> save corrected boxes -> train -> infer with the new adapter.

Every step goes through the HTTP client 3D Slicer's MONAI Label module uses; the server keeps answering while
MONAI Label trains in its child process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from monailabel_evlf.annotations.slicer_markups import read_roi_markups, validate_markups, write_roi_markups
from monailabel_evlf.app.bench import running_server
from monailabel_evlf.data.phantoms import write_sample_dataset
from monailabel_evlf.imaging.geometry import WorldBox

# about a minute: MONAI Label trains in a child process that re-creates the app and model first
pytestmark = pytest.mark.integration

STUDY = "phantom_s7_000"


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


def test_slicer_loop_infer_correct_train_infer(server, studies, tmp_path, slicer_client_class):
    client = slicer_client_class(server, tmpdir=str(tmp_path))
    truth = json.loads((studies / "ground_truth" / f"{STUDY}.json").read_text())

    # 1. infer: what Slicer loads as ROI nodes (the random tiny model's boxes, if any, are valid markups)
    result_file, params = client.infer("evlf_grounding", STUDY, {})
    validate_markups(json.loads(Path(result_file).read_text()))
    assert params["model"]["adapter_version"] is None

    # 2. the radiologist corrects the boxes and presses "Save Label": all ROI nodes as one markups file
    corrected = [WorldBox.from_dict({**les["world_box"], "label": les["label"]}) for les in truth["lesions"]]
    markups = tmp_path / "correction.json"
    write_roi_markups(corrected, markups)
    client.save_label(STUDY, str(markups), tag="final")
    saved = studies / "labels" / "final"
    stored = read_roi_markups(next(saved.iterdir()))
    assert sorted(b.label for b in stored) == sorted(b.label for b in corrected)
    for box in corrected:
        assert any(np.allclose(box.center, s.center, atol=1e-3) for s in stored)

    # 3. train from the saved correction; the server answers inference meanwhile
    started = client.train_start("evlf_train", {"method": "grpo", "steps": 1, "gate": False})
    assert started
    served_while_training, deadline = 0, time.monotonic() + 300
    while (status := client.train_status())["status"] not in ("DONE", "ERROR"):
        assert time.monotonic() < deadline, status
        client.infer("evlf_grounding", STUDY, {})
        served_while_training += 1
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    assert served_while_training >= 1

    # 4. the next inference uses the new adapter without a restart
    _, params = client.infer("evlf_grounding", STUDY, {})
    assert params["model"]["adapter_version"] == "v0001"
