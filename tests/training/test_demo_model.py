"""The demo-model recipe: merged checkpoints equal the trained adapter model; number tokens start smooth; which
slices train."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from monailabel_evlf.model.backends.evlf import EVLFBackend
from monailabel_evlf.model.tiny import build_tiny_evlf
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention
from monailabel_evlf.training.commands import CONFIG_DIR
from monailabel_evlf.training.demo_model import (
    DemoData,
    _save_merged,
    load_demo_config,
    phantom_split,
    smooth_number_embeddings,
)
from monailabel_evlf.training.samples import SampleOptions


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_evlf(path, image_size=32, hidden_size=32, num_layers=1, pixel_pool=1, train_encoders=True)
    return path


def test_merged_checkpoint_answers_like_the_trained_adapter(tiny_dir, tmp_path):
    backend = EVLFBackend.from_pretrained(str(tiny_dir))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: move every trainable weight (LoRA, connectors, encoders)
        for parameter in backend.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    completion = '<think>Cyst in the liver.</think><answer>{"label": "cyst", "bbox_2d": [1, 2, 30, 40]}</answer>'
    with torch.no_grad():
        trained = backend.completion_logprobs([image], ["Locate the cyst."], [completion]).logprobs
        with backend.reference_policy():
            base = backend.completion_logprobs([image], ["Locate the cyst."], [completion]).logprobs
    _save_merged(backend, tmp_path / "merged")
    merged = EVLFBackend.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        reloaded = merged.completion_logprobs([image], ["Locate the cyst."], [completion]).logprobs
    assert not torch.allclose(trained, base, atol=1e-3)  # the perturbation mattered
    torch.testing.assert_close(reloaded, trained, atol=1e-4, rtol=1e-4)


def test_number_embeddings_become_smooth(tiny_dir):
    backend = EVLFBackend.from_pretrained(str(tiny_dir))
    model, tokenizer = backend.peft_model.base_model.model, backend.tokenizer
    smooth_number_embeddings(model, tokenizer)
    ids = tokenizer.convert_tokens_to_ids([str(n) for n in range(101)])
    rows = torch.nn.functional.normalize(model.get_input_embeddings().weight[ids], dim=1)
    near = (rows[:-1] * rows[1:]).sum(1).mean()
    far = (rows[:-50] * rows[50:]).sum(1).mean()
    assert near > 0.8 and near > far + 0.3


def test_committed_recipes_parse():
    demo = load_demo_config(CONFIG_DIR / "demo.yaml")
    assert demo.detector is not None and demo.model["num_proposals"] > 0
    assert set(demo.data.tasks) == {"grounding", "diagnosis", "vqa"}
    from monailabel_evlf.training.learning_loop import load_learning_loop_config

    bench = load_learning_loop_config(CONFIG_DIR / "learning-loop.yaml")
    assert bench.window != demo.data.window  # the benchmark's shift is a window the demo model never saw


def test_demo_config_rejects_unknown_sections(tmp_path):
    (tmp_path / "bad.yaml").write_text("pretrain: {epochs: 1}\nfinetune: {}\n")
    with pytest.raises(ValueError, match="finetune"):
        load_demo_config(tmp_path / "bad.yaml")


def test_answers_with_several_boxes_are_repeated_in_training_only_and_only_on_request():
    once = DemoData(train_studies=4, held_out_studies=4, seed=0, normal_slices=0)  # train_003 has two-box slices
    thrice = replace(once, multi_box_repeat=3)
    options = SampleOptions(box_codec=BoxCodec(BoxConvention.NORMALIZED_100), size=(32, 32), tasks=("grounding",))
    base, repeated = phantom_split(once, options, "train"), phantom_split(thrice, options, "train")
    multi = [s for s in base if len(s.boxes) > 1]
    assert multi and len(repeated) == len(base) + 2 * len(multi)
    assert all(len(s.boxes) > 1 for s in repeated[len(base) :])
    assert len(phantom_split(thrice, options, "held_out")) == len(phantom_split(once, options, "held_out"))
    with pytest.raises(ValueError, match="multi_box_repeat"):
        DemoData(multi_box_repeat=0)


def test_lesion_caps_join_the_training_slices_only_and_only_on_request():
    central = DemoData(train_studies=2, held_out_studies=2, seed=3, normal_slices=0)
    every = replace(central, train_min_area_fraction=0.0)
    options = SampleOptions(box_codec=BoxCodec(BoxConvention.NORMALIZED_100), size=(32, 32), tasks=("diagnosis",))
    count = {name: {split: len(phantom_split(data, options, split)) for split in ("train", "held_out")}
             for name, data in (("central", central), ("every", every))}  # fmt: skip
    assert count["every"]["train"] > count["central"]["train"] > 0
    assert count["every"]["held_out"] == count["central"]["held_out"] > 0  # the slice benchmark keeps its slices
