"""One fine-tuning round as the annotation loop runs it: train an adapter, measure it, version it, gate it.

The MONAI Label train task, ``evlf train`` and the learning-loop benchmark all call :func:`finetune_adapter`, so
the validation gate is applied the same way everywhere: the new version is saved (atomically), evaluated on the
held-out samples, and promoted only when its ``gate_metric`` is not worse than the promoted version's on the same
held-out samples (re-measured, since an older version's stored metrics may come from other data).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

from monailabel_evlf.model.backend import VLMBackend
from monailabel_evlf.tasks.rewards import default_reward_functions, format_reward, grounding_reward
from monailabel_evlf.training.adapters import AdapterRegistry, AdapterVersion
from monailabel_evlf.training.config import DetectorConfig, GRPOConfig, ProgressCallback, SFTConfig, TRLConfig
from monailabel_evlf.training.detector import copy_proposal_targets, detector_held, train_detector
from monailabel_evlf.training.evaluate import evaluate
from monailabel_evlf.training.grpo import train_grpo
from monailabel_evlf.training.samples import TrainingSample
from monailabel_evlf.training.sft import train_sft

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., list[float]]
TRAINERS = ("compact", "trl")  # our loops (every backend) or TRL's trainers (transformers backends)
METHODS = ("sft", "grpo", "sft+grpo")  # the app's and the learning-loop benchmark's names for stage lists


@dataclass
class FinetuneResult:
    version: AdapterVersion
    promoted: bool
    metrics: dict[str, float]
    baseline_metrics: dict[str, float] | None
    history: dict[str, list[dict[str, float]]]


def default_rewards() -> list[Callable[..., list[float]]]:
    """The paper's verifiable rewards: diagnosis exact match, grounding IoU above a floor, VQA token F1, format."""
    return list(default_reward_functions())


def grounding_rewards() -> list[Callable[..., list[float]]]:
    """Grounding IoU (0 below the floor) and the answer format: what corrected ROI boxes can verify."""
    return [grounding_reward, format_reward]


class Stage(Protocol):
    """One training stage of a round: trains ``backend`` on the samples and returns its per-step logs plus the
    samples the next stage trains on (the detector stage rewrites the grounding targets)."""

    name: ClassVar[str]

    def run(
        self, backend: VLMBackend, samples: Sequence[TrainingSample], callback: ProgressCallback | None
    ) -> tuple[list[dict[str, float]], Sequence[TrainingSample]]: ...

    def record(self) -> dict[str, Any]:
        """What the adapter version's ``meta.json`` keeps of this stage's settings."""


def _check_trainer(trainer: str) -> None:
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")


@dataclass
class DetectorStage:
    """EVLF models with the detection connector: fit the pixel encoder + proposal head on the corrected boxes, then
    point the grounding targets at the new proposals. LoRA on the LLM alone cannot make it see what its detector
    never proposes (docs/training.md, learning loop)."""

    config: DetectorConfig
    name: ClassVar[str] = "detector"

    def run(self, backend, samples, callback):
        history = train_detector(backend, samples, self.config, callback=callback)
        return history, copy_proposal_targets(backend, samples)

    def record(self) -> dict[str, Any]:
        return asdict(self.config)


@dataclass
class SFTStage:
    config: SFTConfig
    trainer: str = "compact"
    trl: TRLConfig | None = None  # run options for trainer="trl"
    name: ClassVar[str] = "sft"

    def __post_init__(self) -> None:
        _check_trainer(self.trainer)

    def run(self, backend, samples, callback):
        if self.trainer == "trl":
            from monailabel_evlf.training.trl_sft import train_sft_trl  # lazy: TRL path only (trl, datasets)

            return train_sft_trl(backend, samples, self.config, self.trl, callback=callback), samples

        return train_sft(backend, samples, self.config, callback=callback), samples

    def record(self) -> dict[str, Any]:
        return {**asdict(self.config), "trainer": self.trainer}


@dataclass
class GRPOStage:
    config: GRPOConfig
    reward_funcs: Sequence[RewardFunction] = field(default_factory=default_rewards)
    trainer: str = "compact"
    trl: TRLConfig | None = None  # run options for trainer="trl"
    name: ClassVar[str] = "grpo"

    def __post_init__(self) -> None:
        _check_trainer(self.trainer)

    def run(self, backend, samples, callback):
        if self.trainer == "trl":
            from monailabel_evlf.training.trl_grpo import train_grpo_trl  # lazy: TRL path only (trl, datasets)

            history = train_grpo_trl(backend, samples, self.reward_funcs, self.config, self.trl, callback=callback)
        else:
            history = train_grpo(backend, samples, self.reward_funcs, self.config, callback=callback)
        return history, samples

    def record(self) -> dict[str, Any]:
        return {**asdict(self.config), "trainer": self.trainer}


