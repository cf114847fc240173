"""The GRPO objective as pure tensor functions, matching TRL's ``GRPOTrainer`` term for term.

Kept apart from the training loop so every term can be checked against hand-computed values:
group-normalised advantages (``(r - mean) / (std + 1e-4)`` with the unbiased std, as TRL), the PPO-style clipped
ratio, the k3 KL estimator ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's, as TRL) and the masked means of
the ``"grpo"`` (per sequence, then over sequences) and ``"bnpo"`` (over all tokens) loss types.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """``rewards`` (B*G,) laid out group after group -> advantages relative to each group's mean reward."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot form groups of {group_size} (group_size must be >= 2)")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; empty rows count as 0 (denominator clamped to 1)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate; non-negative, zero where both agree."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor
    kl: float
    clip_fraction: float


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "grpo",
) -> GRPOLossOutput:
    """Clipped surrogate + ``beta`` * KL, all (B, T) except ``advantages`` (B,)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta and ref_logprobs is None:
        raise ValueError("beta > 0 needs the reference policy's log-probs")
    if not logprobs.shape == old_logprobs.shape == mask.shape:
        raise ValueError(f"shape mismatch: {logprobs.shape}, {old_logprobs.shape}, {mask.shape}")
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(per_token)
    if beta:
        kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    # "grpo": mean over each sequence's tokens, then over sequences; "bnpo": mean over all tokens of the batch
    loss = masked_mean(per_token, mask, dim=1).mean() if loss_type == "grpo" else masked_mean(per_token, mask)
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    return GRPOLossOutput(
        loss=loss,
        kl=float(masked_mean(kl.detach(), mask)),
        clip_fraction=float(masked_mean(is_clipped.to(per_token.dtype), mask)),
    )
