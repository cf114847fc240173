"""One annotation-loop round on the tiny EVLF backend: samples -> SFT + GRPO -> versioned adapter -> gate -> eval."""

import json

import numpy as np
import pytest

from monailabel_evlf.data.phantoms import make_phantom
from monailabel_evlf.model.backends.evlf import EVLFBackend
from monailabel_evlf.model.tiny import build_tiny_evlf
from monailabel_evlf.training.adapters import AdapterRegistry
from monailabel_evlf.training.config import GRPOConfig, SFTConfig
from monailabel_evlf.training.evaluate import evaluate
from monailabel_evlf.training.finetune import finetune_adapter
from monailabel_evlf.training.samples import SampleOptions, phantom_samples


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_evlf(path, image_size=32, hidden_size=32, num_layers=1, pixel_pool=1)
    return EVLFBackend.from_pretrained(str(path))


@pytest.fixture(scope="module")
def samples(backend):
    options = SampleOptions(box_codec=backend.box_codec, size=(48, 48), tasks=("grounding", "diagnosis", "vqa"))
    phantom = make_phantom(1, shape=(40, 40, 12), n_lesions=2, study_id="p1")
    return phantom_samples(phantom.image, phantom.affine, phantom.ground_truth, options, normal_slices=1)


def test_finetune_versions_gates_and_restores(backend, samples, tmp_path):
    registry = AdapterRegistry(tmp_path, "tiny")
    sft, grpo = SFTConfig(epochs=1, batch_size=4), GRPOConfig(steps=1, batch_size=2, group_size=2, max_new_tokens=8)
    calls = []
    first = finetune_adapter(
        backend,
        samples[1::2][:4],
        samples[::2],
        registry,
        sft=sft,
        grpo=grpo,
        callback=lambda *a: calls.append(a[:2]),
        max_new_tokens=16,
    )
    assert first.promoted and first.version.name == "v0001" and first.baseline_metrics is None
    assert set(first.history) == {"sft", "grpo"} and calls[-1] == (1, 1)
    assert registry.load_promoted().name == "v0001"
    assert json.loads((first.version.path / "meta.json").read_text())["config"]["grpo"]["group_size"] == 2
    promoted_weights = {k: v.clone() for k, v in backend._adapter_state().items()}

    # a gate that demands an improvement of 0.5 cannot be met: v0002 is kept on disk but not promoted,
    # and the backend goes back to serving v0001's weights
    second = finetune_adapter(
        backend, samples[1::2][:4], samples[::2], registry, sft=sft, tolerance=-0.5, max_new_tokens=16
    )
    assert not second.promoted and second.version.meta["parent"] == "v0001"
    assert second.baseline_metrics is not None
    assert registry.load_promoted().name == "v0001"
    for name, value in backend._adapter_state().items():
        assert np.allclose(value.detach().numpy(), promoted_weights[name].detach().numpy())


def test_finetune_needs_a_stage_and_held_out(backend, samples, tmp_path):
    registry = AdapterRegistry(tmp_path, "tiny")
    with pytest.raises(ValueError, match="nothing to train"):
        finetune_adapter(backend, samples, samples, registry)
    with pytest.raises(ValueError, match="held-out"):
        finetune_adapter(backend, samples, [], registry, sft=SFTConfig(epochs=1))


def test_evaluate_reports_every_task(backend, samples, tmp_path):
    backend.load_adapter(None)
    report = evaluate(backend, samples, consistency_variants=1, max_new_tokens=16)
    flat = report.flat()
    for key in ("accuracy", "macro_f1", "acc@0.1", "acc@0.3", "acc@0.5", "miou", "closed_accuracy"):
        assert 0.0 <= flat[key] <= 1.0
    assert "all_variants_agree" in flat and len(report.predictions) == len(samples)
    paths = report.save(tmp_path / "eval")
    assert json.loads(paths["json"].read_text())["grounding"]["miou"] == flat["miou"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "acc@0.5" in paths["text"].read_text()


def test_methods_map_to_stage_lists_and_stages_run_in_order(backend, samples, tmp_path):
    """The app's method names are stage lists; finetune_adapter runs a given list in order, each stage once."""
    from monailabel_evlf.training.config import DetectorConfig
    from monailabel_evlf.training.finetune import DetectorStage, GRPOStage, SFTStage, method_stages

    stages = method_stages("sft+grpo", sft=SFTConfig(epochs=1), detector=DetectorConfig(steps=1))
    assert [type(s) for s in stages] == [DetectorStage, SFTStage, GRPOStage]
    assert [s.name for s in method_stages("grpo")] == ["grpo"]
    with pytest.raises(ValueError, match="unknown training method"):
        method_stages("rlhf")
    with pytest.raises(ValueError, match="trainer must be one of"):
        SFTStage(SFTConfig(), trainer="deepspeed")
    registry = AdapterRegistry(tmp_path, "tiny")
    with pytest.raises(ValueError, match="once per round"):
        finetune_adapter(backend, samples, samples, registry, [SFTStage(SFTConfig()), SFTStage(SFTConfig())])
    with pytest.raises(ValueError, match="not both"):
        finetune_adapter(backend, samples, samples, registry, method_stages("sft"), sft=SFTConfig())
    sft_then_grpo = [
        SFTStage(SFTConfig(epochs=1, batch_size=4)),
        method_stages("grpo", grpo=GRPOConfig(steps=1, batch_size=2, group_size=2, max_new_tokens=8))[0],
    ]
    result = finetune_adapter(backend, samples[1::2][:4], samples[::2], registry, sft_then_grpo, max_new_tokens=16)
    assert list(result.history) == ["sft", "grpo"]
    assert result.version.meta["config"]["sft"]["trainer"] == "compact"
