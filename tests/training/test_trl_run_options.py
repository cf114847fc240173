"""TRL run options the loss and learning tests leave out: the accelerate configs in configs/accelerate load as
accelerate reads them, and `evlf train --trainer trl` runs under `accelerate launch` (one CPU process, the path
docs/training.md says runs here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from monailabel_evlf.paths import configs_dir

pytest.importorskip("trl")


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
