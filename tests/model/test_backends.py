"""Every backend on its tiny model: generate, completion log-probs, reference policy, trainable set, adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monailabel_evlf.model import load_backend
from monailabel_evlf.model.backend import BACKENDS, SamplingConfig, VLMBackend
from monailabel_evlf.model.backends.base import parse_options
from monailabel_evlf.model.backends.evlf import EVLFBackend
from monailabel_evlf.model.backends.qwen2_5_vl import Qwen25VLBackend
from monailabel_evlf.model.backends.qwen3_vl import Qwen3VLBackend
from monailabel_evlf.tasks.box_codec import BoxConvention

KINDS = {
    "evlf": (EVLFBackend, BoxConvention.NORMALIZED_100),
    "qwen2_5_vl": (Qwen25VLBackend, BoxConvention.ABSOLUTE_MODEL_INPUT),
    "qwen3_vl": (Qwen3VLBackend, BoxConvention.NORMALIZED_1000),
}
PROMPTS = ["Where is the lesion?", "What is the most likely diagnosis? Answer briefly."]
COMPLETIONS = ['<think>round</think><answer>{"label": "cyst", "bbox_2d": [10, 20, 30, 40]}</answer>', "no"]


@pytest.fixture(params=sorted(KINDS))
def backend(request, tiny_dirs) -> VLMBackend:
    return load_backend(request.param, str(tiny_dirs[request.param]))


def perturb_adapter(backend) -> None:
    """Give LoRA B matrices and connectors non-zero changes, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)


def test_backends_are_registered_and_satisfy_the_protocol(backend):
    cls, convention = next(v for v in KINDS.values() if isinstance(backend, v[0]) and type(backend) is v[0])
    assert isinstance(backend, VLMBackend)
    assert backend.box_codec.convention is convention
    assert BACKENDS[next(k for k, v in KINDS.items() if v[0] is cls)].endswith(cls.__name__)


def test_generate_returns_n_answers_per_pair(backend, rgb_images):
    sampled = backend.generate(
        rgb_images, PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=6, do_sample=True, seed=0)
    )
    assert [len(a) for a in sampled] == [3, 3] and all(isinstance(t, str) for a in sampled for t in a)
    again = backend.generate(
        rgb_images, PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=6, do_sample=True, seed=0)
    )
    assert sampled == again  # seeded sampling is reproducible
    greedy = backend.generate(rgb_images, PROMPTS, n=2, sampling=SamplingConfig(max_new_tokens=6))
    assert [len(a) for a in greedy] == [2, 2] and greedy[0][0] == greedy[0][1]
    assert backend.generate([], []) == []
    with pytest.raises(ValueError, match="images for"):
        backend.generate(rgb_images, PROMPTS[:1])


def test_completion_logprobs_shape_mask_and_gradients(backend, rgb_images):
    tokenizer = backend.tokenizer
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in COMPLETIONS]  # + end of turn
    backend.train()
    out = backend.completion_logprobs(rgb_images, PROMPTS, COMPLETIONS)
    backend.eval()
    assert out.logprobs.shape == (2, max(lengths))
    assert out.mask.sum(dim=1).tolist() == lengths
    assert (out.logprobs[out.mask] < 0).all() and (out.logprobs[~out.mask] == 0).all()
    out.logprobs.sum().backward()
    grads = [p.grad for p in backend.trainable_parameters()]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_left_padding_does_not_change_log_probs(backend, rgb_images):
    """A prompt alone and the same prompt padded beside a longer one score a completion identically."""
    alone = backend.completion_logprobs(rgb_images[:1], PROMPTS[:1], COMPLETIONS[:1])
    batched = backend.completion_logprobs(rgb_images, [*PROMPTS[:1], PROMPTS[1] * 3], COMPLETIONS[:1] * 2)
    n = int(alone.mask.sum())
    torch.testing.assert_close(alone.logprobs[0, :n], batched.logprobs[0, :n], atol=1e-4, rtol=1e-4)