def method_stages(
    method: str,
    *,
    sft: SFTConfig | None = None,
    grpo: GRPOConfig | None = None,
    detector: DetectorConfig | None = None,
    reward_funcs: Sequence[RewardFunction] | None = None,
    trainer: str = "compact",
    trl: TRLConfig | None = None,
) -> list[Stage]:
    """A method name ("sft", "grpo", "sft+grpo") as its stage list; the detector stage, if given, goes first."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; known: {', '.join(METHODS)}")
    stages: list[Stage] = [DetectorStage(detector)] if detector is not None else []
    for name in method.split("+"):
        if name == "sft":
            stages.append(SFTStage(sft or SFTConfig(), trainer=trainer, trl=trl))
        else:
            rewards = list(reward_funcs) if reward_funcs is not None else default_rewards()
            stages.append(GRPOStage(grpo or GRPOConfig(), rewards, trainer=trainer, trl=trl))
    return stages


def finetune_adapter(
    backend: VLMBackend,
    train_samples: Sequence[TrainingSample],
    held_out: Sequence[TrainingSample],
    registry: AdapterRegistry,
    stages: Sequence[Stage] = (),
    *,
    detector: DetectorConfig | None = None,
    sft: SFTConfig | None = None,
    grpo: GRPOConfig | None = None,
    reward_funcs: Sequence[RewardFunction] | None = None,
    gate_metric: str = "acc@0.5",
    tolerance: float = 0.0,
    callback: ProgressCallback | None = None,
    config_extra: dict[str, Any] | None = None,
    max_new_tokens: int = 96,
) -> FinetuneResult | None:
    """Run ``stages`` in order on ``train_samples``, starting from the promoted adapter (if any), then save + gate.

    ``detector`` / ``sft`` / ``grpo`` (+ ``reward_funcs``) are a shorthand for the compact stages in that order,
    for callers with fixed configs; give either them or ``stages``. Under ``accelerate launch`` with several
    processes (TRL stages) every process trains, and process 0 alone measures, saves and gates: the others
    return None.
    """
    shorthand = [s for s in (detector, sft, grpo) if s is not None]
    if shorthand and stages:
        raise ValueError("give either stages or the detector / sft / grpo shorthand, not both")
    if shorthand:
        stages = [
            *([DetectorStage(detector)] if detector is not None else []),
            *([SFTStage(sft)] if sft is not None else []),
            *([GRPOStage(grpo, list(reward_funcs or default_rewards()))] if grpo is not None else []),
        ]
    if not stages:
        raise ValueError("nothing to train: give a detector, SFT and/or GRPO stage")
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"each stage may run once per round, got {names}")
    if not held_out:
        raise ValueError("the validation gate needs held-out samples")
    main_process = int(os.environ.get("RANK", "0")) == 0  # torchrun / accelerate launch set RANK per process
    current = registry.load_promoted()
    backend.load_adapter(current.path if current else None)
    measure = main_process and current is not None
    baseline = evaluate(backend, held_out, max_new_tokens=max_new_tokens).flat() if measure else None
    history: dict[str, list[dict[str, float]]] = {}
    with contextlib.ExitStack() as held:
        for stage in stages:
            logger.info("%s on %d samples", stage.name, len(train_samples))
            history[stage.name], train_samples = stage.run(backend, train_samples, callback)
            if stage.name == DetectorStage.name:  # the stages after it train on its proposals, not through them
                held.enter_context(detector_held(backend))
    if not main_process:
        return None
    metrics = evaluate(backend, held_out, max_new_tokens=max_new_tokens).flat()
    version = registry.save(
        backend.save_adapter,
        metrics=metrics,
        parent=current.name if current else None,
        config={**{stage.name: stage.record() for stage in stages}, **(config_extra or {})},
    )
    if baseline is not None:
        current = registry.update_metrics(current, baseline)
    promoted = registry.promote(version, metric=gate_metric, tolerance=tolerance)
    if not promoted and current is not None:
        backend.load_adapter(current.path)  # keep serving what the gate kept
    return FinetuneResult(version, promoted, metrics, baseline, history)
