"""The built wheel works without the checkout: it carries configs, the demo model and the app, installs into a
fresh venv, and `evlf serve` / `evlf eval` / `evlf bench infer` run from a folder outside the repository."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLE = "monailabel_evlf/_bundled/"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from the checkout as a user would (no network: this environment's setuptools)."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out)]
    done = subprocess.run([*cmd, str(REPO_ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out.glob("monailabel_evlf-*.whl")
    return path


def test_wheel_carries_configs_demo_model_and_app(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("configs/models", "configs/training", "models/evlf-demo"):
        in_checkout = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / folder).rglob("*") if p.is_file()}
        assert in_checkout and {BUNDLE + name for name in in_checkout} <= names, folder
    assert BUNDLE + "apps/evlf/main.py" in names
    assert "monailabel_evlf/resources/slicer-markups-schema-v1.0.3.json" in names
    entry_points = zipfile.ZipFile(wheel).read("monailabel_evlf-0.1.0.dist-info/entry_points.txt").decode()
    assert "evlf = monailabel_evlf.cli:main" in entry_points
    assert not any(name.startswith(("tests/", "apps/", "configs/", "models/")) for name in names)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed in it, reusing this environment's torch/monailabel stack.

    The stack lives in the project venv, not in the system site, so ``--system-site-packages`` would not see it;
    a .pth line adds the stack's site-packages instead. Directories added that way have their own .pth files
    ignored, so the checkout's editable-install hook stays off and ``monailabel_evlf`` comes from the wheel."""
    root = tmp_path_factory.mktemp("venv")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    site = Path(
        subprocess.check_output(
            [root / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "evlf-stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --no-index with dependencies resolved: every install_requires pin must already be satisfied by the stack
    install = [sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "--no-index"]
    done = subprocess.run([*install, "--quiet", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


@pytest.fixture
def outside(tmp_path, monkeypatch) -> Iterator[dict[str, str]]:
    """The environment of a user in a folder outside the checkout, with their own data home."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "XDG_DATA_HOME": str(tmp_path / "data")}
    env.pop("PYTHONPATH", None)
    monkeypatch.chdir(tmp_path)
    yield env


def _run(venv: Path, args: list[str], env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_installed_wheel_serves_evaluates_and_benches_outside_the_checkout(venv, outside, tmp_path):
    where = _run(venv, ["python", "-c", "import monailabel_evlf.paths as p; print(p.resource_root())"], outside)
    assert Path(where.strip()).is_relative_to(venv) and str(REPO_ROOT) not in where

    _run(venv, ["evlf", "make-sample-data", "studies", "--n", "2", "--shape", "64", "64", "16"], outside)
    _run(venv, ["evlf", "eval", "--model", "demo", "--data", "studies", "--limit", "4", "--out", "eval"], outside)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics, "evlf eval wrote no metrics"
    bench = [
        "evlf",
        "bench",
        "infer",
        "studies",
        "--no-http",
        "--repeats",
        "1",
        "--batch-size",
        "4",
        "--json",
        "b.json",
    ]
    _run(venv, bench, outside)
    report = json.loads((tmp_path / "b.json").read_text())
    assert Path(report["model"]).is_relative_to(venv) and report["batched_slices_per_s"] > 0

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(venv / "bin" / "evlf"), "serve", "--studies", "studies", "--port", str(port)]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=outside)
    url = f"http://127.0.0.1:{port}"
    try:
        info = _wait_for_info(url, server, tmp_path / "server.log")
        assert {"evlf_grounding", "evlf_diagnosis", "evlf_vqa"} <= set(info["models"])
        assert "evlf_train" in info["trainers"]
        assert "demo model not found" not in info["description"]  # the bundled demo model, not the tiny stand-in
        result = requests.post(f"{url}/infer/evlf_diagnosis", params={"image": "phantom_s0_000"}, timeout=300)
        assert result.status_code == 200, result.text[:2000]
        app = tmp_path / "data" / "monailabel-evlf" / "app"
        assert (app / "main.py").is_file() and (app / "logs").is_dir()  # state outside the installed package
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _wait_for_info(url: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()[-5000:]}")
        try:
            response = requests.get(f"{url}/info/", timeout=2)
            if response.status_code == 200:
                return response.json()
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no /info/ within {timeout} s:\n{log.read_text()[-5000:]}")
