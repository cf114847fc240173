"""TRL's GRPOTrainer on the tiny EVLF backend: its loss equals ours term for term, a short run learns, and the
adapter it trains goes through the registry and serves."""

import numpy as np
import pytest
import torch

from monailabel_evlf.data.phantoms import make_phantom
from monailabel_evlf.model.backend import SamplingConfig
from monailabel_evlf.model.backends.evlf import EVLFBackend
from monailabel_evlf.model.tiny import build_tiny_evlf
from monailabel_evlf.training.adapters import AdapterRegistry
from monailabel_evlf.training.config import GRPOConfig, TRLConfig
from monailabel_evlf.training.finetune import GRPOStage, finetune_adapter, grounding_rewards
from monailabel_evlf.training.grpo_math import group_advantages, grpo_loss
from monailabel_evlf.training.samples import SampleOptions, phantom_samples
from monailabel_evlf.training.trl_grpo import build_grpo_trainer, generation_layout, train_grpo_trl

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-evlf")
    build_tiny_evlf(path, image_size=32, hidden_size=32, num_layers=1, pixel_pool=1)
    return path


@pytest.fixture(scope="module")
def samples(tiny_path):
    backend = EVLFBackend.from_pretrained(str(tiny_path))
    options = SampleOptions(box_codec=backend.box_codec, size=(48, 48), tasks=("grounding",))
    phantom = make_phantom(1, shape=(40, 40, 12), n_lesions=2, study_id="p1")
    return phantom_samples(phantom.image, phantom.affine, phantom.ground_truth, options, normal_slices=1)


def options(tmp_path):
    return TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none")


def perturbed_backend(tiny_path):
    """The tiny model with a LoRA that is not zero, so the policy differs from the reference (KL > 0)."""
    backend = EVLFBackend.from_pretrained(str(tiny_path))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in backend.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return backend


def fixed_batch(backend, samples, completions, advantages):
    """The batch dict ``GRPOTrainer._compute_loss`` reads, built from the backend's own tokenisation:
    ``[left-padded prompt | completion + end-of-turn, right-padded]`` as ``completion_logprobs`` lays it out."""
    inputs = backend.model_inputs([s.image for s in samples], [s.prompt for s in samples])
    end = backend.end_of_turn_id()
    encoded = [backend.tokenizer(c, add_special_tokens=False)["input_ids"] + [end] for c in completions]
    length = max(len(ids) for ids in encoded)
    completion_ids = torch.full((len(encoded), length), backend.tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1
    return {
        "prompt_ids": inputs["input_ids"],
        "prompt_mask": inputs["attention_mask"],
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "pixel_values": inputs["pixel_values"],
        "dense_pixel_values": inputs["dense_pixel_values"],
        "num_images": [1] * len(samples),
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum(),
    }


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_trl_loss_equals_ours_term_for_term(tiny_path, samples, tmp_path, loss_type):
    backend = perturbed_backend(tiny_path)
    config = GRPOConfig(steps=1, batch_size=2, group_size=2, beta=0.3, epsilon=0.2, loss_type=loss_type)
    trainer = build_grpo_trainer(backend, samples, grounding_rewards(), config, options(tmp_path))
    try:
        batch_samples = [samples[0], samples[0], samples[1], samples[1]]
        completions = ["<think>a</think><answer>[]</answer>", "12 40", "no lesion here at all", "x"]
        advantages = group_advantages(torch.tensor([1.0, 0.0, 0.2, 0.9], dtype=torch.float64), 2).float()
        inputs = fixed_batch(backend, batch_samples, completions, advantages)
        backend.eval()
        ours = backend.completion_logprobs(
            [s.image for s in batch_samples], [s.prompt for s in batch_samples], completions
        )
        mask = ours.mask
        assert torch.equal(mask.long(), inputs["completion_mask"])
        # old log-probs off the current ones, so the ratio moves and clipping bites on some tokens
        old = (
            ours.logprobs.detach() + 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
        ) * mask
        with backend.reference_policy(), torch.no_grad():
            ref = backend.completion_logprobs(
                [s.image for s in batch_samples], [s.prompt for s in batch_samples], completions
            ).logprobs
        # TRL's own log-probs (fused LM head, its reference context) match the backend's
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        row_inputs = {k: inputs[k] for k in ("pixel_values", "num_images", "dense_pixel_values")}
        with torch.no_grad():
            trl_logps, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, attention, inputs["completion_ids"].size(1), **row_inputs
            )
            with backend.peft_model.disable_adapter():
                trl_ref, _, _ = trainer._get_per_token_logps_and_entropies(
                    trainer.model, ids, attention, inputs["completion_ids"].size(1), **row_inputs
                )
        assert torch.allclose(trl_logps * mask, ours.logprobs.detach(), atol=1e-5)
        assert torch.allclose(trl_ref * mask, ref, atol=1e-5)
        assert not torch.allclose(ref, ours.logprobs.detach(), atol=1e-3)  # the KL term is not trivially 0

        inputs.update(old_per_token_logps=old, ref_per_token_logps=ref)
        params = list(backend.trainable_parameters())
        backend.train()
        trainer.current_gradient_accumulation_steps = 1  # one micro-batch per optimizer step (set by train())
        trl_loss = trainer._compute_loss(trainer.model, inputs)
        trl_grads = torch.autograd.grad(trl_loss, params, allow_unused=True)
        out = grpo_loss(
            backend.completion_logprobs(
                [s.image for s in batch_samples], [s.prompt for s in batch_samples], completions
            ).logprobs,
            old,
            advantages,
            mask,
            epsilon=config.epsilon,
            beta=config.beta,
            ref_logprobs=ref,
            loss_type=loss_type,
        )
        our_grads = torch.autograd.grad(out.loss, params, allow_unused=True)
        metrics = trainer._metrics["train"]
        assert torch.allclose(trl_loss, out.loss, atol=1e-6), (float(trl_loss), float(out.loss))
        assert metrics["kl"][-1] == pytest.approx(out.kl, abs=1e-6) and out.kl > 0
        assert metrics["clip_ratio/region_mean"][-1] == pytest.approx(out.clip_fraction, abs=1e-6)
        assert 0 < out.clip_fraction < 1
        compared = 0
        for theirs, mine in zip(trl_grads, our_grads, strict=True):
            if theirs is None and mine is None:
                continue
            assert torch.allclose(theirs, mine, atol=1e-6, rtol=1e-4)
            compared += 1
        assert compared > 0
    finally:
        trainer.remove_hook()


