"""Infer params are checked before the volume is read: a bad request costs no I/O and never reaches the model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi import HTTPException

from monailabel_evlf.app import infer
from monailabel_evlf.app.config import AppConfig


@pytest.fixture()
def no_volume_reads(monkeypatch):
    def refuse_to_read(request):
        raise AssertionError(f"the volume was read for a request with bad params: {request}")

    monkeypatch.setattr(infer, "load_request_volume", refuse_to_read)


def _served():
    def session():
        raise AssertionError("the model was used for a request with bad params")

    return SimpleNamespace(note=None, session=session, adapter_version=None)


@pytest.mark.parametrize(
    ("task", "params", "message"),
    [
        ("grounding", {"output": "exe"}, "'output' must be one of"),
        ("grounding", {"target": "x" * 201}, "'target' must be text"),
        ("grounding", {"slices": [1, 1]}, "distinct indices"),
        ("grounding", {"slices": list(range(65))}, "at most 64"),
        ("diagnosis", {"around": "7"}, "must be integers"),
        ("diagnosis", {"around": 7, "radius": 33}, "'radius' must lie in 0..32"),
        ("vqa", {}, "non-empty 'question'"),
        ("vqa", {"question": "Any lesion?", "options": ["yes"] * 10_000}, "'options' must be a list"),
        ("vqa", {"question": "Any lesion?", "scope": "everything"}, "'scope' must be one of"),
        ("vqa", {"question": "Any lesion?", "slices": [3]}, "a study question sees the study"),
    ],
)
def test_bad_params_are_refused_before_the_volume_is_read(no_volume_reads, task, params, message):
    config = AppConfig()
    tasks = {
        "grounding": lambda: infer.GroundingTask(_served(), config),
        "diagnosis": lambda: infer.DiagnosisTask(_served(), config),
        "vqa": lambda: infer.VQATask(_served(), config),
    }
    with pytest.raises(HTTPException) as refused:
        tasks[task]()({"image": "/studies/any.nii.gz", **params})
    assert refused.value.status_code == 422 and message in refused.value.detail
