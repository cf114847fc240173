"""Training settings (Stage 1 SFT, Stage 2 GRPO) as dataclasses, read from YAML with strict keys.

Unknown keys are errors rather than silently ignored: a typo such as ``betta: 0.1`` must not train with the
default. YAML is parsed with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from tqdm.auto import tqdm

from monailabel_evlf.paths import configs_dir

TRAINING_CONFIG_DIR = configs_dir() / "training"

# progress(step, total_steps, logs): the MONAI Label train task and the CLI's tqdm bar both plug in here
ProgressCallback = Callable[[int, int, dict[str, float]], None]


def tqdm_progress(desc: str) -> ProgressCallback:
    """A :data:`ProgressCallback` drawing a tqdm bar per training stage (the CLI commands and benchmarks)."""
    bars: list[Any] = []

    def update(step: int, total: int, logs: dict[str, float]) -> None:
        if step == 1 or not bars:  # a new stage (SFT, GRPO, ...) starts counting again
            bars.append(tqdm(total=total, desc=desc, unit="step"))
        bar = bars[-1]
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{logs[k]:.3f}" for k in ("loss", "reward", "kl") if k in logs}, refresh=False)
        if step == total:
            bar.close()

    return update


@dataclasses.dataclass
class SFTConfig:
    """Stage 1: negative log-likelihood of the target answers, LoRA + connectors only."""

    # TRL's names (trl.SFTConfig) the YAML takes for ours: they mean exactly the same (config_from_dict)
    TRL_NAMES: ClassVar[dict[str, str]] = {"num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size"}

    epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive(self, "epochs", "batch_size", "learning_rate")


@dataclasses.dataclass
class GRPOConfig:
    """Stage 2: group relative policy optimisation with verifiable rewards (names as in TRL's GRPOConfig, but for
    ``steps``, ``group_size``, ``max_new_tokens``, for which the YAML also takes TRL's names, and the batch layout)."""

    TRL_NAMES: ClassVar[dict[str, str]] = {
        "max_steps": "steps",
        "num_generations": "group_size",
        "max_completion_length": "max_new_tokens",
    }
    # TRL's names that do not map one to one: TRL counts completions where batch_size counts prompts
    NOT_TRL_NAMES: ClassVar[dict[str, str]] = dict.fromkeys(
        ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "generation_batch_size"),
        "TRL's completion batch layout comes from batch_size (prompts per step) x group_size, split into "
        "micro_batch_size completions per forward: set those",
    )

    steps: int = 40
    batch_size: int = 4  # prompts per step; each gets ``group_size`` sampled answers
    group_size: int = 8
    epsilon: float = 0.2
    beta: float = 0.04
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_iterations: int = 1  # policy updates per generated batch; > 1 makes the clipped ratio bite
    micro_batch_size: int = 64  # completions per forward/backward pass (gradient accumulation above that)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    loss_type: str = "grpo"
    scale_rewards: bool = True
    reward_weights: list[float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive(self, "steps", "batch_size", "learning_rate", "num_iterations", "micro_batch_size")
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2 (advantages compare answers within a group), got {self.group_size}"
            )
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


@dataclasses.dataclass
class DetectorConfig:
    """The detection pixel connector's own stage: the centre / box / label / site loss on true boxes."""

    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    max_grad_norm: float = 5.0
    flip: bool = True  # mirror half the images (their site term is off: left / right swap)
    intensity_jitter: float = 0.1  # gain and offset drawn from 1 +- j and +- j (fractions of full scale)
    max_shift: float = 0.1  # translate by up to this fraction of the image (boxes kept inside)
    # bfloat16 autocast for the convolutions (the loss stays float32) where the hardware computes bf16 natively
    # (AVX512-BF16 / AMX CPUs, bf16 GPUs; float32 elsewhere): 2.5x faster per step on this project's 2-core Zen 4
    bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive(self, "steps", "batch_size", "learning_rate")
        if not 0 <= self.intensity_jitter < 1:
            raise ValueError(f"intensity_jitter must be in [0, 1), got {self.intensity_jitter}")
        if not 0 <= self.max_shift < 0.5:
            raise ValueError(f"max_shift must be in [0, 0.5), got {self.max_shift}")


@dataclasses.dataclass
class TRLConfig:
    """How ``--trainer trl`` runs (TRL's ``GRPOTrainer`` / ``SFTTrainer``); the objective stays in ``sft`` / ``grpo``.

    ``extra`` goes to TRL's own config unchanged (any ``trl.GRPOConfig`` / ``trl.SFTConfig`` field, checked by TRL),
    except the fields :mod:`monailabel_evlf.training.trl_grpo` maps from our sections, which must be set there.
    """

    output_dir: str = "trl-runs"  # per stage: <output_dir>/sft|grpo/checkpoint-N/ and TensorBoard runs/
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 0  # 0: no intermediate checkpoints
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # "latest" (each stage's newest) or one stage's checkpoint-N folder
    report_to: str = "auto"  # "auto": TensorBoard when it is installed, else nothing; or "none", "tensorboard", ...
    log_completions: bool = False  # sample completions into the logs (and TensorBoard)
    use_vllm: bool = False  # generate with vLLM (Qwen backends on GPU; needs the vllm package)
    vllm_mode: str = "colocate"  # "colocate" (same GPUs) or "server" (`trl vllm-serve` elsewhere)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.save_steps < 0:
            raise ValueError(f"TRLConfig.save_steps must be >= 0, got {self.save_steps}")
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError(f"TRLConfig.vllm_mode must be 'colocate' or 'server', got {self.vllm_mode!r}")


T = TypeVar("T")


def _check_positive(config: Any, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be > 0, got {getattr(config, name)}")


def config_from_dict(cls: type[T], values: Mapping[str, Any] | None) -> T:
    """``cls`` from a YAML section, strictly: unknown keys are errors. Where ``cls.TRL_NAMES`` has one, TRL's name
    for a setting is taken for ours (a TRL config's values carry over) and stored as ours; both names at once are an
    error, as are TRL names that do not map one to one (``cls.NOT_TRL_NAMES``, with the reason)."""
    values = dict(values or {})
    aliases: dict[str, str] = getattr(cls, "TRL_NAMES", {})
    for theirs, ours in aliases.items():
        if theirs not in values:
            continue
        if ours in values:
            raise ValueError(
                f"{cls.__name__}: {ours!r} and {theirs!r} are the same setting ({theirs} is TRL's name for {ours}); "
                "give one of them"
            )
        values[ours] = values.pop(theirs)
    for name, reason in getattr(cls, "NOT_TRL_NAMES", {}).items():
        if name in values:
            raise ValueError(f"{cls.__name__}: {name!r} does not map one to one here: {reason}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        also = f" (or TRL's {sorted(aliases)})" if aliases else ""
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}{also}")
    return cls(**values)


def load_training_yaml(path: str | Path) -> dict[str, Any]:
    """A training YAML: top-level sections ``sft`` and/or ``grpo`` (and ``trl`` for ``--trainer trl``) plus
    free-form ``data`` / ``model`` sections."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config not found: {path}")
    content = yaml.safe_load(path.read_text()) or {}
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return content
