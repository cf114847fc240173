"""Versioned adapters: save/load, the promotion gate, and crashes in the middle of a save."""

import json
import os

import pytest

from monailabel_evlf.training import adapters
from monailabel_evlf.training.adapters import AdapterRegistry, config_hash, passes_gate


def writer(payload: bytes):
    def write(directory):
        (directory / "adapter_model.safetensors").write_bytes(payload)
        (directory / "adapter_config.json").write_text('{"r": 4}')

    return write


def test_versions_are_numbered_and_carry_meta(tmp_path):
    registry = AdapterRegistry(tmp_path, "evlf-demo")
    first = registry.save(writer(b"a"), metrics={"acc@0.5": 0.4}, config={"lr": 1e-4})
    second = registry.save(writer(b"b"), metrics={"acc@0.5": 0.5}, parent=first.name, config={"lr": 1e-4})
    assert [v.name for v in registry.versions()] == ["v0001", "v0002"]
    assert second.path == tmp_path / "evlf-demo" / "v0002"
    meta = json.loads((second.path / "meta.json").read_text())
    assert meta["parent"] == "v0001" and meta["metrics"] == {"acc@0.5": 0.5}
    assert meta["config_hash"] == config_hash({"lr": 1e-4}) == first.meta["config_hash"]
    assert set(meta["files"]) == {"adapter_model.safetensors", "adapter_config.json"}
    assert (second.path / "adapter_model.safetensors").read_bytes() == b"b"


def test_gate_promotes_only_if_not_worse(tmp_path):
    registry = AdapterRegistry(tmp_path, "m")
    assert registry.load_promoted() is None
    v1 = registry.save(writer(b"1"), metrics={"acc@0.5": 0.5})
    assert registry.promote(v1, metric="acc@0.5")
    worse = registry.save(writer(b"2"), metrics={"acc@0.5": 0.4})
    assert not registry.promote(worse, metric="acc@0.5")
    assert registry.load_promoted().name == "v0001"
    assert registry.promote(worse, metric="acc@0.5", tolerance=0.1)  # within tolerance
    equal = registry.save(writer(b"3"), metrics={"acc@0.5": 0.4})
    assert registry.promote(equal, metric="acc@0.5")
    assert registry.load_promoted().name == "v0003"


def test_gate_needs_the_metric(tmp_path):
    registry = AdapterRegistry(tmp_path, "m")
    v1 = registry.save(writer(b"1"), metrics={"miou": 0.5})
    with pytest.raises(ValueError, match=r"acc@0\.5"):
        registry.promote(v1, metric="acc@0.5")
    with pytest.raises(ValueError, match="gate metric"):
        registry.promote(v1)
    assert registry.promote(v1, force=True)


def test_passes_gate_known_answers():
    assert passes_gate({"m": 0.5}, None, "m")
    assert passes_gate({"m": 0.5}, {"m": 0.5}, "m")
    assert not passes_gate({"m": 0.49}, {"m": 0.5}, "m")
    assert passes_gate({"m": 0.49}, {"m": 0.5}, "m", tolerance=0.02)


def test_crash_inside_writer_leaves_no_version(tmp_path):
    registry = AdapterRegistry(tmp_path, "m")
    v1 = registry.save(writer(b"good"), metrics={"acc@0.5": 0.5})
    registry.promote(v1, metric="acc@0.5")

    def crashing(directory):
        (directory / "adapter_model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="mid-save"):
        registry.save(crashing, metrics={"acc@0.5": 0.9})
    assert [v.name for v in registry.versions()] == ["v0001"]
    assert registry.load_promoted().path == v1.path
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["promoted", "v0001"]


def test_crash_before_rename_leaves_no_version(tmp_path, monkeypatch):
    registry = AdapterRegistry(tmp_path, "m")

    def no_rename(src, dst):
        raise KeyboardInterrupt  # the process is interrupted between writing meta.json and the rename

    monkeypatch.setattr(adapters.os, "rename", no_rename)
    with pytest.raises(KeyboardInterrupt):
        registry.save(writer(b"x"), metrics={"acc@0.5": 1.0})
    assert registry.versions() == [] and registry.load_promoted() is None


def test_hard_kill_leftovers_are_invisible_and_removable(tmp_path):
    # what a SIGKILL leaves: a temp dir with weights and no meta, and a version dir without meta.json
    registry = AdapterRegistry(tmp_path, "m")
    (tmp_path / "m" / ".incomplete-abc").mkdir(parents=True)
    (tmp_path / "m" / ".incomplete-abc" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / "m" / "v0007").mkdir()
    assert registry.versions() == [] and registry.latest() is None
    assert registry.remove_incomplete() == 1
    assert registry.save(writer(b"ok")).name == "v0001"


def test_damaged_promoted_adapter_is_refused(tmp_path):
    registry = AdapterRegistry(tmp_path, "m")
    v1 = registry.save(writer(b"good"), metrics={"acc@0.5": 0.5})
    registry.promote(v1, metric="acc@0.5")
    (v1.path / "adapter_model.safetensors").write_bytes(b"goo")
    with pytest.raises(ValueError, match="changed"):
        registry.load_promoted()


def test_promoted_pointer_replaced_atomically(tmp_path, monkeypatch):
    registry = AdapterRegistry(tmp_path, "m")
    v1 = registry.save(writer(b"1"), metrics={"acc@0.5": 0.1})
    v2 = registry.save(writer(b"2"), metrics={"acc@0.5": 0.9})
    registry.promote(v1, metric="acc@0.5")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(adapters.os, "replace", failing_replace)
    with pytest.raises(OSError):
        registry.promote(v2, metric="acc@0.5")
    monkeypatch.undo()
    assert registry.load_promoted().name == "v0001"
    assert [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".promoted")] == []


def test_empty_writer_and_bad_names_rejected(tmp_path):
    with pytest.raises(ValueError, match="plain directory"):
        AdapterRegistry(tmp_path, "../x")
    with pytest.raises(ValueError, match="no files"):
        AdapterRegistry(tmp_path, "m").save(lambda d: None)
    assert os.listdir(tmp_path / "m") == []
