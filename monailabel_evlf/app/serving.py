"""The one model instance the server's infer tasks share, and the adapter swap that training triggers.

Training runs in a separate process (MONAI Label starts ``train`` as a subprocess) and only writes a new adapter
version into the registry and moves its ``promoted`` pointer. Before every request the server compares the pointer
with the adapter it serves and swaps under the same lock that requests hold, so a request never sees half-loaded
weights, nothing restarts, and requests keep being served while training runs elsewhere.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from monailabel_evlf.app.config import AppConfig, resolve_model
from monailabel_evlf.app.security import scrub
from monailabel_evlf.inference import PipelineConfig, VolumePipeline
from monailabel_evlf.model import load_backend
from monailabel_evlf.model.backend import VLMBackend
from monailabel_evlf.training.adapters import AdapterRegistry

logger = logging.getLogger(__name__)


def registry_name(model: str) -> str:
    """A directory name for a model's adapters: the last path / hub-id component, made filesystem-safe."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name).strip(".-")
    return name or "model"


def public_name(name: str) -> str:
    """A local directory as its last component; hub ids, presets and ``module:Class`` names unchanged."""
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name


def pipeline_config(config: AppConfig) -> PipelineConfig:
    operating_point = {} if config.min_box_score is None else {"min_box_score": config.min_box_score}
    return PipelineConfig(
        modality=config.modality,
        labels=config.vocabulary,
        slice_axis=config.slice_axis,
        slice_stride=config.slice_stride,
        max_slices=config.max_slices,
        window=config.window,
        image_size=config.image_size,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        min_slices=config.min_slices,
        **operating_point,
    )


def load_configured_backend(config: AppConfig, model: str) -> VLMBackend:
    """``load_backend`` with the app's options; backend-specific ``backend.<key>`` options pass through."""
    if config.torch_threads:
        # a tiny model's ops last microseconds; with several threads on a busy CPU each op waits for a
        # descheduled thread (measured here: 0.03 ms -> 8 ms per 16x128 linear with 2 threads beside a co-tenant)
        torch.set_num_threads(config.torch_threads)
    return load_backend(
        config.backend,
        model,
        device=config.device,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        **config.extra,
    )


class ServedModel:
    """Backend + pipeline + adapter registry behind one lock."""

    def __init__(self, config: AppConfig, adapters_root: str | Path) -> None:
        self.config = config
        self.model, self.note = resolve_model(config)
        if self.note:
            logger.warning(self.note)
        self.backend = load_configured_backend(config, self.model)
        self.registry = AdapterRegistry(adapters_root, registry_name(self.model))
        removed = self.registry.remove_incomplete()  # folders a kill left mid-save; never promoted, never served
        if removed:
            logger.warning("removed %d incomplete adapter folder(s) left by an interrupted save", removed)
        self.pipeline = VolumePipeline(self.backend, pipeline_config(config))
        self.adapter_version: str | None = None
        self._lock = threading.Lock()
        self.refresh_adapter()

    def refresh_adapter(self) -> None:
        """Serve the registry's promoted adapter if it changed (call with the lock held, or before serving)."""
        promoted = self.registry.promoted()
        name = promoted.name if promoted else None
        if name == self.adapter_version:
            return
        verified = self.registry.load_promoted()  # checks file hashes; raises on a damaged version
        self.backend.load_adapter(verified.path if verified else None)
        logger.info("serving adapter %s (was %s)", name, self.adapter_version)
        self.adapter_version = name

    @contextmanager
    def session(self) -> Iterator[VolumePipeline]:
        """Exclusive use of the pipeline with the currently promoted adapter."""
        with self._lock:
            self.refresh_adapter()
            yield self.pipeline

    def info(self) -> dict[str, Any]:
        """What a result says about the model: names, never this machine's paths."""
        return {
            "id": public_name(self.backend.model_id),
            "backend": public_name(self.config.backend),
            "source": public_name(self.model),
            "adapter_version": self.adapter_version,
            **({"note": scrub(self.note)} if self.note else {}),
        }
