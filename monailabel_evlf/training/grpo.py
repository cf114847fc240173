"""Stage 2: GRPO on the adapter, over the :class:`~monailabel_evlf.model.backend.VLMBackend` protocol (the
compact loop).

Transformers backends can train with TRL's ``GRPOTrainer`` instead (``evlf train --trainer trl``,
:mod:`monailabel_evlf.training.trl_grpo`: multi-GPU, bf16, checkpoints, vLLM). This loop stays where it earns its
place: user ``module:Class`` backends, whose only contract is ``generate`` / ``completion_logprobs`` /
``reference_policy`` (no ``transformers`` model or processor for TRL to drive), and the few-step in-app CPU round of
the MONAI Label train task, where TRL's start-up (accelerate, datasets, its trainer) is most of the time. It updates
only ``trainable_parameters()`` (LoRA + connectors) and takes the reference policy from
``backend.reference_policy()`` (peft ``disable_adapter()``), as the TRL path does. The objective is TRL's, term for
term (``grpo_math``; ``tests/training/test_trl_grpo.py`` checks it against ``GRPOTrainer``'s own loss), and the
reward functions are TRL-shaped (``fn(prompts, completions, **columns) -> list[float]``), so both paths share them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from monailabel_evlf.model.backend import SamplingConfig, VLMBackend
from monailabel_evlf.training.config import GRPOConfig, ProgressCallback
from monailabel_evlf.training.grpo_math import group_advantages, grpo_loss
from monailabel_evlf.training.optim import seeded_optimizer
from monailabel_evlf.training.samples import TrainingSample

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., list[float]]


def score_completions(
    reward_funcs: Sequence[RewardFunction],
    samples: Sequence[TrainingSample],
    completions: Sequence[str],
    weights: Sequence[float] | None = None,
    backend: VLMBackend | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of every reward function on ``completions`` (one per sample, aligned); plus per-function means.

    A reward of ``None`` (the sample belongs to another task) counts 0, as TRL's ``nansum``. With ``backend``, the
    rewards also get its ``box_codec`` to read the answers' boxes.
    """
    weights = list(weights) if weights is not None else [1.0] * len(reward_funcs)
    if len(weights) != len(reward_funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(reward_funcs)} reward functions")
    if len(samples) != len(completions):
        raise ValueError(f"{len(samples)} samples for {len(completions)} completions")
    columns = TrainingSample.columns(samples)
    fixed = {"box_codec": backend.box_codec} if backend is not None else {}  # one per backend, not a column
    prompts = [s.prompt for s in samples]
    total = torch.zeros(len(completions), dtype=torch.float64)
    means = {}
    for fn, weight in zip(reward_funcs, weights, strict=True):
        values = fn(prompts, list(completions), **columns, **fixed)
        if len(values) != len(completions):
            raise ValueError(
                f"reward {getattr(fn, '__name__', fn)} returned {len(values)} values for {len(completions)}"
            )
        tensor = torch.tensor([np.nan if v is None else float(v) for v in values], dtype=torch.float64)
        total += weight * torch.nan_to_num(tensor, nan=0.0)
        if not torch.isnan(tensor).all():  # a reward for a task absent from this batch has nothing to report
            means[f"reward/{getattr(fn, '__name__', type(fn).__name__)}"] = float(torch.nanmean(tensor))
    return total, means


def train_grpo(
    backend: VLMBackend,
    samples: Sequence[TrainingSample],
    reward_funcs: Sequence[RewardFunction],
    config: GRPOConfig,
    *,
    callback: ProgressCallback | None = None,
) -> list[dict[str, float]]:
    """Run ``config.steps`` GRPO steps; returns one log dict per step (reward mean/std, loss, kl, clip fraction)."""
    if not samples:
        raise ValueError("GRPO needs at least one training sample")
    if not reward_funcs:
        raise ValueError("GRPO needs at least one reward function")
    params, optimizer, rng = seeded_optimizer(
        backend.trainable_parameters(),
        config.learning_rate,
        config.weight_decay,
        config.seed,
        what=f"backend {backend.model_id!r}",
    )
    group = config.group_size
    history = []
    for step in range(config.steps):
        started = time.perf_counter()
        batch = [samples[i] for i in rng.choice(len(samples), size=min(config.batch_size, len(samples)), replace=False)]
        sampling = SamplingConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=config.seed * 1_000_003 + step,
        )
        backend.eval()
        with torch.no_grad():
            groups = backend.generate([s.image for s in batch], [s.prompt for s in batch], n=group, sampling=sampling)
        flat_samples = [s for s in batch for _ in range(group)]
        completions = [c for answers in groups for c in answers]
        if len(completions) != len(flat_samples):
            raise ValueError(f"backend returned {len(completions)} answers for {len(batch)} prompts x n={group}")
        rewards, reward_means = score_completions(
            reward_funcs, flat_samples, completions, config.reward_weights, backend
        )
        advantages = group_advantages(rewards, group, scale=config.scale_rewards).float()
        log = {"step": step + 1, "reward": float(rewards.mean()), "reward_std": float(rewards.std()), **reward_means}
        # the share of groups whose answers scored differently: only those carry a GRPO signal
        log["groups_with_spread"] = float(
            (rewards.view(-1, group).amax(1) > rewards.view(-1, group).amin(1)).float().mean()
        )
        if torch.count_nonzero(advantages) == 0:
            log.update(loss=0.0, kl=0.0, clip_fraction=0.0, skipped=1.0)  # every group tied: no signal
        else:
            log.update(_policy_update(backend, optimizer, params, flat_samples, completions, advantages, config))
        log["seconds"] = time.perf_counter() - started
        history.append(log)
        logger.debug("grpo step %d/%d %s", step + 1, config.steps, log)
        if callback is not None:
            callback(step + 1, config.steps, log)
    backend.eval()
    return history


def _policy_update(
    backend: VLMBackend,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    samples: Sequence[TrainingSample],
    completions: Sequence[str],
    advantages: torch.Tensor,
    config: GRPOConfig,
) -> dict[str, float]:
    chunks = [
        range(i, min(i + config.micro_batch_size, len(samples)))
        for i in range(0, len(samples), config.micro_batch_size)
    ]

    def logprobs(chunk: range):
        return backend.completion_logprobs(
            [samples[i].image for i in chunk], [samples[i].prompt for i in chunk], [completions[i] for i in chunk]
        )

    backend.train()
    with torch.no_grad():
        ref = None
        if config.beta:
            with backend.reference_policy():
                ref = [logprobs(c).logprobs for c in chunks]
        old = [logprobs(c).logprobs for c in chunks] if config.num_iterations > 1 else None
    totals = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0}
    for _ in range(config.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for index, chunk in enumerate(chunks):
            current = logprobs(chunk)
            out = grpo_loss(
                current.logprobs,
                old[index] if old is not None else current.logprobs.detach(),
                advantages[chunk.start : chunk.stop],
                current.mask,
                epsilon=config.epsilon,
                beta=config.beta,
                ref_logprobs=ref[index] if ref is not None else None,
                loss_type=config.loss_type,
            )
            weight = len(chunk) / len(samples)  # exact for "grpo" (mean over sequences)
            (out.loss * weight).backward()
            totals["loss"] += float(out.loss.detach()) * weight / config.num_iterations
            totals["kl"] += out.kl * weight / config.num_iterations
            totals["clip_fraction"] += out.clip_fraction * weight / config.num_iterations
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
    return totals
