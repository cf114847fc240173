"""MONAI Label infer tasks: ``evlf_grounding`` (detection), ``evlf_diagnosis`` (classification), ``evlf_vqa``.

Each task overrides ``InferTask.__call__(request) -> (result file or None, result JSON)`` (MONAI Label's v2 task
interface): the work is :class:`monailabel_evlf.inference.VolumePipeline`; this module only turns a request into a
pipeline call and the answer into what the client loads. A grounding result is a 3D Slicer ROI markups JSON by
default: the Slicer MONAI Label module loads a ``.json`` result of a ``detection`` model as ROI nodes.

Bad requests raise ``fastapi.HTTPException`` with a 4xx status and a message: MONAI Label's endpoint lets it
through unchanged, whereas any other exception becomes an opaque 500.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from monailabel_evlf.app import outputs
from monailabel_evlf.app.config import OUTPUTS, AppConfig
from monailabel_evlf.app.security import scrub
from monailabel_evlf.errors import BackendUnavailable
from monailabel_evlf.imaging.volume import load_volume
from monailabel_evlf.inference import VolumeResult

if TYPE_CHECKING:
    from monailabel_evlf.app.serving import ServedModel

logger = logging.getLogger(__name__)


def bad_request(message: str, status: int = 422) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def load_request_volume(request: dict[str, Any]):
    """The request's image as a ``Volume``; unreadable, empty or non-3D input is the client's error (422)."""
    path = request.get("image")
    if not path or not os.path.exists(path):
        raise bad_request(f"image {request.get('image')!r} not found", status=404)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise bad_request("the uploaded image is empty")
    try:
        return load_volume(path)
    except ValueError as exc:
        raise bad_request(f"cannot use image: {scrub(str(exc))}") from exc
    except Exception as exc:  # readers (ITK, nibabel, pydicom) raise many types on corrupt files
        logger.info("unreadable image %s: %s", path, exc)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise bad_request(f"cannot read image ({type(exc).__name__}): {scrub(first)}") from exc


def _check_selection(request: dict[str, Any], limit: int) -> None:
    """The slice-selection params' types and sizes, checked before the volume is read: ``slices`` (a list of
    distinct indices, at most ``limit``) or ``around`` (the slice a reader is looking at) ± ``radius``."""
    value = request.get("slices")
    if value is not None:
        if not value or not isinstance(value, list) or not all(type(k) is int for k in value):
            raise bad_request(f"'slices' must be a non-empty list of integers, got {str(value)[:80]}")
        if len(value) > limit or len(set(value)) != len(value):
            raise bad_request(f"'slices' must hold at most {limit} distinct indices (--conf max_slices)")
        return
    around, radius = request.get("around"), request.get("radius", 2)
    if around is None:
        return
    if type(around) is not int or type(radius) is not int:
        raise bad_request(f"'around' and 'radius' must be integers, got {around!r}, {radius!r}")
    if not 0 <= radius <= limit // 2:
        raise bad_request(f"'radius' must lie in 0..{limit // 2}")


def _indices(request: dict[str, Any], pipeline, volume) -> list[int] | None:
    """Slices to examine instead of the configured selection (params checked by :func:`_check_selection`)."""
    if request.get("slices") is not None:
        return request["slices"]
    if request.get("around") is None:
        return None
    return pipeline.select(volume, around=request["around"], radius=request.get("radius", 2))[1]


def _text(request: dict[str, Any], key: str, limit: int) -> str | None:
    value = request.get(key)
    if value is not None and (not isinstance(value, str) or len(value) > limit):
        raise bad_request(f"'{key}' must be text of at most {limit} characters")
    return value


class EVLFInferTask(InferTask):
    """Common request handling; subclasses implement :meth:`run`."""

    task_type: InferType = InferType.OTHERS

    def __init__(self, served: ServedModel, config: AppConfig, labels: list[str], description: str) -> None:
        if served.note:
            description = f"{description} ({scrub(served.note)})"
        super().__init__(
            type=self.task_type,
            labels=labels,
            dimension=3,
            description=description,
            config={},
        )
        self.served = served
        self.app_config = config

    def is_valid(self) -> bool:
        return True

    def check(self, request: dict[str, Any]) -> dict[str, Any]:
        """The task's params, checked before any work (reading the volume included); returns them parsed."""
        _check_selection(request, self.app_config.max_slices)
        return {}

    def run(
        self, volume, request: dict[str, Any], params: dict[str, Any]
    ) -> tuple[VolumeResult, str | None, dict[str, Any]]:
        """The pipeline result, the result file (or None) and extra result-JSON fields."""
        raise NotImplementedError

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        started = time.perf_counter()
        params = self.check(request)
        volume = load_request_volume(request)
        try:
            result, result_file, extra = self.run(volume, request, params)
        except ValueError as exc:
            raise bad_request(scrub(str(exc))) from exc
        except BackendUnavailable as exc:  # a remote model server down or refusing: not the request's fault
            raise bad_request(scrub(str(exc)), status=503) from exc
        body = result.to_json()
        body["model"] = self.served.info()
        body["image"] = {"shape": list(volume.array.shape), "affine_lps": volume.affine.round(6).tolist()}
        body["latency_s"]["request"] = round(time.perf_counter() - started, 4)
        body.update(extra)
        return result_file, body


