"""One fine-tuning round as the annotation loop runs it: train an adapter, measure it, version it, gate it.

The MONAI Label train task, ``evlf train`` and the learning-loop benchmark all call :func:`finetune_adapter`, so
the validation gate is applied the same way everywhere: the new version is saved (atomically), evaluated on the
held-out samples, and promoted only when its ``gate_metric`` is not worse than the promoted version's on the same
held-out samples (re-measured, since an older version's stored metrics may come from other data).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from monailabel_evlf.model.backend import VLMBackend
from monailabel_evlf.training.adapters import AdapterRegistry, AdapterVersion
from monailabel_evlf.training.config import DetectorConfig, GRPOConfig, ProgressCallback, SFTConfig
from monailabel_evlf.training.samples import TrainingSample

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    version: AdapterVersion
    promoted: bool
    metrics: dict[str, float]
    baseline_metrics: dict[str, float] | None
    history: dict[str, list[dict[str, float]]]


def default_rewards() -> list[Callable[..., list[float]]]:
    """The paper's verifiable rewards: diagnosis exact match, grounding IoU above a floor, VQA token F1, format."""
    from monailabel_evlf.tasks.rewards import default_reward_functions

    return list(default_reward_functions())


def grounding_rewards() -> list[Callable[..., list[float]]]:
    """Grounding IoU (0 below the floor) and the answer format: what corrected ROI boxes can verify."""
    from monailabel_evlf.tasks.rewards import format_reward, grounding_reward

    return [grounding_reward, format_reward]


def finetune_adapter(
    backend: VLMBackend,
    train_samples: Sequence[TrainingSample],
    held_out: Sequence[TrainingSample],
    registry: AdapterRegistry,
    *,
    detector: DetectorConfig | None = None,
    sft: SFTConfig | None = None,
    grpo: GRPOConfig | None = None,
    reward_funcs: Sequence[Callable[..., list[float]]] | None = None,
    gate_metric: str = "acc@0.5",
    tolerance: float = 0.0,
    callback: ProgressCallback | None = None,
    config_extra: dict[str, Any] | None = None,
    max_new_tokens: int = 96,
) -> FinetuneResult:
    """SFT and/or GRPO on ``train_samples`` starting from the promoted adapter (if any), then save + gate.

    ``detector`` (EVLF models with the detection connector) first fits the pixel encoder + proposal head on the
    corrected boxes and rewrites the grounding targets to copy the new proposals: LoRA on the LLM alone cannot make
    it see what its detector never proposes (docs/training.md, learning loop).
    """
    from monailabel_evlf.training.detector import copy_proposal_targets, train_detector
    from monailabel_evlf.training.evaluate import evaluate
    from monailabel_evlf.training.grpo import train_grpo
    from monailabel_evlf.training.sft import train_sft

    if sft is None and grpo is None and detector is None:
        raise ValueError("nothing to train: give a detector, SFT and/or GRPO config")
    if not held_out:
        raise ValueError("the validation gate needs held-out samples")
    current = registry.load_promoted()
    backend.load_adapter(current.path if current else None)
    baseline = evaluate(backend, held_out, max_new_tokens=max_new_tokens).flat() if current is not None else None
    stages = [s for s in (("detector", detector), ("sft", sft), ("grpo", grpo)) if s[1] is not None]
    history: dict[str, list[dict[str, float]]] = {}
    for name, config in stages:
        logger.info("%s on %d samples", name, len(train_samples))
        if name == "detector":
            history[name] = train_detector(backend, train_samples, config, callback=callback)
            train_samples = copy_proposal_targets(backend, train_samples)
        elif name == "sft":
            history[name] = train_sft(backend, train_samples, config, callback=callback)
        else:
            history[name] = train_grpo(
                backend, train_samples, reward_funcs or default_rewards(), config, callback=callback
            )
    metrics = evaluate(backend, held_out, max_new_tokens=max_new_tokens).flat()
    version = registry.save(
        backend.save_adapter,
        metrics=metrics,
        parent=current.name if current else None,
        config={**{name: asdict(config) for name, config in stages}, **(config_extra or {})},
    )
    if baseline is not None:
        current = registry.update_metrics(current, baseline)
    promoted = registry.promote(version, metric=gate_metric, tolerance=tolerance)
    if not promoted and current is not None:
        backend.load_adapter(current.path)  # keep serving what the gate kept
    return FinetuneResult(version, promoted, metrics, baseline, history)
