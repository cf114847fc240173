"""Stage 1: supervised fine-tuning of the adapter (LoRA on the LLM + both connectors) on target answers.

The compact loop over :meth:`VLMBackend.completion_logprobs`; transformers backends can use TRL's ``SFTTrainer``
instead (``--trainer trl``, :mod:`monailabel_evlf.training.trl_sft`). This loop is kept for the reasons given in
:mod:`monailabel_evlf.training.grpo` (user backends, the in-app CPU round). The loss is the token-level mean
negative log-likelihood of the answer tokens only (prompt and image tokens are context), as ``SFTTrainer`` with
``completion_only_loss``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch

from monailabel_evlf.model.backend import VLMBackend
from monailabel_evlf.training.config import ProgressCallback, SFTConfig
from monailabel_evlf.training.grpo_math import masked_mean
from monailabel_evlf.training.optim import seeded_optimizer
from monailabel_evlf.training.samples import TrainingSample

logger = logging.getLogger(__name__)


def sft_loss(backend: VLMBackend, batch: Sequence[TrainingSample]) -> torch.Tensor:
    out = backend.completion_logprobs([s.image for s in batch], [s.prompt for s in batch], [s.target for s in batch])
    return -masked_mean(out.logprobs, out.mask)


def train_sft(
    backend: VLMBackend,
    samples: Sequence[TrainingSample],
    config: SFTConfig,
    *,
    callback: ProgressCallback | None = None,
) -> list[dict[str, float]]:
    """``config.epochs`` passes over ``samples`` in seeded random order; returns one log dict per step."""
    if not samples:
        raise ValueError("SFT needs at least one training sample")
    missing = [i for i, s in enumerate(samples) if not s.target]
    if missing:
        raise ValueError(f"samples {missing[:5]} have no target answer to learn")
    params, optimizer, rng = seeded_optimizer(
        backend.trainable_parameters(),
        config.learning_rate,
        config.weight_decay,
        config.seed,
        what=f"backend {backend.model_id!r}",
    )
    steps_per_epoch = math.ceil(len(samples) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = int(config.warmup_ratio * total)
    # linear warm-up then linear decay to 0, as transformers' get_linear_schedule_with_warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    history = []
    backend.train()
    step = 0
    for epoch in range(config.epochs):
        order = rng.permutation(len(samples))
        for start in range(0, len(samples), config.batch_size):
            started = time.perf_counter()
            loss = sft_loss(backend, [samples[i] for i in order[start : start + config.batch_size]])
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(
                    f"SFT loss became {float(loss.detach())} at step {step + 1}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            log = {
                "step": step,
                "epoch": epoch + 1,
                "loss": float(loss.detach()),
                "lr": scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - started,
            }
            history.append(log)
            if callback is not None:
                callback(step, total, log)
    backend.eval()
    return history
