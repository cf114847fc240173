"""SFT and GRPO loops on a backend small enough to learn in a few steps (tests/training/toy_backend.py)."""

import numpy as np
import pytest
import torch

from monailabel_evlf.training.adapters import AdapterRegistry
from monailabel_evlf.training.config import GRPOConfig, SFTConfig, config_from_dict
from monailabel_evlf.training.grpo import score_completions, train_grpo
from monailabel_evlf.training.samples import TrainingSample
from monailabel_evlf.training.sft import train_sft

from .toy_backend import ToyBackend


def fraction_of_a(prompts, completions, **columns):
    assert columns["task"] == ["vqa"] * len(completions)  # the sample's columns reach the reward
    return [text.count("a") / len(text) for text in completions]


def toy_samples(n=4, target="aaaaaa"):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    return [TrainingSample(image=image, prompt=f"q{i}", target=target, task="vqa", answer=target) for i in range(n)]


def mean_reward(backend, samples, seed=123):
    from monailabel_evlf.model.backend import SamplingConfig

    answers = backend.generate(
        [s.image for s in samples],
        [s.prompt for s in samples],
        n=16,
        sampling=SamplingConfig(do_sample=True, seed=seed),
    )
    return float(np.mean([a.count("a") / len(a) for group in answers for a in group]))


def test_grpo_steps_raise_mean_reward():
    backend, samples = ToyBackend(), toy_samples()
    before = mean_reward(backend, samples)
    config = GRPOConfig(steps=15, batch_size=2, group_size=8, learning_rate=0.1, beta=0.04, seed=0)
    logs = []
    history = train_grpo(backend, samples, [fraction_of_a], config, callback=lambda s, t, log: logs.append((s, t)))
    after = mean_reward(backend, samples)
    assert after > before + 0.2, (before, after)
    assert logs[-1] == (15, 15) and len(history) == 15
    assert history[-1]["kl"] > 0  # the adapter moved the policy away from the reference


def test_grpo_is_deterministic_by_seed():
    config = GRPOConfig(steps=3, batch_size=2, group_size=4, learning_rate=0.1, seed=7)
    runs = []
    for _ in range(2):
        backend = ToyBackend()
        train_grpo(backend, toy_samples(), [fraction_of_a], config)
        runs.append(backend.delta.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_grpo_with_clipping_iterations_still_learns():
    backend, samples = ToyBackend(), toy_samples()
    before = mean_reward(backend, samples)
    config = GRPOConfig(steps=10, batch_size=2, group_size=8, learning_rate=0.1, num_iterations=3, micro_batch_size=5)
    history = train_grpo(backend, samples, [fraction_of_a], config)
    assert mean_reward(backend, samples) > before + 0.2
    assert max(h["clip_fraction"] for h in history) > 0  # later iterations hit the clip range


def test_sft_learns_the_target():
    backend, samples = ToyBackend(), toy_samples(target="ababab")
    history = train_sft(backend, samples, SFTConfig(epochs=30, batch_size=2, learning_rate=0.2))
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]
    assert backend.generate([samples[0].image], ["q"], n=1)[0][0] == "ababab"


def test_training_then_save_and_reload_adapter(tmp_path):
    backend, samples = ToyBackend(), toy_samples(target="bbbbbb")
    train_sft(backend, samples, SFTConfig(epochs=20, batch_size=4, learning_rate=0.2))
    registry = AdapterRegistry(tmp_path, "toy")
    version = registry.save(backend.save_adapter, metrics={"acc@0.5": 1.0})
    registry.promote(version, metric="acc@0.5")
    fresh = ToyBackend()
    fresh.load_adapter(registry.load_promoted().path)
    assert fresh.generate([samples[0].image], ["q"])[0][0] == "bbbbbb"


def test_score_completions_weights_and_errors():
    samples = toy_samples(2)
    total, means = score_completions([fraction_of_a], samples, ["aaaaaa", "aabbbb"], weights=[2.0])
    assert total.tolist() == pytest.approx([2.0, 2 / 3])
    assert means["reward/fraction_of_a"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="weights"):
        score_completions([fraction_of_a], samples, ["a", "b"], weights=[1.0, 2.0])


def test_configs_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="betta"):
        config_from_dict(GRPOConfig, {"betta": 0.1})
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="epochs"):
        SFTConfig(epochs=0)
