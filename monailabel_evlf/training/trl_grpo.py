"""Stage 2 through TRL's ``GRPOTrainer``: multi-GPU (``accelerate launch``), bf16, gradient checkpointing,
checkpoints with resume, TensorBoard, vLLM generation; same samples, rewards and :class:`GRPOConfig` as
:func:`~monailabel_evlf.training.grpo.train_grpo`.

The objective is TRL's own code; ``tests/training/test_trl_grpo.py`` proves it equals ``grpo_math.grpo_loss`` term
for term on a fixed batch, with the settings :func:`trl_grpo_args` pins (``use_bias_correction_kl=False``, constant
learning rate, our ``loss_type``). Two deliberate alignments with the compact loop:

* the reference policy is the disabled adapter (``backend.reference_policy()``). Given a peft model with
  ``beta > 0``, TRL 1.16 copies the current adapter into a frozen ``"ref"`` adapter instead; that copy is deleted
  after ``__init__``, so TRL's fallback ``use_adapter(model, None)`` (adapters off) is the reference, as ours.
* TRL scores tokens at ``logits / temperature``; ours at temperature 1. They agree for ``temperature=1`` (the
  default); other temperatures give TRL's (tempered-policy) objective.

What TRL 1.16 cannot take from the EVLF backend as it is, and what :class:`BackendGRPOTrainer` adds:

* ``_get_per_token_logps_and_entropies`` has a fixed keyword list (``pixel_values``, ``image_grid_thw``, ...) and
  ``_generate_and_score_completions`` / ``_compute_loss`` forward only those keys: EVLF's second image input,
  ``dense_pixel_values`` (the pixel encoder's), is a ``TypeError`` when scoring and is dropped before the loss.
  The subclass carries such per-row processor outputs through the batch and adds them to the forward with a
  pre-hook on the peft model.
* TRL's forward passes no ``position_ids``; EVLF's language model then counts positions from the left pad, not
  from the first real token as ``generate`` and ``completion_logprobs`` do (``extra_forward_inputs``). The same
  hook adds the backend's ``extra_forward_inputs`` (nothing for the Qwen backends, whose rope index reads the mask).
* ``ProcessorMixin.apply_chat_template`` hands the processor nested per-conversation image lists, which the EVLF
  processor rejects: :func:`~monailabel_evlf.training.trl_common.trl_processor` flattens them.
* EVLF's config has no ``image_token_id`` (TRL's image-token suppression reads it): the backend's own
  ``suppressed_token_ids()`` and ``stop_token_ids()`` are used instead.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Features, Image, Value
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from trl import GRPOConfig as TRLGRPOConfig
from trl import GRPOTrainer

from monailabel_evlf.training.config import GRPOConfig, ProgressCallback, TRLConfig
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

RewardFunction = Callable[..., list[float]]


def generation_layout(config: GRPOConfig, n_samples: int) -> dict[str, int]:
    """Our prompts-per-step and micro-batch as TRL's completion counts: one generation batch of
    ``batch_size x group_size`` completions per optimizer step, split into equal micro-batches."""
    completions = min(config.batch_size, n_samples) * config.group_size
    micro = max(d for d in range(1, min(config.micro_batch_size, completions) + 1) if completions % d == 0)
    steps = completions // micro
    return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": steps, "steps_per_generation": steps}


def trl_grpo_args(config: GRPOConfig, options: TRLConfig, backend: Any, n_samples: int) -> Any:
    """Our :class:`GRPOConfig` (+ run options) as ``trl.GRPOConfig``; the names map one to one except
    steps -> max_steps, group_size -> num_generations, max_new_tokens -> max_completion_length and
    batch_size / micro_batch_size -> the completion batch layout (:func:`generation_layout`)."""
    mapped = {
        "max_steps": config.steps,
        "num_generations": config.group_size,
        "max_completion_length": config.max_new_tokens,
        "epsilon": config.epsilon,
        "beta": config.beta,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "num_iterations": config.num_iterations,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": 0,
        "loss_type": config.loss_type,
        "scale_rewards": "group" if config.scale_rewards else "none",
        "reward_weights": config.reward_weights,
        "seed": config.seed,
        **generation_layout(config, n_samples),
        # the compact loop's objective and schedule: k3 KL without TRL's importance-weight factor, constant lr
        "use_bias_correction_kl": False,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "log_completions": options.log_completions,
        "use_vllm": options.use_vllm,
        "vllm_mode": options.vllm_mode,
        "generation_kwargs": {
            "eos_token_id": backend.stop_token_ids(),
            # EVLF's placeholders; the Qwen backends have none of their own and keep TRL's image-token suppression
            **({"suppress_tokens": backend.suppressed_token_ids()} if backend.suppressed_token_ids() else {}),
        },
    }
    return TRLGRPOConfig(**run_arguments(options, backend, "grpo"), **mapped, **checked_extra(options, mapped))


def grpo_dataset(backend: Any, samples: Sequence[TrainingSample]) -> Any:
    """One row per sample: the conversational prompt TRL renders with the backend's chat template, the image
    (datasets' Image feature) and the sample's index, by which the rewards get their ground-truth columns."""

    def prompt(sample: TrainingSample) -> list[dict[str, Any]]:
        messages = []
        if backend.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": backend.system_prompt}]})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt}]})
        return messages

    rows = {
        "prompt": [prompt(s) for s in samples],
        "image": [np.asarray(s.image) for s in samples],
        "sample_index": list(range(len(samples))),
    }
    features = Features(
        {
            "prompt": [{"role": Value("string"), "content": [{"type": Value("string"), "text": Value("string")}]}],
            "image": Image(),
            "sample_index": Value("int64"),
        }
    )
    return Dataset.from_dict(rows, features=features)


def trl_reward(fn: RewardFunction, samples: Sequence[TrainingSample], backend: Any) -> RewardFunction:
    """``fn`` called as :func:`~monailabel_evlf.training.grpo.score_completions` calls it (prompt strings, the
    samples' columns, the backend's ``box_codec``), from TRL's call with conversational prompts and completions."""

    @functools.wraps(fn)
    def reward(prompts: Sequence[Any], completions: Sequence[Any], sample_index: Sequence[int], **_: Any):
        batch = [samples[i] for i in sample_index]
        columns = TrainingSample.columns(batch)
        return fn([s.prompt for s in batch], list(completions), **columns, box_codec=backend.box_codec)

    return reward


def _trainer_class() -> type:
    forwarded = set(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)

    class BackendGRPOTrainer(GRPOTrainer):
        """``GRPOTrainer`` whose forwards get the backend's extra image inputs and positions (module docstring)."""

        def __init__(self, *args: Any, backend: Any, samples: Sequence[TrainingSample], **kwargs: Any) -> None:
            self.backend, self.samples = backend, samples
            # processor outputs TRL does not forward (EVLF: dense_pixel_values), carried per completion row
            self.row_keys = set(backend.processor.model_input_names) - forwarded - {"input_ids", "attention_mask"}
            self._rows: dict[str, torch.Tensor] | None = None
            config = backend.model.config
            placeholder = not hasattr(config, "image_token_id")
            if placeholder:  # TRL's suppression reads it; the backend's suppressed_token_ids() replace it
                config.image_token_id = (backend.suppressed_token_ids() or [backend.tokenizer.pad_token_id])[0]
            try:
                super().__init__(*args, **kwargs)
            finally:
                if placeholder:
                    del config.image_token_id
            peft_model = self.accelerator.unwrap_model(self.model)
            if "ref" in peft_model.peft_config:  # reference = adapter off, as backend.reference_policy()
                peft_model.delete_adapter("ref")
            self.eos_token_ids = backend.stop_token_ids()
            self._hook = peft_model.register_forward_pre_hook(self._forward_inputs, with_kwargs=True)

        def _forward_inputs(self, module, args, kwargs):
            if self._rows:
                kwargs.update(self._rows)
            if kwargs.get("position_ids") is None and kwargs.get("attention_mask") is not None:
                kwargs.update(self.backend.extra_forward_inputs(kwargs))
            return args, kwargs

        @contextmanager
        def _with_rows(self, rows: dict[str, torch.Tensor]) -> Iterator[None]:
            self._rows = rows
            try:
                yield
            finally:
                self._rows = None

        def _row_inputs(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            if not self.row_keys:
                return {}
            batch = [self.samples[x["sample_index"]] for x in inputs]
            processed = self.backend.model_inputs([s.image for s in batch], [s.prompt for s in batch])
            self.row_keys &= set(processed)  # names the processor declares but does not produce for images
            return {k: v for k, v in processed.items() if k in self.row_keys}

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            output.update(self._row_inputs(inputs))  # shuffled and split with the rest of the batch
            return output

        def _compute_loss(self, model, inputs):
            with self._with_rows({k: inputs[k] for k in self.row_keys if k in inputs}):
                return super()._compute_loss(model, inputs)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
            rows = {k: kw.pop(k) for k in list(kw) if k in self.row_keys}  # scoring: they come with the others
            with self._with_rows(rows) if rows else nullcontext():
                if self._rows:  # one chunk: the carried rows line up with the whole batch
                    kw["batch_size"] = input_ids.size(0)
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, *a, **kw
                )

        def remove_hook(self) -> None:
            self._hook.remove()

    return BackendGRPOTrainer


def completions_to_tensorboard(trainer: Any, rows: int = 8) -> None:
    """With ``log_completions``, write each step's first ``rows`` (prompt, completion, reward) to TensorBoard as a
    text table: TRL 1.16 sends its completion tables only to wandb / trackio (and prints them)."""
    board = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if board is None or not trainer.args.log_completions:
        return

    def text(message: Any) -> str:
        """A prompt or completion, plain or conversational, as one line of table text."""
        if not isinstance(message, str):
            content = message[-1]["content"] if message else ""
            parts = content if isinstance(content, list) else [{"text": content}]
            message = " ".join(p.get("text") or "" for p in parts if isinstance(p, dict))
        return message.replace("|", "\\|").replace("\n", " ")

    class Completions(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged = trainer._logs
            if board.tb_writer is None or not logged["completion"]:
                return
            weights = dict(zip(trainer.reward_func_names, trainer.reward_weights.tolist(), strict=True))
            columns = [[weights[name] * v for v in values] for name, values in logged["rewards"].items()]
            totals = [sum(v for v in row if v == v) for row in zip(*columns, strict=True)]  # NaN (other task): 0
            lines = ["| prompt | completion | reward |", "|---|---|---:|"]
            shown = zip(logged["prompt"], logged["completion"], totals, strict=False)  # deques of one length
            lines += [f"| {text(p)} | {text(c)} | {r:.3f} |" for p, c, r in list(shown)[:rows]]
            board.tb_writer.add_text("completions", "\n".join(lines), state.global_step)

    trainer.add_callback(Completions())


def build_grpo_trainer(
    backend: Any,
    samples: Sequence[TrainingSample],
    reward_funcs: Sequence[RewardFunction],
    config: GRPOConfig,
    options: TRLConfig,
) -> Any:
    """The configured trainer, not yet run (the tests call its loss directly)."""
    require_trl_backend(backend)
    if options.use_vllm and backend.model.config.model_type == "evlf":
        raise ValueError(
            "trl.use_vllm: vLLM has no EVLF model (it serves the Qwen backends); generate with transformers"
        )
    if not samples:
        raise ValueError("GRPO needs at least one training sample")
    if not reward_funcs:
        raise ValueError("GRPO needs at least one reward function")
    return _trainer_class()(
        model=backend.peft_model,
        reward_funcs=[trl_reward(fn, samples, backend) for fn in reward_funcs],
        args=trl_grpo_args(config, options, backend, len(samples)),
        train_dataset=grpo_dataset(backend, samples),
        processing_class=trl_processor(backend),
        backend=backend,
        samples=samples,
    )


def train_grpo_trl(
    backend: Any,
    samples: Sequence[TrainingSample],
    reward_funcs: Sequence[RewardFunction],
    config: GRPOConfig,
    options: TRLConfig | None = None,
    *,
    callback: ProgressCallback | None = None,
) -> list[dict[str, float]]:
    """``config.steps`` GRPO steps with TRL; returns TRL's per-step logs (``reward``, ``kl``, ``loss``, ...)."""
    options = options or TRLConfig()
    history: list[dict[str, float]] = []
    with restored_backend(backend):
        trainer = build_grpo_trainer(backend, samples, reward_funcs, config, options)
        report_progress(trainer, callback, config.steps, history)
        completions_to_tensorboard(trainer)
        try:
            trainer.train(resume_from_checkpoint=resume_checkpoint(options, "grpo"))
        finally:
            trainer.remove_hook()
    return history
