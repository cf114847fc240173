"""Model presets: short names (``tiny``, ``demo``, ``qwen2_5_vl-3b`` ...) for the YAML files in configs/models/.

A preset names its backend and either a ``model`` (hub id, absolute directory, or ``./dir`` relative to the
checkout or an installed wheel's bundle, see :mod:`monailabel_evlf.paths`), a ``build`` (an offline tiny builder,
run once per process into a temporary directory) or an ``assemble`` recipe (real-size EVLF from public
checkpoints, see :mod:`monailabel_evlf.model.assemble`; run it once, then serve the output directory).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monailabel_evlf import paths

PRESETS_DIR = paths.configs_dir() / "models"
_PRESET_KEYS = {"backend", "model", "build", "assemble", "options"}
_built: dict[str, Path] = {}


@dataclass(frozen=True)
class Preset:
    name: str
    backend: str
    model: str | None = None
    build: str | None = None
    assemble: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def get_preset(name: str) -> Preset | None:
    """The preset called ``name``, or None when there is no such file (then ``name`` is a path or hub id)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - _PRESET_KEYS
    if unknown or "backend" not in data:
        raise ValueError(f"model preset {path}: needs 'backend'; unknown keys {sorted(unknown)}")
    if sum(k in data for k in ("model", "build", "assemble")) != 1:
        raise ValueError(f"model preset {path}: give exactly one of 'model', 'build', 'assemble'")
    return Preset(
        name=name,
        backend=str(data["backend"]),
        model=str(data["model"]) if "model" in data else None,
        build=data.get("build"),
        assemble=dict(data.get("assemble") or {}),
        options=dict(data.get("options") or {}),
    )


def _builders() -> dict[str, Any]:
    from monailabel_evlf.model import tiny  # lazy: transformers + monai, for build presets only

    return {
        "tiny_evlf": tiny.build_tiny_evlf,
        "tiny_qwen2_5_vl": tiny.build_tiny_qwen2_5_vl,
        "tiny_qwen3_vl": tiny.build_tiny_qwen3_vl,
    }


def built_model_dir(builder: str) -> Path:
    """Run an offline builder once per process; its directory is removed at exit."""
    builders = _builders()
    if builder not in builders:
        raise ValueError(f"unknown model builder {builder!r}; known: {sorted(builders)}")
    if builder not in _built:
        directory = Path(tempfile.mkdtemp(prefix=f"evlf-{builder}-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        builders[builder](directory)
        _built[builder] = directory
    return _built[builder]


def model_location(preset: Preset) -> str:
    """Where ``from_pretrained`` loads the preset's model from."""
    if preset.build:
        return str(built_model_dir(preset.build))
    if preset.assemble:
        raise ValueError(
            f"preset {preset.name!r} is a recipe: run `evlf assemble-model configs/models/{preset.name}.yaml OUT` "
            "once, then use --conf model OUT"
        )
    if preset.model.startswith(("./", "../")):  # relative to the checkout or the wheel's bundle; else path or hub id
        return str((paths.resource_root() / preset.model).resolve())
    return preset.model
