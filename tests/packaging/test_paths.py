"""The resource locator and `evlf serve`'s app folder, in the checkout (the wheel is tests/packaging/test_wheel.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from monailabel_evlf import paths
from monailabel_evlf.app import commands
from monailabel_evlf.app.config import DEMO_MODEL_DIR
from monailabel_evlf.cli import build_parser
from monailabel_evlf.model.presets import PRESETS_DIR, get_preset, model_location
from monailabel_evlf.training.commands import CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_checkout_resources_are_the_repository_folders():
    assert paths.checkout_root() == REPO_ROOT
    assert paths.resource_root() == REPO_ROOT
    assert PRESETS_DIR == REPO_ROOT / "configs" / "models"
    assert CONFIG_DIR == REPO_ROOT / "configs" / "training"
    assert DEMO_MODEL_DIR == REPO_ROOT / "models" / "evlf-demo"
    assert paths.app_source_dir() == REPO_ROOT / "apps" / "evlf"
    # "./" preset paths resolve against the same root, wherever the command runs from
    assert model_location(get_preset("demo")) == str(REPO_ROOT / "models" / "evlf-demo")


def test_checkout_serves_its_own_app_folder():
    assert commands.prepare_app_dir() == REPO_ROOT / "apps" / "evlf"


def test_another_app_folder_gets_the_packaged_main_refreshed(tmp_path):
    source = (REPO_ROOT / "apps" / "evlf" / "main.py").read_bytes()
    app = commands.prepare_app_dir(tmp_path / "app")
    assert app == (tmp_path / "app").resolve()
    assert (app / "main.py").read_bytes() == source
    # made before start_server runs: two servers starting at once on a new folder must not race to create them
    assert all((app / folder).is_dir() for folder in ("model", "lib", "logs", "bin"))
    (app / "main.py").write_text("stale = True\n")
    (app / "model" / "kept.txt").write_text("state")
    commands.prepare_app_dir(app)
    assert (app / "main.py").read_bytes() == source
    assert (app / "model" / "kept.txt").read_text() == "state"


def test_wheel_app_home_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert commands.default_app_home() == tmp_path / "monailabel-evlf" / "app"


def test_serve_command_line(tmp_path):
    argv = ["serve", "--studies", str(tmp_path), "--port", "8123"]
    argv += ["--conf", "model", "tiny", "--conf", "batch_size", "4"]
    args = build_parser().parse_args(argv)
    assert args.func is commands.serve
    cmd = commands.server_command(Path("/app"), args.studies, args.host, args.port, dict(args.conf))
    assert cmd[:4] == [sys.executable, "-m", "monailabel.main", "start_server"]
    assert cmd[4:10] == ["--app", "/app", "--studies", str(tmp_path), "--host", "127.0.0.1"]
    assert cmd[10:] == ["--port", "8123", "--conf", "model", "tiny", "--conf", "batch_size", "4"]
    env = commands.server_env({"X": "1"})
    assert env["X"] == "1" and env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
