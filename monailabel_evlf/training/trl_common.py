"""What TRL's ``GRPOTrainer`` and ``SFTTrainer`` runs share here: the run options, the progress callback, the
processor our EVLF backend hands TRL, and putting the backend back as it was afterwards.

TRL needs a ``transformers`` model with peft and a registered processor: every built-in backend
(:class:`~monailabel_evlf.model.backends.base.HFVLMBackend`) is one. User ``module:Class`` backends are not, and
keep the compact loops (:mod:`~monailabel_evlf.training.grpo`, :mod:`~monailabel_evlf.training.sft`).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PrinterCallback, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from monailabel_evlf.model.backend import VLMBackend
from monailabel_evlf.model.backends.base import HFVLMBackend
from monailabel_evlf.training.config import ProgressCallback, TRLConfig

logger = logging.getLogger(__name__)


def require_trl_backend(backend: VLMBackend) -> None:
    """TRL trains the backend's peft model with its processor: only Hugging Face backends have both."""
    if not isinstance(backend, HFVLMBackend):
        raise ValueError(
            f"--trainer trl needs a transformers backend (evlf, qwen2_5_vl, qwen3_vl); {type(backend).__name__} "
            "is not one: use the compact trainer (--trainer compact)"
        )


def stage_dir(options: TRLConfig, stage: str) -> Path:
    """Each stage's own checkpoints and TensorBoard runs: ``<output_dir>/<stage>`` (sft, grpo)."""
    return Path(options.output_dir) / stage


def run_arguments(options: TRLConfig, backend: Any, stage: str) -> dict[str, Any]:
    """The ``TrainingArguments`` fields every TRL run here sets the same way (precision, checkpoints, logging)."""
    if options.use_vllm and importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "trl.use_vllm is set but the vllm package is not installed: `pip install vllm` (a CUDA machine), or "
            "set use_vllm: false to generate with transformers"
        )
    report_to = options.report_to
    if report_to == "auto":
        report_to = "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"
    return {
        "output_dir": str(stage_dir(options, stage)),
        "bf16": options.bf16,
        "gradient_checkpointing": options.gradient_checkpointing,  # TRL's GRPOConfig defaults it to True
        "save_strategy": "steps" if options.save_steps else "no",
        "save_steps": options.save_steps or 500,
        "save_total_limit": options.save_total_limit,
        "report_to": report_to,
        "logging_steps": 1,
        "use_cpu": backend.model.device.type == "cpu",
        "optim": "adamw_torch",  # torch.optim.AdamW as the compact loops (the fused default is CUDA-minded)
        "dataloader_pin_memory": False,
        "disable_tqdm": True,
    }


def checked_extra(options: TRLConfig, mapped: dict[str, Any]) -> dict[str, Any]:
    """``options.extra``, refused where it sets a field we map from the sft / grpo sections (one place each)."""
    clash = sorted(set(options.extra) & set(mapped))
    if clash:
        raise ValueError(f"trl.extra sets {clash}, which come from the sft / grpo sections: set them there")
    return dict(options.extra)


def resume_checkpoint(options: TRLConfig, stage: str) -> str | None:
    """``resume_from_checkpoint`` for one stage, as ``Trainer.train`` takes it.

    "latest": the stage's newest ``checkpoint-N`` (none yet: the stage starts afresh). A path resumes the stage
    whose folder holds it and leaves the other stages alone; a path in no stage's folder is an error.
    """
    wanted = options.resume_from_checkpoint
    if wanted is None:
        return None
    folder = stage_dir(options, stage)
    if wanted == "latest":
        return get_last_checkpoint(str(folder)) if folder.is_dir() else None
    path = Path(wanted)
    if not path.is_dir():
        raise FileNotFoundError(f"trl.resume_from_checkpoint: no checkpoint folder {path}")
    if path.resolve().parent.parent != Path(options.output_dir).resolve():
        raise ValueError(f"trl.resume_from_checkpoint: {path} is not a checkpoint under {options.output_dir}/<stage>")
    return str(path) if path.resolve().parent == folder.resolve() else None


def report_progress(trainer: Any, callback: ProgressCallback | None, total: int, history: list[dict[str, float]]):
    """Record each step's logs in ``history`` (with its wall ``seconds``, generation included, as the compact
    loops log it) and pass them to our :data:`ProgressCallback`, in place of the Trainer's printing of every log
    dict (``disable_tqdm`` turns that on)."""

    class Progress(TrainerCallback):
        started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "train_runtime" in logs:  # the end-of-run summary is not a step
                return
            log = {"step": state.global_step, **{k: float(v) for k, v in logs.items() if isinstance(v, int | float)}}
            log["seconds"] = time.perf_counter() - self.started
            history.append(log)
            if callback is not None:
                callback(state.global_step, total, log)

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Progress())


class _FlatImagesMixin:
    """``ProcessorMixin.apply_chat_template`` and TRL pass images as one list per conversation; the EVLF processor
    takes one flat list (one ``<|image|>`` each, in order), as it has no HF image processor to flatten them.
    It also always tokenises without special tokens (the chat template writes them) and so refuses TRL's
    ``add_special_tokens=False``."""

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        if kwargs.pop("add_special_tokens", False):
            raise ValueError("the EVLF processor adds no special tokens; the chat template writes them")
        if images is not None and not isinstance(images, np.ndarray):
            flat = []
            for item in images:
                flat.extend(item if isinstance(item, list | tuple) else [item])
            images = [np.asarray(image) for image in flat]  # PIL (datasets' Image feature) -> uint8 arrays
        return super().__call__(images=images, text=text, **kwargs)


def trl_processor(backend: Any) -> Any:
    """The backend's processor as TRL drives it: unchanged for HF processors, which flatten per-sample image
    lists themselves; a copy that flattens them for processors without an ``image_processor`` (EVLF)."""
    processor = backend.processor
    if getattr(processor, "image_processor", None) is not None:
        return processor
    flat = copy.copy(processor)
    flat.__class__ = type(f"Flat{type(processor).__name__}", (_FlatImagesMixin, type(processor)), {})
    return flat


# instance attributes a TRL run sets on the models it trains: TRL's fused LM head (``forward`` on the base model),
# accelerate's mixed-precision wrapper (``forward`` over ``_original_forward`` on the peft model, with --bf16) and
# its "already prepared" mark, which makes the next run's accelerator skip its own wrapping of that model
_RUN_ATTRIBUTES = ("forward", "_original_forward", "_is_accelerate_prepared")


@contextmanager
def restored_backend(backend: Any) -> Iterator[None]:
    """Leave the backend as TRL found it: TRL patches the model's ``forward`` with its fused LM head, accelerate
    wraps the peft model's ``forward`` in bf16 autocast under ``bf16`` (instance attributes over the class methods:
    left there, a later run on the same backend without bf16 would still train in bf16), and gradient
    checkpointing may be on."""
    model = backend.model
    models = [model, *([backend.peft_model] if getattr(backend, "peft_model", None) is not None else [])]
    had = [set(m.__dict__) & set(_RUN_ATTRIBUTES) for m in models]
    try:
        yield
    finally:
        for module, kept in zip(models, had, strict=True):
            for name in set(_RUN_ATTRIBUTES) - kept:
                module.__dict__.pop(name, None)
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
        backend.eval()