def test_trainable_parameters_are_exactly_lora_and_connectors(backend):
    names = [n for n, p in backend.peft_model.named_parameters() if p.requires_grad]
    connectors = {"evlf": ("disease_connector", "pixel_connector")}.get(
        next(k for k, v in KINDS.items() if type(backend) is v[0]), ("merger",)
    )
    assert names
    for name in names:
        assert ".lora_" in name or any(f".{c}.modules_to_save." in name for c in connectors), name
        if ".lora_" in name:
            assert "language_model" in name and any(
                f".{p}.lora_" in name for p in ("q_proj", "k_proj", "v_proj", "o_proj")
            )
    for connector in connectors:
        assert any(f".{connector}.modules_to_save." in n for n in names), connector
    frozen = [n for n, p in backend.peft_model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen)  # the LLM itself stays frozen


def test_reference_policy_disables_lora_and_connectors(backend, rgb_images):
    before = backend.completion_logprobs(rgb_images, PROMPTS, COMPLETIONS).logprobs.detach()
    perturb_adapter(backend)
    with torch.no_grad():
        tuned = backend.completion_logprobs(rgb_images, PROMPTS, COMPLETIONS).logprobs
        with backend.reference_policy():
            reference = backend.completion_logprobs(rgb_images, PROMPTS, COMPLETIONS).logprobs
    assert not torch.allclose(tuned, before)
    torch.testing.assert_close(reference, before)


def test_save_and_load_adapter_round_trip(backend, rgb_images, tmp_path):
    base = backend.completion_logprobs(rgb_images, PROMPTS, COMPLETIONS).logprobs.detach()
    perturb_adapter(backend)
    tuned = backend.completion_logprobs(rgb_images, PROMPTS, COMPLETIONS).logprobs.detach()
    backend.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    backend.load_adapter(None)
    torch.testing.assert_close(backend.completion_logprobs(rgb_images, PROMPTS, COMPLETIONS).logprobs.detach(), base)
    backend.load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(backend.completion_logprobs(rgb_images, PROMPTS, COMPLETIONS).logprobs.detach(), tuned)


def test_adapter_given_at_load_time(tiny_dirs, rgb_images, tmp_path):
    backend = load_backend("evlf", str(tiny_dirs["evlf"]))
    perturb_adapter(backend)
    tuned = backend.completion_logprobs(rgb_images, PROMPTS, COMPLETIONS).logprobs.detach()
    backend.save_adapter(tmp_path)
    fresh = load_backend("evlf", str(tiny_dirs["evlf"]), adapter=str(tmp_path))
    torch.testing.assert_close(fresh.completion_logprobs(rgb_images, PROMPTS, COMPLETIONS).logprobs.detach(), tuned)


def test_mismatched_or_missing_adapter_is_refused(tiny_dirs, tmp_path):
    backend = load_backend("evlf", str(tiny_dirs["evlf"]))
    with pytest.raises(ValueError, match="not an adapter directory"):
        backend.load_adapter(tmp_path)
    other = load_backend("evlf", str(tiny_dirs["evlf"]), lora_r="4")  # --conf values arrive as strings
    other.save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
    with pytest.raises(ValueError, match="r=4"):
        backend.load_adapter(tmp_path)


def test_evlf_accepts_grayscale_16_bit_and_float_slices(tiny_dirs):
    backend = load_backend("evlf", str(tiny_dirs["evlf"]))
    gray = np.linspace(0, 1, 48 * 48, dtype=np.float32).reshape(48, 48)
    images = [gray, (gray * 65535).astype(np.uint16), (gray * 255).astype(np.uint8)]
    out = backend.completion_logprobs(images, ["x"] * 3, ["cyst"] * 3).logprobs
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[0], out[2], atol=2e-2, rtol=1e-2)  # uint8 quantisation
    with pytest.raises(ValueError, match="window"):
        backend.generate([np.full((8, 8), 300.0, dtype=np.float32)], ["x"])


