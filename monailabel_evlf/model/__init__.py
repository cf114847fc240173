"""Models behind the :class:`~monailabel_evlf.model.backend.VLMBackend` protocol: the native EVLF model (Hugging Face
config / modeling / processing trio), pretrained VLM backbones, offline tiny builders and presets."""

from __future__ import annotations

import logging
from typing import Any

from monailabel_evlf.model.backend import BACKENDS, VLMBackend, resolve_backend_class
from monailabel_evlf.model.presets import get_preset, model_location

logger = logging.getLogger(__name__)


def load_backend(backend: str, model: str, **kwargs: Any) -> VLMBackend:
    """A ready backend for ``model``: a preset name (configs/models/*.yaml), a local directory or a hub id.

    ``backend`` is a name in :data:`BACKENDS` or a ``"module:Class"`` import path; a preset's own backend and
    options take precedence over the defaults (explicit ``kwargs`` still win over preset options).
    """
    preset = get_preset(model)
    if preset is not None:
        if backend != preset.backend:
            logger.info("model preset %r uses backend %r (asked for %r)", model, preset.backend, backend)
        backend = preset.backend
        kwargs = {**preset.options, **kwargs}
        model = model_location(preset)
    cls = resolve_backend_class(backend)
    if not callable(getattr(cls, "from_pretrained", None)):
        raise ValueError(f"backend {backend!r}: {cls.__name__} has no classmethod from_pretrained")
    return cls.from_pretrained(model, **kwargs)


__all__ = ["BACKENDS", "VLMBackend", "load_backend"]
