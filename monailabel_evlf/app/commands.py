"""``evlf serve``: the MONAI Label server with the EVLF app on a studies folder, from a checkout or a wheel.

It runs ``python -m monailabel.main start_server`` (what MONAI Label's own ``monailabel`` launcher runs) with this
interpreter, so it needs no PATH set-up; ``make serve`` and ``evlf bench infer`` start the server the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from monailabel_evlf import paths


def default_app_home() -> Path:
    """Where an installed wheel keeps its app folder: MONAI Label writes model/, logs/, lib/ and bin/ there and the
    app its adapter registry (model/adapters), so it must be writable and outlive reinstalls of the package."""
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "monailabel-evlf" / "app"


APP_RUNTIME_FOLDERS = ("model", "lib", "logs", "bin")  # what monailabel start_server creates in the app folder


def prepare_app_dir(target: str | Path | None = None) -> Path:
    """The app folder to start: ``target`` if given, else the checkout's ``apps/evlf`` or, from a wheel,
    :func:`default_app_home`.

    A folder other than the packaged app gets the packaged ``main.py`` copied in on every start, so the app code
    is always the installed package's (a customised app is started with ``monailabel start_server --app``)."""
    source = paths.app_source_dir()
    if target is None:
        target = source if paths.checkout_root() is not None else default_app_home()
    target = Path(target).resolve()
    # start_server makes these with a check-then-mkdir; two servers started at once on a fresh folder race there
    for folder in APP_RUNTIME_FOLDERS:
        (target / folder).mkdir(parents=True, exist_ok=True)
    if target == source.resolve():
        return target
    main = source / "main.py"
    copy = target / "main.py"
    if not copy.is_file() or copy.read_bytes() != main.read_bytes():
        shutil.copyfile(main, copy)
    return target


def server_command(app_dir: Path, studies: str | Path, host: str, port: int, conf: Mapping[str, str]) -> list[str]:
    """The ``start_server`` command line for this interpreter."""
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir)]
    cmd += ["--studies", str(studies), "--host", host, "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, str(value)]
    return cmd


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the server: MONAI Label's DICOM helpers run ``python`` from PATH, so this
    interpreter's folder goes first (what the Makefile did by hand)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **(extra or {})}


def serve(args: argparse.Namespace) -> NoReturn:
    studies = args.studies
    if not studies.startswith(("http://", "https://")):
        studies = str(Path(studies).resolve())
    cmd = server_command(prepare_app_dir(args.app_dir), studies, args.host, args.port, dict(args.conf))
    sys.stdout.flush()
    sys.stderr.flush()
    # the server replaces this process: Ctrl-C and SIGTERM reach uvicorn directly, the exit status is the server's
    os.execve(sys.executable, cmd, server_env())


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="start the MONAI Label server with the EVLF app on a studies folder", description=__doc__
    )
    parser.add_argument("--studies", required=True, help="studies folder or DICOMweb URL (http://...)")
    parser.add_argument(
        "--app-dir",
        default=None,
        help="writable app folder (adapters, logs); default: apps/evlf in a checkout, else "
        "$XDG_DATA_HOME/monailabel-evlf/app (~/.local/share/...)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--conf",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="app option (docs/app.md), repeatable, e.g. --conf model demo --conf batch_size 16",
    )
    parser.set_defaults(func=serve)
