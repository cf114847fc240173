"""TRL's GRPOTrainer on the tiny EVLF backend: its loss equals ours term for term, a short run learns, and the
adapter it trains goes through the registry and serves."""

import importlib.util

import numpy as np
import pytest
import torch

from monailabel_evlf.data.phantoms import make_phantom
from monailabel_evlf.model import load_backend
from monailabel_evlf.model.backend import SamplingConfig
from monailabel_evlf.model.backends.evlf import EVLFBackend
from monailabel_evlf.training.adapters import AdapterRegistry
from monailabel_evlf.training.config import GRPOConfig, TRLConfig
from monailabel_evlf.training.finetune import GRPOStage, finetune_adapter, grounding_rewards
from monailabel_evlf.training.grpo_math import group_advantages, grpo_loss
from monailabel_evlf.training.samples import SampleOptions, phantom_samples
from monailabel_evlf.training.trl_grpo import build_grpo_trainer, generation_layout, train_grpo_trl

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def samples(tiny_path):
    backend = EVLFBackend.from_pretrained(str(tiny_path))
    options = SampleOptions(box_codec=backend.box_codec, size=(48, 48), tasks=("grounding",))
    phantom = make_phantom(1, shape=(40, 40, 12), n_lesions=2, study_id="p1")
    return phantom_samples(phantom.image, phantom.affine, phantom.ground_truth, options, normal_slices=1)


def options(tmp_path):
    return TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none")