class GroundingTask(EVLFInferTask):
    """Boxes with reasoning -> Slicer ROI markups (default), label map, DICOM SR / SEG or JSON only."""

    task_type = InferType.DETECTION

    def __init__(self, served: ServedModel, config: AppConfig, datastore=None) -> None:
        super().__init__(
            served,
            config,
            list(config.targets),
            "EVLF grounding: 3D boxes of findings (3D Slicer ROI markups) with the model's reasoning",
        )
        self.datastore = datastore
        self._config.update(output=list(OUTPUTS), target="")

    def check(self, request):
        output = request.get("output", self.app_config.output)
        if output not in OUTPUTS:
            raise bad_request(f"'output' must be one of {', '.join(OUTPUTS)}; got {output!r}")
        return {**super().check(request), "output": output, "target": _text(request, "target", 200) or None}

    def run(self, volume, request, params):
        output, target = params["output"], params["target"]
        with self.served.session() as pipeline:
            result = pipeline.ground(volume, target, indices=_indices(request, pipeline, volume))
        version = self.served.adapter_version or "base"
        result_file, extra = outputs.write_output(output, result, volume, self.datastore, version)
        return result, result_file, {"output": output, **extra}


class DiagnosisTask(EVLFInferTask):
    """Study labels with per-label scores and the model's reasoning, all in the result JSON."""

    task_type = InferType.CLASSIFICATION

    def __init__(self, served: ServedModel, config: AppConfig) -> None:
        super().__init__(
            served, config, list(config.vocabulary), "EVLF diagnosis: labels, scores and the model's reasoning"
        )

    def run(self, volume, request, params):
        with self.served.session() as pipeline:
            return pipeline.diagnose(volume, indices=_indices(request, pipeline, volume)), None, {}


VQA_SCOPES = ("study", "slices")


class VQATask(EVLFInferTask):
    """``question`` (and optional ``options`` for a closed question) -> answer + reasoning. ``scope``: ``study``
    (default; presence, counts and sizes from the study's 3D findings, see ``VolumePipeline.answer_study``) or
    ``slices`` (the most common answer over the examined slices)."""

    task_type = InferType.OTHERS

    def __init__(self, served: ServedModel, config: AppConfig) -> None:
        super().__init__(served, config, [], "EVLF visual question answering with reasoning (param: question)")
        self._config["question"] = ""
        self._config["scope"] = VQA_SCOPES

    def check(self, request):
        limits = self.app_config.limits
        question = _text(request, "question", limits.max_text_chars)
        if not question or not question.strip():
            raise bad_request("VQA needs a non-empty 'question' param")
        options = request.get("options")
        if options is not None and (
            not isinstance(options, list)
            or not 1 <= len(options) <= limits.max_options
            or not all(isinstance(o, str) and 0 < len(o) <= 200 for o in options)
        ):
            raise bad_request(f"'options' must be a list of 1..{limits.max_options} strings of 1..200 characters")
        scope = request.get("scope", VQA_SCOPES[0])
        if scope not in VQA_SCOPES:
            raise bad_request(f"'scope' must be one of {', '.join(VQA_SCOPES)}")
        if scope == "study" and any(request.get(key) is not None for key in ("slices", "around")):
            raise bad_request("'slices' / 'around' pick slices for scope 'slices'; a study question sees the study")
        return {**super().check(request), "question": question, "options": options, "scope": scope}

    def run(self, volume, request, params):
        question, options, scope = params["question"], params["options"], params["scope"]
        with self.served.session() as pipeline:
            if scope == "study":
                result = pipeline.answer_study(volume, question, options)
            else:
                result = pipeline.answer(volume, question, options, indices=_indices(request, pipeline, volume))
            return result, None, {"question": question, "scope": scope}
