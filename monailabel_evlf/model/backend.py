"""The one protocol every model backend implements: what inference and GRPO need, nothing more.

Inference calls :meth:`VLMBackend.generate`; GRPO calls :meth:`VLMBackend.completion_logprobs` (with and
without the adapter) and trains :meth:`VLMBackend.trainable_parameters`; the app swaps adapters with
:meth:`VLMBackend.load_adapter`. Backends are looked up by name in :data:`BACKENDS` or by import path
(``"package.module:ClassName"``) so a user can bring their own without editing this library.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


class BoxConvention(enum.Enum):
    """How a backend writes box coordinates in its answers (see docs/conventions.md)."""

    ABSOLUTE_MODEL_INPUT = "absolute_model_input"  # pixels of the image after the processor's resize
    NORMALIZED_1000 = "normalized_1000"  # 0..1000 of width / height
    NORMALIZED_100 = "normalized_100"  # 0..100 of width / height (native EVLF: one token per number)


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings; ``do_sample=False`` is greedy and ignores temperature / top_p."""

    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class CompletionLogprobs:
    """Per-token log-probabilities of given completions, padded: ``logprobs`` and ``mask`` are (B, T)."""

    logprobs: torch.Tensor
    mask: torch.Tensor


@runtime_checkable
class VLMBackend(Protocol):
    """A vision-language model as the rest of the library sees it.

    Images are RGB ``uint8`` arrays ``(H, W, 3)``; prompts are the user turn's text (the backend adds its chat
    template and image placeholders). Box coordinates in answers follow :attr:`box_convention`.
    """

    model_id: str
    box_convention: BoxConvention

    def generate(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], n: int = 1, sampling: SamplingConfig | None = None
    ) -> list[list[str]]:
        """``n`` answers per (image, prompt) pair; all pairs go through the model as one batch."""

    def model_input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(width, height)`` of the image the model actually sees for an input of ``image_size`` (w, h)."""

    def completion_logprobs(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], completions: Sequence[str]
    ) -> CompletionLogprobs:
        """Log-probs of each completion's tokens given its image and prompt, with gradients when training."""

    def reference_policy(self) -> AbstractContextManager[None]:
        """Context in which the model is the reference policy (adapter disabled) — no second model copy."""

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters fine-tuning may update (LoRA + connectors); everything else stays frozen."""

    def save_adapter(self, directory: Path) -> None:
        """Write the trainable weights (safetensors) and their config to ``directory``."""

    def load_adapter(self, directory: Path | None) -> None:
        """Replace the trainable weights with those in ``directory`` (``None``: back to the base weights)."""

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


BACKENDS: dict[str, str] = {
    "evlf": "monailabel_evlf.model.backends.evlf:EVLFBackend",
    "qwen2_5_vl": "monailabel_evlf.model.backends.qwen2_5_vl:Qwen25VLBackend",
    "qwen3_vl": "monailabel_evlf.model.backends.qwen3_vl:Qwen3VLBackend",
}


def _scale(
    convention: BoxConvention, image_size: tuple[int, int], model_input_size: tuple[int, int] | None
) -> tuple[float, float]:
    """Answer units per image pixel along x and y for ``convention`` (``image_size`` is ``(width, height)``)."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive (width, height), got {image_size}")
    if convention is BoxConvention.NORMALIZED_100:
        return 100.0 / width, 100.0 / height
    if convention is BoxConvention.NORMALIZED_1000:
        return 1000.0 / width, 1000.0 / height
    if convention is BoxConvention.ABSOLUTE_MODEL_INPUT:
        if model_input_size is None:
            raise ValueError("ABSOLUTE_MODEL_INPUT boxes need the model_input_size the model saw")
        if model_input_size[0] <= 0 or model_input_size[1] <= 0:
            raise ValueError(f"model_input_size must be positive (width, height), got {model_input_size}")
        return model_input_size[0] / width, model_input_size[1] / height
    raise ValueError(f"unknown box convention {convention!r}")


def to_image_pixels(
    box: Sequence[float],
    convention: BoxConvention,
    image_size: tuple[int, int],
    model_input_size: tuple[int, int] | None = None,
) -> tuple[float, float, float, float]:
    """An answer's ``[x1, y1, x2, y2]`` in ``convention`` -> edge coordinates in pixels of the original image.

    All conventions are linear in edge coordinates (0 = left / top edge, full scale = right / bottom edge), so
    this is one scale per axis; corners are reordered so that ``x1 <= x2`` and ``y1 <= y2``.
    """
    if len(box) != 4:
        raise ValueError(f"a box needs 4 coordinates [x1, y1, x2, y2], got {list(box)!r}")
    sx, sy = _scale(BoxConvention(convention), image_size, model_input_size)
    x1, y1, x2, y2 = (float(v) for v in box)
    return min(x1, x2) / sx, min(y1, y2) / sy, max(x1, x2) / sx, max(y1, y2) / sy


def from_image_pixels(
    box: Sequence[float],
    convention: BoxConvention,
    image_size: tuple[int, int],
    model_input_size: tuple[int, int] | None = None,
) -> tuple[float, float, float, float]:
    """The inverse of :func:`to_image_pixels`: image-pixel box -> the numbers a backend writes (not rounded)."""
    if len(box) != 4:
        raise ValueError(f"a box needs 4 coordinates [x1, y1, x2, y2], got {list(box)!r}")
    sx, sy = _scale(BoxConvention(convention), image_size, model_input_size)
    x1, y1, x2, y2 = (float(v) for v in box)
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def resolve_backend_class(name_or_path: str) -> type:
    """A registered backend name or a ``"module:Class"`` import path -> the backend class.

    Import paths are resolved with importlib only (never ``eval``); errors name the option value.
    """
    target = BACKENDS.get(name_or_path, name_or_path)
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(
            f"backend {name_or_path!r} is neither one of {sorted(BACKENDS)} nor an import path 'module:Class'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"backend {name_or_path!r}: cannot import module {module_name!r}: {exc}") from exc
    try:
        return getattr(module, class_name)
    except AttributeError as exc:
        raise ValueError(f"backend {name_or_path!r}: module {module_name!r} has no {class_name!r}") from exc