def perturbed_backend(model, tiny_path):
    """A tiny backend with a LoRA that is not zero, so the policy differs from the reference (KL > 0)."""
    if model == "evlf":
        backend = EVLFBackend.from_pretrained(str(tiny_path))
    else:
        backend = load_backend(model.removeprefix("tiny-"), model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in backend.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return backend


def backend_samples(backend):
    options = SampleOptions(box_codec=backend.box_codec, size=(48, 48), tasks=("grounding",))
    phantom = make_phantom(1, shape=(40, 40, 12), n_lesions=2, study_id="p1")
    return phantom_samples(phantom.image, phantom.affine, phantom.ground_truth, options, normal_slices=1)


def fixed_batch(backend, samples, completions, advantages):
    """The batch dict ``GRPOTrainer._compute_loss`` reads, built from the backend's own tokenisation:
    ``[left-padded prompt | completion + end-of-turn, right-padded]`` as ``completion_logprobs`` lays it out; the
    processor's image outputs as they are, per-token ones (``mm_token_type_ids``) extended with zeros."""
    inputs = backend.model_inputs([s.image for s in samples], [s.prompt for s in samples])
    end = backend.end_of_turn_id()
    encoded = [backend.tokenizer(c, add_special_tokens=False)["input_ids"] + [end] for c in completions]
    length = max(len(ids) for ids in encoded)
    completion_ids = torch.full((len(encoded), length), backend.tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1
    images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for key, value in images.items():
        if isinstance(value, torch.Tensor) and value.shape == inputs["input_ids"].shape:
            images[key] = torch.cat([value, torch.zeros_like(completion_ids)], dim=1)
    return {
        "prompt_ids": inputs["input_ids"],
        "prompt_mask": inputs["attention_mask"],
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        **images,
        "num_images": [1] * len(samples),
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum(),
    }


@pytest.mark.parametrize(
    ("model", "loss_type"),
    [("evlf", "grpo"), ("evlf", "bnpo"), ("tiny-qwen2_5_vl", "grpo"), ("tiny-qwen3_vl", "bnpo")],
)
def test_trl_loss_equals_ours_term_for_term(tiny_path, tmp_path, model, loss_type):
    backend = perturbed_backend(model, tiny_path)
    samples = backend_samples(backend)
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
        keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch")
        row_inputs = {k: v for k, v in inputs.items() if k not in keep}
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
    # The answer rewards are 0 for every answer of a random tiny model (no spread: GRPO would not move); the
    # length reward spreads within a group, so the adapter that goes through the registry is a trained one.
    stage = GRPOStage(
        GRPOConfig(steps=2, batch_size=2, group_size=4, learning_rate=0.05, max_new_tokens=8),
        reward_funcs=[short_answers],
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
    # both start from the same seeded LoRA init (lora_seed), so this compares trained with untrained weights
    assert any(not torch.equal(v, served._initial_state[k]) for k, v in trained.items())  # GRPO moved it
    prompt = [samples[0].prompt]
    answer = served.generate([samples[0].image], prompt, sampling=SamplingConfig(max_new_tokens=16))
    assert answer == backend.generate([samples[0].image], prompt, sampling=SamplingConfig(max_new_tokens=16))
    assert isinstance(answer[0][0], str)


def test_trl_checkpoints_resume_and_tensorboard(tiny_path, samples, tmp_path):
    """save_steps writes checkpoint-N folders; "latest" resumes from the newest (its steps are not re-run); the
    rewards reach TensorBoard when it is installed."""
    config = GRPOConfig(steps=2, batch_size=2, group_size=2, learning_rate=0.05, max_new_tokens=8)
    run = TRLConfig(output_dir=str(tmp_path / "trl"), save_steps=1, save_total_limit=None)
    first = EVLFBackend.from_pretrained(str(tiny_path))
    train_grpo_trl(first, samples[:4], grounding_rewards(), config, run)
    checkpoints = sorted(p.name for p in (tmp_path / "trl" / "grpo").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    assert (tmp_path / "trl" / "grpo" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    second = EVLFBackend.from_pretrained(str(tiny_path))
    longer = GRPOConfig(**{**config.__dict__, "steps": 3})
    resumed = TRLConfig(**{**run.__dict__, "resume_from_checkpoint": "latest", "log_completions": True})
    history = train_grpo_trl(second, samples[:4], grounding_rewards(), longer, resumed)
    assert [h["step"] for h in history] == [3]
    if importlib.util.find_spec("tensorboard") is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags = set()
        for events in (tmp_path / "trl" / "grpo").rglob("events.out.tfevents.*"):
            accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0, "scalars": 0})
            accumulator.Reload()
            tags |= set(accumulator.Tags()["scalars"]) | set(accumulator.Tags()["tensors"])
        assert {"train/reward", "train/rewards/grounding_reward/mean", "completions/text_summary"} <= tags, tags
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        train_grpo_trl(
            second, samples[:4], grounding_rewards(), config, TRLConfig(resume_from_checkpoint=str(tmp_path / "nope"))
        )


def test_vllm_generation_is_refused_clearly_where_it_cannot_run(tiny_path, samples, tmp_path):
    """EVLF is no vLLM model; a Qwen backend without the vllm package gets an ImportError that says what to do."""
    config = GRPOConfig(steps=1, batch_size=2, group_size=2, max_new_tokens=8)
    run = TRLConfig(use_vllm=True, output_dir=str(tmp_path))
    evlf = EVLFBackend.from_pretrained(str(tiny_path))
    with pytest.raises(ValueError, match="vLLM has no EVLF model"):
        train_grpo_trl(evlf, samples[:4], grounding_rewards(), config, run)
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    qwen = load_backend("qwen2_5_vl", "tiny-qwen2_5_vl")
    with pytest.raises(ImportError, match="pip install vllm"):
        train_grpo_trl(qwen, backend_samples(qwen)[:4], grounding_rewards(), config, run)


def test_evlf_train_with_the_trl_trainer(tmp_path):
    """`evlf train --trainer trl` end to end on the tiny preset: SFT then GRPO with TRL, one folder of
    checkpoints per stage, a gated adapter version whose meta says which trainer made it."""
    import json

    from monailabel_evlf.cli import main

    for name, seed in (("train", 1), ("held", 2)):
        assert (
            main(
                ["make-sample-data", str(tmp_path / name), "--n", "1", "--shape", "40", "40", "12", "--seed", str(seed)]
            )
            == 0
        )
    config = tmp_path / "small.yaml"
    config.write_text(
        "sft: {epochs: 1, batch_size: 4}\n"
        "grpo: {steps: 1, batch_size: 2, group_size: 2, max_new_tokens: 8}\n"
        f"trl: {{output_dir: {tmp_path / 'runs'}, save_steps: 1, report_to: none}}\n"
    )
    args = ["train", "--trainer", "trl", "--model", "tiny", "--data", str(tmp_path / "train")]
    args += ["--held-out", str(tmp_path / "held"), "--config", str(config), "--stages", "sft", "grpo"]
    args += ["--registry", str(tmp_path / "adapters"), "--tasks", "grounding", "--size", "48", "48"]
    assert main(args) == 0
    for stage in ("sft", "grpo"):
        assert list((tmp_path / "runs" / stage).glob("checkpoint-*/adapter_model.safetensors")), stage
    meta = json.loads((tmp_path / "adapters" / "tiny" / "v0001" / "meta.json").read_text())
    assert meta["config"]["sft"]["trainer"] == "trl" and meta["config"]["grpo"]["trainer"] == "trl"


def test_trl_extra_cannot_override_a_mapped_setting(tiny_path, samples, tmp_path):
    backend = EVLFBackend.from_pretrained(str(tiny_path))
    run = TRLConfig(output_dir=str(tmp_path), extra={"num_generations": 4})
    with pytest.raises(ValueError, match="come from the sft / grpo sections"):
        build_grpo_trainer(backend, samples, grounding_rewards(), GRPOConfig(group_size=2), run)