def test_qwen_model_input_size_follows_smart_resize(tiny_dirs):
    backend = load_backend("qwen2_5_vl", str(tiny_dirs["qwen2_5_vl"]))
    # factor 28, at most 56*56 px: 90 x 40 -> round to 84 x 28 (2352 px, within bounds)
    assert backend.model_input_size((90, 40)) == (84, 28)
    # 64 x 64 rounds to 56 x 56 = 3136 px, exactly the maximum
    assert backend.model_input_size((64, 64)) == (56, 56)
    # 120 x 30 rounds to 112 x 28 = 3136 px; 130 x 30 rounds to 140 x 28 = 3920 > 3136, so it is scaled down by
    # sqrt(3900 / 3136) = 1.1152 and floored: 130 / 1.1152 = 116.6 -> 112, 30 / 1.1152 = 26.9 -> 0 -> at least 28
    assert backend.model_input_size((120, 30)) == (112, 28)
    assert backend.model_input_size((130, 30)) == (112, 28)
    # the codec it hands out binds that resize to each image: answers are pixels of the 84 x 28 picture
    codec = backend.box_codec.for_image((90, 40))
    assert codec.model_input_size == (84, 28)
    assert codec.to_pixels([42, 14, 84, 28]) == pytest.approx((45.0, 20.0, 90.0, 40.0))


def test_presets_build_tiny_models_on_the_fly():
    backend = load_backend("evlf", "tiny")
    assert isinstance(backend, EVLFBackend)
    assert isinstance(load_backend("evlf", "tiny-qwen3_vl"), Qwen3VLBackend)  # the preset's backend wins


def test_custom_backend_by_import_path():
    backend = load_backend("tests.model.custom_backend:EchoBackend", "my-model", greeting="hi")
    assert backend.model_id == "my-model"
    assert backend.generate([np.zeros((4, 4, 3), np.uint8)], ["q"], n=2) == [
        ["<think>hi</think><answer>q</answer>"] * 2
    ]


@pytest.mark.parametrize("name", ["no_such_backend", "tests.model.custom_backend:Missing", "no_module_xyz:Cls"])
def test_bad_backend_name_is_a_value_error_naming_it(name):
    with pytest.raises(ValueError, match=name.split(":")[0]):
        load_backend(name, "my-model")


def test_bad_options_and_missing_models_are_value_errors(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="unknown backend option"):
        load_backend("evlf", str(tiny_dirs["evlf"]), lora_rank=4)
    with pytest.raises(ValueError, match="dtype"):
        load_backend("evlf", str(tiny_dirs["evlf"]), dtype="float64x")
    with pytest.raises(ValueError, match="cannot load model"):
        load_backend("evlf", str(tmp_path / "nothing-here"))


def test_boolean_backend_options_use_the_shared_parser():
    assert parse_options({"local_files_only": "off"}) == {"local_files_only": False}
    assert parse_options({"local_files_only": "Yes"}) == {"local_files_only": True}
    with pytest.raises(ValueError, match=r"backend\.local_files_only must be a boolean \(true/false.*got 'sometimes'"):
        parse_options({"local_files_only": "sometimes"})


def test_lora_starts_from_its_seed_whatever_ran_before(tiny_dirs):
    """The adapter's random start (LoRA A) comes from ``lora_seed``, not from torch's global stream: the app's train
    child and a rerun of the same corrections start from the same weights (they did not, and the app's learning lift
    varied run to run); another seed gives another start, and the global stream is left as it was."""

    def start(**options) -> dict[str, torch.Tensor]:
        torch.manual_seed(int(torch.randint(0, 1000, ()).item()) + 1)  # whatever happened earlier in the process
        backend = EVLFBackend.from_pretrained(str(tiny_dirs["evlf"]), **options)
        return {k: v for k, v in backend._adapter_state().items() if "lora_A" in k}

    first, again, other = start(), start(), start(lora_seed="7")
    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    EVLFBackend.from_pretrained(str(tiny_dirs["evlf"]))
    assert torch.equal(torch.rand(3), expected)