def test_generation_layout_fills_trl_batches():
    layout = generation_layout(GRPOConfig(batch_size=4, group_size=8, micro_batch_size=12), n_samples=10)
    assert layout["per_device_train_batch_size"] * layout["gradient_accumulation_steps"] == 32
    assert layout["per_device_train_batch_size"] == 8 and layout["steps_per_generation"] == 4
    assert generation_layout(GRPOConfig(batch_size=4, group_size=2), n_samples=1)["per_device_train_batch_size"] == 2


def short_answers(prompts, completions, **columns):
    """Trivially learnable: 1 for an answer that stops at once, falling to 0 for one that runs to the limit."""
    return [1.0 - min(len(str(c[-1]["content"] if isinstance(c, list) else c)), 24) / 24 for c in completions]


def mean_short_reward(backend, samples):
    answers = backend.generate(
        [s.image for s in samples],
        [s.prompt for s in samples],
        n=8,
        sampling=SamplingConfig(do_sample=True, max_new_tokens=8, seed=5),
    )
    return float(np.mean(short_answers(None, [a for group in answers for a in group])))


def test_short_trl_run_raises_a_learnable_reward(tiny_path, samples, tmp_path):
    """The random tiny model's next-token distribution is near uniform and its final norm caps how far LoRA alone
    moves it (neither loop raises this reward in 12 steps then); with the LM head trainable it is learnable."""
    backend = EVLFBackend.from_pretrained(str(tiny_path), extra_trainable="lm_head")
    before = mean_short_reward(backend, samples[:4])
    config = GRPOConfig(steps=10, batch_size=2, group_size=8, learning_rate=0.2, beta=0.0, max_new_tokens=8)
    history = train_grpo_trl(backend, samples[:4], [short_answers], config, options(tmp_path))
    after = mean_short_reward(backend, samples[:4])
    assert len(history) == 10 and all("reward" in h for h in history)
    assert after > before + 0.2, (before, after)
    assert "forward" not in backend.model.__dict__  # TRL's fused-head patch is gone


def test_trl_adapter_goes_through_the_registry_and_serves(tiny_path, samples, tmp_path):
    backend = EVLFBackend.from_pretrained(str(tiny_path))
    registry = AdapterRegistry(tmp_path / "adapters", "tiny")
    stage = GRPOStage(
        GRPOConfig(steps=2, batch_size=2, group_size=2, learning_rate=0.05, max_new_tokens=8),
        trainer="trl",
        trl=options(tmp_path),
    )
    result = finetune_adapter(backend, samples[:4], samples[4:], registry, [stage], max_new_tokens=16)
    assert result.promoted and registry.load_promoted().name == result.version.name
    assert result.version.meta["config"]["grpo"]["trainer"] == "trl"
    assert (result.version.path / "adapter_model.safetensors").is_file()
    assert not (result.version.path / "ref").exists()  # TRL's reference copy is not part of the adapter
    served = EVLFBackend.from_pretrained(str(tiny_path), adapter=result.version.path)
    trained = {k: v.detach() for k, v in backend._adapter_state().items()}
    for name, value in served._adapter_state().items():
        assert torch.equal(value.detach(), trained[name]), name
    assert any(not torch.equal(v, served._initial_state[k]) for k, v in trained.items())  # GRPO moved it
    prompt = [samples[0].prompt]
    answer = served.generate([samples[0].image], prompt, sampling=SamplingConfig(max_new_tokens=16))
    assert answer == backend.generate([samples[0].image], prompt, sampling=SamplingConfig(max_new_tokens=16))
    assert isinstance(answer[0][0], str)
