"""The optimiser set-up the compact SFT and GRPO loops share (moved out of sft.py): one place, one seeding rule.

The detector stage (training/detector.py) keeps its own AdamW + one-cycle schedule.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def seeded_optimizer(
    parameters: Iterable[torch.nn.Parameter], learning_rate: float, weight_decay: float, seed: int, *, what: str
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, np.random.Generator]:
    """AdamW over the trainable ``parameters``, with torch and the sample order (the returned generator) seeded.

    ``what`` names the model in the error when nothing is trainable.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError(f"{what} has no trainable parameters")
    torch.manual_seed(seed)
    return params, torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay), np.random.default_rng(seed)
