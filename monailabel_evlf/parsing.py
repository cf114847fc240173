"""Parsing of option strings shared by every layer (backend options, ``--conf``, request params).

It imports nothing, so backends, the app and the CLI can all use it without pulling in each other.
"""

from __future__ import annotations

from typing import Any

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
BOOLEAN_WORDS = ", ".join(f"{t}/{f}" for t, f in zip(TRUE_WORDS, FALSE_WORDS, strict=True))


def parse_bool(value: Any, key: str) -> bool:
    """A JSON boolean or one of the usual words (case and spaces ignored) -> bool.

    Anything else raises a ValueError naming ``key`` and the accepted words, because reading an unknown word as
    either value (``"off"`` as true) silently turns an option the wrong way."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"{key} must be a boolean ({BOOLEAN_WORDS}), got {value!r}")
