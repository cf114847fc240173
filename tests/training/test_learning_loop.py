"""The learning-loop benchmark: table and plot on known rows (fast); the whole run on a tiny model (slow)."""

import json

import pytest

from monailabel_evlf.training.learning_loop import (
    LearningLoopConfig,
    format_table,
    plot_learning_curve,
    run_learning_loop,
)

ROWS = [
    {"method": "zero-shot", "cases": 0, "acc@0.5": 0.1, "miou": 0.2, "seconds": 0.0},
    {"method": "grpo", "cases": 8, "acc@0.5": 0.25, "miou": 0.3, "seconds": 12.5, "grpo_groups_with_spread": 0.625},
    {"method": "sft", "cases": 8, "acc@0.5": 0.2, "miou": 0.28, "seconds": 3.0, "grpo_groups_with_spread": None},
]


def test_table_and_plot(tmp_path):
    table = format_table(ROWS)
    assert table.splitlines()[3] == "| grpo | 8 | 0.250 | 0.300 | 12.5 | 0.62 |"
    assert table.splitlines()[4] == "| sft | 8 | 0.200 | 0.280 | 3.0 | - |"
    path = plot_learning_curve(ROWS, tmp_path / "curve.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_rejects_empty_shots(tmp_path):
    with pytest.raises(ValueError, match="shots"):
        run_learning_loop(LearningLoopConfig(shots=[0]), tmp_path)


def test_shipped_config_is_an_enhanced_protocol_with_the_detector_stage():
    from monailabel_evlf.training.commands import CONFIG_DIR
    from monailabel_evlf.training.learning_loop import load_learning_loop_config

    config = load_learning_loop_config(CONFIG_DIR / "learning-loop.yaml")
    assert config.window == "model" and config.noise_sd_hu is None  # the training phantoms' noise
    # organs brighter than any training phantom's by more than the liver's whole training range (48-70 HU)
    assert min(config.organ_enhancement_hu) > 22.0
    assert config.detector["steps"] == 400 and set(config.methods) == {"sft", "sft+grpo"}


@pytest.mark.slow
def test_whole_benchmark_on_a_tiny_model(tmp_path):
    from monailabel_evlf.model.tiny import build_tiny_evlf

    build_tiny_evlf(tmp_path / "tiny", image_size=32, hidden_size=32, num_layers=1, pixel_pool=1)
    config = LearningLoopConfig(
        model=str(tmp_path / "tiny"),
        kinds=["cyst"],
        shots=[2],
        held_out_cases=2,
        size=(48, 48),
        phantom_shape=(48, 48, 16),
        sft={"epochs": 1, "batch_size": 2},
        grpo={"steps": 1, "batch_size": 2, "group_size": 2, "max_new_tokens": 12},
    )
    result = run_learning_loop(config, tmp_path / "out", progress=False)
    assert [r["method"] for r in result["rows"]] == ["zero-shot", "sft", "grpo", "sft+grpo"]
    assert result["rows"][2]["grpo_groups_with_spread"] is not None
    saved = json.loads((tmp_path / "out" / "learning_loop.json").read_text())
    assert saved["rows"] == result["rows"] and (tmp_path / "out" / "learning_loop.png").is_file()
