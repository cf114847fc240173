"""The training commands are registered with the `evlf` CLI and validate their input."""

from pathlib import Path

import pytest

from monailabel_evlf.cli import build_parser, main


def test_commands_are_registered():
    parser = build_parser()
    args = parser.parse_args(["eval", "--data", "d", "--consistency", "3"])
    assert args.func.__name__ == "run_eval" and args.model == "demo" and args.consistency == 3
    args = parser.parse_args(["train", "--data", "d", "--held-out", "h", "--stages", "sft", "grpo"])
    assert args.func.__name__ == "run_train" and args.stages == ["sft", "grpo"] and args.gate_metric == "acc@0.5"
    assert args.trainer == "compact"
    args = parser.parse_args(["build-demo-model", "out"])
    assert args.func.__name__ == "run_build_demo_model" and args.config.endswith("demo.yaml")
    args = parser.parse_args(["bench", "learning-loop", "--shots", "8", "16"])
    assert args.func.__name__ == "run_command" and args.shots == [8, 16]


def test_train_rejects_a_missing_config(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--held-out", str(tmp_path), "--config", str(tmp_path / "no.yaml")])
    assert code == 2 and "training config not found" in capsys.readouterr().err


def test_build_demo_model_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["build-demo-model", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "keep.txt").exists()


@pytest.mark.parametrize("bad", [["eval"], ["train", "--data", "d"]])
def test_required_arguments(bad):
    with pytest.raises(SystemExit):
        build_parser().parse_args(bad)


def test_eval_default_model_is_the_demo_preset_from_any_folder(tmp_path, monkeypatch):
    """`evlf eval` without --model loads the demo preset, which does not depend on the working directory."""
    from monailabel_evlf.model.presets import get_preset, model_location
    from monailabel_evlf.training.commands import load_backend_from_args

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["eval", "--data", "d"])
    preset = get_preset(args.model)
    assert preset is not None and preset.backend == "evlf"
    assert Path(model_location(preset)).is_absolute() and not (tmp_path / "models").exists()
    backend = load_backend_from_args(args)
    assert Path(backend.model_id).is_absolute() and Path(backend.model_id).name == "evlf-demo"


def test_train_with_trl_on_a_user_backend_is_refused(tmp_path):
    """TRL drives a transformers model and processor: other backends are told to use the compact trainer."""
    from monailabel_evlf.training.trl_common import require_trl_backend

    with pytest.raises(ValueError, match="--trainer compact"):
        require_trl_backend(object())


@pytest.mark.parametrize(
    ("extra", "noticed"),
    [
        (["--trainer", "trl", "--bf16", "--device", "cuda"], True),
        (["--trainer", "trl", "--bf16", "--device", "cuda:1"], True),
        (["--trainer", "trl", "--bf16", "--device", "cuda", "--dtype", "float32"], False),  # chosen: kept, quiet
        (["--trainer", "trl", "--bf16", "--device", "cuda", "--dtype", "bfloat16"], False),
        (["--trainer", "trl", "--bf16"], False),  # CPU: float32 weights under bf16 autocast, as before
        (["--trainer", "trl", "--device", "cuda"], False),
    ],
)
def test_bf16_on_a_gpu_without_dtype_keeps_float32_weights_and_says_so(extra, noticed):
    from monailabel_evlf.training.commands import bf16_weights_notice, trl_options

    args = build_parser().parse_args(["train", "--data", "d", "--held-out", "h", *extra])
    assert args.dtype in (None, "float32", "bfloat16")  # None: the float32 default, unchanged
    notice = bf16_weights_notice(args, trl_options({}, args))
    assert (notice is not None) == noticed
    if noticed:
        assert "--dtype bfloat16" in notice and "float32" in notice
    assert bf16_weights_notice(args, None) is None  # the compact trainer has no --bf16


def test_the_dtype_default_is_still_float32(monkeypatch):
    from monailabel_evlf.training import commands

    seen = {}
    monkeypatch.setattr("monailabel_evlf.model.load_backend", lambda *a, **k: seen.update(k))
    commands.load_backend_from_args(build_parser().parse_args(["eval", "--data", "d"]))
    assert seen["dtype"] == "float32"
