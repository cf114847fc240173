"""The one protocol every model backend implements: what inference and GRPO need, nothing more.

Inference calls :meth:`VLMBackend.generate`; GRPO calls :meth:`VLMBackend.completion_logprobs` (with and
without the adapter) and trains :meth:`VLMBackend.trainable_parameters`; the app swaps adapters with
:meth:`VLMBackend.load_adapter`. Backends are looked up by name in :data:`BACKENDS` or by import path
(``"package.module:ClassName"``) so a user can bring their own without editing this library.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from monailabel_evlf.tasks.box_codec import BoxCodec


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
    template and image placeholders). :attr:`box_codec` says how answers write boxes (a
    :class:`~monailabel_evlf.tasks.box_codec.BoxCodec`: the convention and, for pixels of the resized picture, the
    processor's resize rule); prompts, targets, parsing and rewards all take it from here.
    """

    model_id: str
    box_codec: BoxCodec

    def generate(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], n: int = 1, sampling: SamplingConfig | None = None
    ) -> list[list[str]]:
        """``n`` answers per (image, prompt) pair; all pairs go through the model as one batch."""

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
    "openai_chat": "monailabel_evlf.model.backends.openai_chat:OpenAIChatBackend",  # a remote chat-completions server
}


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
