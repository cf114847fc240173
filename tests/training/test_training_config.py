"""The training YAML takes TRL's names where they mean exactly what ours do (docs/training.md, TRL section)."""

import dataclasses
from types import SimpleNamespace

import pytest
import yaml

from monailabel_evlf.paths import configs_dir
from monailabel_evlf.training.config import GRPOConfig, SFTConfig, TRLConfig, config_from_dict


@pytest.mark.parametrize(
    ("cls", "theirs", "ours", "value"),
    [
        (GRPOConfig, "max_steps", "steps", 7),
        (GRPOConfig, "num_generations", "group_size", 3),
        (GRPOConfig, "max_completion_length", "max_new_tokens", 17),
        (SFTConfig, "num_train_epochs", "epochs", 5),
        (SFTConfig, "per_device_train_batch_size", "batch_size", 2),
    ],
)
def test_trl_names_are_taken_and_stored_as_ours(cls, theirs, ours, value):
    config = config_from_dict(cls, {theirs: value})
    assert getattr(config, ours) == value
    assert config == config_from_dict(cls, {ours: value})  # same dataclass: same meta.json config and hash
    assert theirs not in dataclasses.asdict(config)
    with pytest.raises(ValueError, match=rf"'{ours}' and '{theirs}' are the same setting"):
        config_from_dict(cls, {ours: value, theirs: value})  # even when they agree: one place per setting


def test_a_mixed_section_and_the_refusals():
    grpo = config_from_dict(GRPOConfig, {"max_steps": 3, "group_size": 4, "max_completion_length": 12, "beta": 0.0})
    assert (grpo.steps, grpo.group_size, grpo.max_new_tokens, grpo.beta) == (3, 4, 12, 0.0)
    # GRPO's batch_size counts prompts, TRL's per-device batch counts completions: not an alias
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation"):
        with pytest.raises(ValueError, match=rf"'{name}' does not map one to one here: .*micro_batch_size"):
            config_from_dict(GRPOConfig, {name: 8})
    with pytest.raises(ValueError, match=r"unknown SFTConfig keys \['max_steps'\].*TRL's \['num_train_epochs'"):
        config_from_dict(SFTConfig, {"max_steps": 3})  # a GRPO name in the sft section is still unknown
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        config_from_dict(GRPOConfig, {"num_generations": 1})  # checked as ours
    with pytest.raises(ValueError, match="unknown TRLConfig keys"):
        config_from_dict(TRLConfig, {"max_steps": 3})


def test_the_shipped_training_configs_still_load():
    for path in sorted((configs_dir() / "training").glob("*.yaml")):
        content = yaml.safe_load(path.read_text())
        for section, cls in (("sft", SFTConfig), ("pretrain", SFTConfig), ("grpo", GRPOConfig)):
            if content.get(section):
                config_from_dict(cls, content[section])


def test_trl_names_reach_trl_as_they_were_written():
    """A grpo / sft section in TRL's names gives TRL's configs those values."""
    pytest.importorskip("trl")
    from monailabel_evlf.training.trl_grpo import trl_grpo_args
    from monailabel_evlf.training.trl_sft import trl_sft_args

    backend = SimpleNamespace(
        model=SimpleNamespace(device=SimpleNamespace(type="cpu")),
        stop_token_ids=lambda: [2],
        suppressed_token_ids=lambda: [],
    )
    options = TRLConfig(report_to="none")
    grpo = config_from_dict(GRPOConfig, {"max_steps": 3, "num_generations": 4, "max_completion_length": 12})
    args = trl_grpo_args(grpo, options, backend, n_samples=8)
    assert (args.max_steps, args.num_generations, args.max_completion_length) == (3, 4, 12)
    sft = config_from_dict(SFTConfig, {"num_train_epochs": 2, "per_device_train_batch_size": 5})
    args = trl_sft_args(sft, options, backend)
    assert (args.num_train_epochs, args.per_device_train_batch_size) == (2, 5)
