"""Stage 1 through TRL's ``SFTTrainer`` (``--trainer trl``): the same samples and :class:`SFTConfig` as
:func:`~monailabel_evlf.training.sft.train_sft`, with TRL's multi-GPU, bf16, gradient checkpointing, checkpoints
and logging.

The rows are prompt-completion pairs in TRL's standard (not conversational) form: the prompt is the backend's own
chat text (``backend.chat_text``, with its image placeholder) and the completion is the target answer plus the
end-of-turn token, so TRL scores exactly the tokens :meth:`~HFVLMBackend.completion_logprobs` scores and its
``completion_only_loss`` (the mean NLL over the batch's completion tokens) is our SFT loss;
``tests/training/test_trl_sft.py`` checks it on a fixed batch. TRL's collator flushes each row left (padding only
on the right), so EVLF's positions count from the first real token without the position hook GRPO needs, and
EVLF's ``dense_pixel_values`` reaches the model with the rest of the processor's output.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import Dataset, Features, Image, Value
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from monailabel_evlf.training.config import ProgressCallback, SFTConfig, TRLConfig
from monailabel_evlf.training.samples import TrainingSample
from monailabel_evlf.training.trl_common import (
    checked_extra,
    report_progress,
    require_trl_backend,
    restored_backend,
    resume_checkpoint,
    run_arguments,
    trl_processor,
)

logger = logging.getLogger(__name__)


def trl_sft_args(config: SFTConfig, options: TRLConfig, backend: Any) -> Any:
    """Our :class:`SFTConfig` (+ run options) as ``trl.SFTConfig``: epochs -> num_train_epochs, batch_size ->
    per_device_train_batch_size, warmup_ratio -> warmup_steps (a fraction, as transformers 5 reads it); linear
    warm-up and decay as the compact loop."""
    mapped = {
        "num_train_epochs": config.epochs,
        "per_device_train_batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "warmup_steps": config.warmup_ratio,
        "max_grad_norm": config.max_grad_norm,
        "seed": config.seed,
        "lr_scheduler_type": "linear",
        "max_length": None,  # never cut an answer (TRL's default truncates at 1024 tokens)
        "completion_only_loss": True,
        "remove_unused_columns": False,
    }
    return TRLSFTConfig(**run_arguments(options, backend, "sft"), **mapped, **checked_extra(options, mapped))


def sft_dataset(backend: Any, samples: Sequence[TrainingSample]) -> Any:
    missing = [i for i, s in enumerate(samples) if not s.target]
    if missing:
        raise ValueError(f"samples {missing[:5]} have no target answer to learn")
    end = backend.tokenizer.convert_ids_to_tokens(backend.end_of_turn_id())
    rows = {
        "prompt": [backend.chat_text(s.prompt) for s in samples],
        "completion": [s.target + end for s in samples],
        "image": [np.asarray(s.image) for s in samples],
    }
    features = Features({"prompt": Value("string"), "completion": Value("string"), "image": Image()})
    return Dataset.from_dict(rows, features=features)


def build_sft_trainer(backend: Any, samples: Sequence[TrainingSample], config: SFTConfig, options: TRLConfig) -> Any:
    """The configured ``SFTTrainer`` on the backend's peft model, not yet run."""
    require_trl_backend(backend)
    if not samples:
        raise ValueError("SFT needs at least one training sample")
    return SFTTrainer(
        model=backend.peft_model,
        args=trl_sft_args(config, options, backend),
        train_dataset=sft_dataset(backend, samples),
        processing_class=trl_processor(backend),
    )


def train_sft_trl(
    backend: Any,
    samples: Sequence[TrainingSample],
    config: SFTConfig,
    options: TRLConfig | None = None,
    *,
    callback: ProgressCallback | None = None,
) -> list[dict[str, float]]:
    """``config.epochs`` passes with TRL's ``SFTTrainer``; returns TRL's per-step logs (``loss``, ...)."""
    options = options or TRLConfig()
    history: list[dict[str, float]] = []
    total = math.ceil(len(samples) / config.batch_size) * config.epochs
    with restored_backend(backend):
        trainer = build_sft_trainer(backend, samples, config, options)
        report_progress(trainer, callback, total, history)
        trainer.train(resume_from_checkpoint=resume_checkpoint(options, "sft"))
    return history
