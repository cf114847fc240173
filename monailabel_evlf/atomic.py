"""Crash-safe file writes: a temp file beside the target, fsync, then one rename.

Adapters (the registry's meta and ``promoted`` files) and the app's datastore (uploads, labels, its index) all write
this way, so a kill at any moment leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_CHUNK = 1 << 20


def write_atomic(destination: str | os.PathLike[str], data: bytes | None = None, source: str | None = None) -> None:
    """Write ``data`` (or a copy of ``source``) to ``destination`` via a temp file and rename, so a kill leaves
    either the old file or the new one, never half of one."""
    destination = Path(destination)
    handle, temp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            if source is not None:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, _CHUNK)
            else:
                out.write(data or b"")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, destination)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
