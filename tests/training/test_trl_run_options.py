"""TRL run options the loss and learning tests leave out: the bf16 and gradient-checkpointing switches train and
are undone afterwards, the accelerate configs in configs/accelerate load as accelerate reads them, and
`evlf train --trainer trl` runs under `accelerate launch` (one CPU process, the path docs/training.md says runs
here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monailabel_evlf.data.phantoms import make_phantom
from monailabel_evlf.model.backends.evlf import EVLFBackend
from monailabel_evlf.paths import configs_dir
from monailabel_evlf.training import trl_grpo, trl_sft
from monailabel_evlf.training.config import GRPOConfig, SFTConfig, TRLConfig
from monailabel_evlf.training.samples import SampleOptions, phantom_samples

pytest.importorskip("trl")


def alternating_reward(prompts, completions, **_):
    """0, 1, 0, 1, ...: each group of two (TRL puts a prompt's completions next to each other) has one of each, so
    every advantage is +-1 and the step moves the adapter (the tiny random model's grounding rewards are all 0)."""
    return [float(i % 2) for i in range(len(completions))]


def autocast_in_layer_forwards(backend, samples):
    """Whether CPU autocast is on inside the decoder layers when the peft model (what TRL trains) runs a forward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layer = next(m for m in backend.model.modules() if isinstance(m, GradientCheckpointingLayer))
    seen = []
    hook = layer.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        inputs = backend.model_inputs([s.image for s in samples[:1]], [s.prompt for s in samples[:1]])
        with torch.no_grad():
            backend.peft_model(**inputs)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_bf16_and_gradient_checkpointing_train_and_are_undone_after(stage, tiny_path, tmp_path, monkeypatch):
    """Both switches reach TRL's config and take effect: the decoder layers run through activation checkpointing
    under bf16 autocast, the loss is finite and the adapter moves. Afterwards the backend is as TRL found it: no
    checkpointing, and the peft model's forward no longer wrapped in accelerate's autocast (a later run without
    --bf16 on the same backend would otherwise still train in bf16)."""
    import transformers.modeling_utils

    backend = EVLFBackend.from_pretrained(str(tiny_path))
    options = SampleOptions(box_codec=backend.box_codec, size=(48, 48), tasks=("grounding",))
    phantom = make_phantom(1, shape=(40, 40, 12), n_lesions=2, study_id="p1")
    samples = phantom_samples(phantom.image, phantom.affine, phantom.ground_truth, options, normal_slices=1)[:4]
    assert autocast_in_layer_forwards(backend, samples) == [False]

    # transformers binds torch.utils.checkpoint.checkpoint into modeling_utils at import: count the calls there
    checkpointed = []
    original = transformers.modeling_utils.checkpoint

    def counted(function, *args, **kwargs):
        checkpointed.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)
    args = []
    module, name = (trl_sft, "trl_sft_args") if stage == "sft" else (trl_grpo, "trl_grpo_args")
    build_args = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: args.append(build_args(*a, **k)) or args[-1])

    before = {k: v.detach().clone() for k, v in backend._adapter_state().items()}
    run = TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=True, gradient_checkpointing=True)
    if stage == "sft":
        config = SFTConfig(epochs=1, batch_size=2, learning_rate=0.05, warmup_ratio=0.0)
        history = trl_sft.train_sft_trl(backend, samples, config, run)
    else:
        config = GRPOConfig(steps=1, batch_size=2, group_size=2, learning_rate=0.05, max_new_tokens=8)
        history = trl_grpo.train_grpo_trl(backend, samples, [alternating_reward], config, run)

    assert args[0].bf16 and args[0].gradient_checkpointing
    assert history and all(torch.isfinite(torch.tensor(log["loss"])) for log in history)
    assert checkpointed and set(checkpointed) == {torch.bfloat16}, checkpointed
    after = backend._adapter_state()
    assert any(not torch.equal(after[k], v) for k, v in before.items()), "the step did not move the adapter"
    assert not backend.model.is_activation_checkpointing
    assert autocast_in_layer_forwards(backend, samples) == [False]
    assert "forward" not in backend.peft_model.__dict__ and "forward" not in backend.model.__dict__


@pytest.mark.parametrize(
    ("name", "distributed", "zero_stage"),
    [("multi-gpu.yaml", "MULTI_GPU", None), ("deepspeed-zero2.yaml", "DEEPSPEED", 2)],
)
def test_accelerate_configs_load_as_accelerate_reads_them(name, distributed, zero_stage):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(configs_dir() / "accelerate" / name))
    assert config.distributed_type.name == distributed
    assert config.mixed_precision == "bf16" and config.num_machines == 1 and not config.use_cpu
    if zero_stage is not None:
        assert config.deepspeed_config["zero_stage"] == zero_stage


@pytest.mark.slow
def test_evlf_train_trl_under_accelerate_launch(tmp_path):
    """One CPU process through `accelerate launch`: RANK 0 trains, evaluates, saves and gates a version."""
    from monailabel_evlf.cli import main

    for name, seed in (("train", 1), ("held", 2)):
        args = ["make-sample-data", str(tmp_path / name), "--n", "1", "--shape", "40", "40", "12", "--seed", str(seed)]
        assert main(args) == 0
    config = tmp_path / "small.yaml"
    config.write_text(
        "grpo: {steps: 1, batch_size: 2, group_size: 2, max_new_tokens: 8}\n"
        f"trl: {{output_dir: {tmp_path / 'runs'}, report_to: none}}\n"
    )
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    command += ["--mixed_precision", "no", "-m", "monailabel_evlf.cli", "train", "--trainer", "trl", "--model", "tiny"]
    command += ["--data", str(tmp_path / "train"), "--held-out", str(tmp_path / "held"), "--config", str(config)]
    command += ["--stages", "grpo", "--registry", str(tmp_path / "adapters"), "--tasks", "grounding"]
    command += ["--size", "48", "48"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adapter " in done.stdout, done.stdout[-2000:]
    assert (Path(tmp_path) / "adapters" / "tiny" / "v0001" / "meta.json").is_file()
