"""Where the files that are not Python code live: ``configs/``, the demo model and the MONAI Label app.

Two layouts, one answer. In a git checkout (an editable install) they are the repository's own ``configs/``,
``models/evlf-demo`` and ``apps/evlf``. An installed wheel carries copies of the same folders, in the same
relative layout, as package data under ``monailabel_evlf/_bundled/`` (setup.py copies them in at build time, so the
checkout keeps one source of truth). Everything else asks :func:`resource_root` instead of climbing
``Path(__file__).parents[...]``, so code works from both.
"""

from __future__ import annotations

import importlib.resources
from functools import cache
from pathlib import Path

BUNDLE = "_bundled"  # package-data folder inside monailabel_evlf that setup.py fills when building a wheel
DEMO_MODEL = Path("models") / "evlf-demo"
APP = Path("apps") / "evlf"
CONFIGS = Path("configs")


def checkout_root() -> Path | None:
    """The git checkout this package is imported from, or None when it is an installed copy."""
    root = Path(__file__).resolve().parents[1]
    if (root / "setup.cfg").is_file() and (root / APP / "main.py").is_file():
        return root
    return None


@cache
def resource_root() -> Path:
    """The folder holding ``configs/``, ``models/evlf-demo`` and ``apps/evlf``: the checkout, else the bundle.

    The checkout wins so that a rebuilt demo model or an edited config is used at once; a wheel has no checkout.
    Wheels install unpacked, so the bundle is a real directory (``from_pretrained`` needs one)."""
    root = checkout_root()
    if root is not None:
        return root
    bundle = Path(str(importlib.resources.files("monailabel_evlf") / BUNDLE))
    if not (bundle / APP / "main.py").is_file():
        raise FileNotFoundError(
            f"monailabel_evlf has neither a checkout nor bundled resources at {bundle}; "
            "reinstall the wheel (it is built by setup.py, which copies configs/, models/ and apps/ in)"
        )
    return bundle


def configs_dir() -> Path:
    """``configs/``: model presets (``models/*.yaml``) and training recipes (``training/*.yaml``)."""
    return resource_root() / CONFIGS


def demo_model_dir() -> Path:
    """The committed offline demo model (it may be absent in a checkout until ``evlf build-demo-model`` ran)."""
    return resource_root() / DEMO_MODEL


def app_source_dir() -> Path:
    """The MONAI Label app folder whose ``main.py`` defines the EVLF app (read-only in an installed wheel)."""
    return resource_root() / APP
