"""``--conf`` parsing: typed values, and every bad option stops start-up with a message naming it."""

from __future__ import annotations

import pytest

from monailabel_evlf.app.config import AppConfig, ConfigError, parse_app_config, resolve_model
from monailabel_evlf.parsing import parse_bool


def test_defaults_are_the_offline_demo():
    config = parse_app_config({})
    assert config == AppConfig()
    assert config.vocabulary == ("cyst", "hyperdense lesion", "ring-enhancing lesion", "normal")
    assert config.targets == ("cyst", "hyperdense lesion", "ring-enhancing lesion")


def test_values_are_typed():
    config = parse_app_config(
        {
            "backend": "pkg.mod:Cls",
            "model": "/models/x",
            "device": "cuda:1",
            "dtype": "bfloat16",
            "trust_remote_code": "yes",
            "labels": "nodule, mass ,nodule",
            "findings": "nodule",
            "slice_axis": "1",
            "batch_size": "16",
            "window": "-600,1500",
            "output": "labelmap",
            "detector_steps": "0",
            "backend.revision": "abc",
            "models": "all",  # MONAI Label sample-app habit: accepted and ignored
        }
    )
    assert config.backend == "pkg.mod:Cls" and config.device == "cuda:1" and config.dtype == "bfloat16"
    assert config.trust_remote_code is True
    assert config.labels == ("nodule", "mass") and config.vocabulary == ("nodule", "mass", "normal")
    assert config.targets == ("nodule",)
    assert config.slice_axis == 1 and config.batch_size == 16 and config.window == "-600,1500"
    assert config.extra == {"revision": "abc"} and config.detector_steps == 0
    assert parse_app_config({"slice_axis": "auto"}).slice_axis is None


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("bach_size", "8", "unknown option"),
        ("batch_size", "eight", "integer"),
        ("batch_size", "0", ">= 1"),
        ("device", "gpu", "cuda"),
        ("dtype", "float64", "float32"),
        ("trust_remote_code", "maybe", "true/false"),
        ("slice_axis", "3", "0, 1, 2"),
        ("window", "bright", "unknown window"),
        ("window", "40,-5", "positive"),
        ("window", "abdomen/liver", "one window or three"),
        ("labels", " , ", "at least one"),
        ("model", "", "empty"),
        ("output", "png", "markups"),
        ("image_size", "8", ">= 16"),
        ("detector_steps", "-1", ">= 0"),
        ("min_box_score", "1.5", "[0, 1]"),
        ("min_box_score", "high", "a number"),
    ],
)
def test_bad_option_names_itself(key, value, says):
    with pytest.raises(ConfigError) as caught:
        parse_app_config({key: value})
    assert str(caught.value).startswith(f"--conf {key}:")
    assert says in str(caught.value)
    assert caught.value.option == key


def test_demo_falls_back_to_tiny_with_a_note(monkeypatch, tmp_path):
    import monailabel_evlf.app.config as config_module

    monkeypatch.setattr(config_module, "DEMO_MODEL_DIR", tmp_path / "missing")
    model, note = resolve_model(AppConfig())
    assert model == "tiny" and "tiny" in note
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "config.json").write_text("{}")
    monkeypatch.setattr(config_module, "DEMO_MODEL_DIR", tmp_path / "demo")
    assert resolve_model(AppConfig()) == (str(tmp_path / "demo"), "")
    assert resolve_model(AppConfig(model="org/name")) == ("org/name", "")


def test_window_defaults_to_the_models_own_and_a_configured_one_wins():
    class Backend:
        input_window = "abdomen/liver/40,80"

    assert parse_app_config({}).window_for(Backend()) == "abdomen/liver/40,80"
    assert parse_app_config({}).window_for(object()) == "abdomen"  # a model that records none
    assert parse_app_config({"window": "lung/soft_tissue/bone"}).window_for(Backend()) == "lung/soft_tissue/bone"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("on", True), (" YES ", True), (1, True), ("off", False), ("No", False)],
)
def test_one_boolean_parser_reads_the_usual_words(value, expected):
    assert parse_bool(value, "flag") is expected
    key = "auto_scoring"
    if not isinstance(value, bool):
        assert getattr(parse_app_config({key: str(value)}), key) is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", "of", None, 1.0])
def test_unknown_boolean_words_name_the_key_and_the_accepted_words(value):
    with pytest.raises(ValueError, match=r"^my_flag must be a boolean \(true/false, yes/no, on/off, 1/0\), got"):
        parse_bool(value, "my_flag")
