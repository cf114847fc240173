"""Versioned LoRA adapters with an atomic promotion gate.

Layout: ``<root>/<model_name>/v0001/`` holds what :meth:`VLMBackend.save_adapter` writes (safetensors + config)
and ``meta.json`` (metrics on held-out data, parent version, creation time, config hash, sha256 of every file).
A version is built in a hidden temporary directory and renamed into place in one ``os.rename``; ``meta.json``
is written last, so a crash at any point leaves either no version or a complete one. ``promoted`` is a one-line
pointer file replaced with ``os.replace`` only after :func:`passes_gate` says the candidate is not worse than
the current promoted version — inference only ever loads what :meth:`AdapterRegistry.load_promoted` returns,
and that re-checks the file hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from monailabel_evlf.atomic import write_atomic

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
PROMOTED_FILE = "promoted"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_TMP_PREFIX = ".incomplete-"


@dataclass(frozen=True)
class AdapterVersion:
    """One complete, immutable adapter version on disk."""

    model_name: str
    version: int
    path: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return version_name(self.version)

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.meta.get("metrics", {}))


def version_name(version: int) -> str:
    if version < 1:
        raise ValueError(f"adapter versions start at 1, got {version}")
    return f"v{version:04d}"


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of a training config (sorted JSON), so two versions trained alike are recognisable."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def passes_gate(
    candidate: Mapping[str, float], current: Mapping[str, float] | None, metric: str, tolerance: float = 0.0
) -> bool:
    """The validation gate: the candidate's ``metric`` (higher is better) is at least the current's minus
    ``tolerance``. Without a current version any candidate with the metric passes."""
    if metric not in candidate:
        raise ValueError(f"candidate has no metric {metric!r} (has {sorted(candidate)})")
    if current is None or metric not in current:
        return True
    return float(candidate[metric]) >= float(current[metric]) - tolerance


class AdapterRegistry:
    """The adapter versions of one model under ``root``; safe against crashes, not a multi-writer database."""

    def __init__(self, root: str | os.PathLike[str], model_name: str) -> None:
        if not model_name or "/" in model_name or model_name.startswith("."):
            raise ValueError(f"model_name must be a plain directory name, got {model_name!r}")
        self.model_name = model_name
        self.directory = Path(root) / model_name

    def versions(self) -> list[AdapterVersion]:
        """Complete versions in ascending order (directories without a readable ``meta.json`` are skipped)."""
        found = []
        if not self.directory.is_dir():
            return found
        for child in self.directory.iterdir():
            match = _VERSION_RE.match(child.name)
            if match and child.is_dir():
                meta = self._read_meta(child)
                if meta is not None:
                    found.append(AdapterVersion(self.model_name, int(match.group(1)), child, meta))
        return sorted(found, key=lambda v: v.version)

    def get(self, version: int | str) -> AdapterVersion:
        name = version if isinstance(version, str) else version_name(version)
        for candidate in self.versions():
            if candidate.name == name:
                return candidate
        raise FileNotFoundError(f"no complete adapter version {name!r} in {self.directory}")

    def latest(self) -> AdapterVersion | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def save(
        self,
        write: Callable[[Path], None],
        *,
        metrics: Mapping[str, float] | None = None,
        parent: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> AdapterVersion:
        """Create the next version: ``write(tmp_dir)`` (e.g. ``backend.save_adapter``) fills a temporary directory,
        then ``meta.json`` is added and the directory renamed to ``vNNNN`` in one step."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.directory, prefix=_TMP_PREFIX))
        try:
            write(tmp)
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            if not files:
                raise ValueError("the adapter writer produced no files")
            meta = {
                "model_name": self.model_name,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "parent": parent,
                "metrics": {k: float(v) for k, v in (metrics or {}).items()},
                "config_hash": config_hash(config or {}),
                "config": dict(config or {}),
                "files": files,
            }
            write_atomic(tmp / META_FILE, json.dumps(meta, indent=2, default=str).encode())
            return self._rename_into_place(tmp, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _rename_into_place(self, tmp: Path, meta: dict[str, Any]) -> AdapterVersion:
        latest = self.latest()
        number = (latest.version if latest else 0) + 1
        while True:
            target = self.directory / version_name(number)
            try:
                # os.mkdir-style exclusivity: rename onto an existing non-empty directory fails on POSIX
                if target.exists():
                    raise FileExistsError(target)
                os.rename(tmp, target)
            except (FileExistsError, OSError) as exc:
                if not target.exists():
                    raise RuntimeError(f"cannot move adapter into {target}: {exc}") from exc
                number += 1
                continue
            logger.info("saved adapter %s/%s", self.model_name, target.name)
            return AdapterVersion(self.model_name, number, target, meta)

    def update_metrics(self, version: AdapterVersion, metrics: Mapping[str, float]) -> AdapterVersion:
        """Record held-out metrics measured after saving (meta.json replaced atomically)."""
        meta = dict(version.meta)
        meta["metrics"] = {**meta.get("metrics", {}), **{k: float(v) for k, v in metrics.items()}}
        write_atomic(version.path / META_FILE, json.dumps(meta, indent=2, default=str).encode())
        return AdapterVersion(version.model_name, version.version, version.path, meta)

    def promoted(self) -> AdapterVersion | None:
        """The version the pointer names, or ``None`` when nothing was promoted yet."""
        pointer = self.directory / PROMOTED_FILE
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        return self.get(name)

    def load_promoted(self) -> AdapterVersion | None:
        """The promoted version after checking every file against the hashes in its ``meta.json``.

        Raises ``ValueError`` when the files on disk do not match (tampered or damaged); never returns a partial one.
        """
        version = self.promoted()
        if version is None:
            return None
        self.verify(version)
        return version

    def verify(self, version: AdapterVersion) -> None:
        for name, digest in version.meta.get("files", {}).items():
            path = version.path / name
            if not path.is_file() or _sha256(path) != digest:
                raise ValueError(f"adapter {version.model_name}/{version.name}: {name} is missing or changed")

    def promote(
        self, version: AdapterVersion, *, metric: str | None = None, tolerance: float = 0.0, force: bool = False
    ) -> bool:
        """Point ``promoted`` at ``version`` if it passes the gate on ``metric`` (or ``force``); True if it did."""
        self.verify(version)
        if not force:
            if metric is None:
                raise ValueError("promote needs the gate metric (or force=True)")
            current = self.promoted()
            if current is not None and current.version != version.version:
                if not passes_gate(version.metrics, current.metrics, metric, tolerance):
                    logger.info(
                        "not promoting %s: %s %.4f < %s's %.4f",
                        version.name,
                        metric,
                        version.metrics[metric],
                        current.name,
                        current.metrics[metric],
                    )
                    return False
            elif metric not in version.metrics:
                raise ValueError(f"candidate {version.name} has no metric {metric!r}")
        write_atomic(self.directory / PROMOTED_FILE, (version.name + "\n").encode())
        logger.info("promoted adapter %s/%s", self.model_name, version.name)
        return True

    def remove_incomplete(self) -> int:
        """Delete temporary directories left by crashed saves; returns how many."""
        if not self.directory.is_dir():
            return 0
        stale = [p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith(_TMP_PREFIX)]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads((path / META_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None
