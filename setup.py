"""One build step on top of setup.cfg: a wheel carries the non-code folders the package needs at run time.

``configs/``, the demo model ``models/evlf-demo`` and the MONAI Label app ``apps/evlf/main.py`` live at the top of
the checkout (one source of truth, edited and rebuilt there); a wheel gets copies, in the same layout, under
``monailabel_evlf/_bundled/``, where :mod:`monailabel_evlf.paths` finds them. An editable install copies nothing:
it reads the checkout itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# checkout path -> path inside monailabel_evlf/_bundled (kept equal: paths.py resolves both layouts alike)
BUNDLED = ("configs", "models/evlf-demo", "apps/evlf/main.py")
REQUIRED = ("configs/models/demo.yaml", "models/evlf-demo/config.json", "models/evlf-demo/model.safetensors")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


class BuildPyWithBundle(build_py):
    """``build_py`` plus the bundle copy; a wheel without the demo model would serve nothing, so it fails."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        missing = [name for name in REQUIRED if not (ROOT / name).is_file()]
        if missing:
            raise SystemExit(f"cannot build the wheel: missing {missing} (build the demo model first)")
        bundle = Path(self.build_lib) / "monailabel_evlf" / "_bundled"
        shutil.rmtree(bundle, ignore_errors=True)  # no stale files from an earlier build (e.g. an old model)
        for name in BUNDLED:
            source, target = ROOT / name, bundle / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=IGNORED)
            else:
                shutil.copy2(source, target)


setup(cmdclass={"build_py": BuildPyWithBundle})
