"""Matching what a model wrote against a label set: case, punctuation, synonyms, near misses, "normal".

Two rules on purpose: :meth:`LabelMatcher.match` is lenient (what a radiologist would accept when reading the
answer: "Hepatic cyst." -> "cyst"), :meth:`LabelMatcher.strict` is the paper's reward rule ("the correct
diagnosis in the expected format": exact after normalisation and synonyms, no fuzzy matching).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping

NORMAL_LABEL = "normal"

#: Phrases that mean "nothing found"; they map to :data:`NORMAL_LABEL` when the label set has it.
NORMAL_PHRASES = (
    "normal",
    "no finding",
    "no findings",
    "no abnormality",
    "no abnormalities",
    "no lesion",
    "no lesions",
    "no focal lesion",
    "unremarkable",
    "negative",
    "healthy",
)

_PUNCTUATION = re.compile(r"[^\w\s-]")
_SPACES = re.compile(r"[\s_-]+")


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, runs of spaces/underscores/hyphens collapsed to one space."""
    return _SPACES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).strip()


class LabelMatcher:
    """Maps free text to one label of a fixed set (or ``None``)."""

    def __init__(
        self, labels: Iterable[str], synonyms: Mapping[str, Iterable[str]] | None = None, cutoff: float = 0.85
    ) -> None:
        self.labels = list(dict.fromkeys(labels))
        if not self.labels:
            raise ValueError("a label set needs at least one label")
        if not 0.0 < cutoff <= 1.0:
            raise ValueError(f"cutoff must be in (0, 1], got {cutoff}")
        self.cutoff = cutoff
        self._exact: dict[str, str] = {normalize(label): label for label in self.labels}
        for label, words in (synonyms or {}).items():
            if label not in self.labels:
                raise ValueError(f"synonyms given for {label!r}, which is not in the label set {self.labels}")
            self._exact.update({normalize(word): label for word in words})
        if NORMAL_LABEL in self.labels:
            self._exact.update({normalize(phrase): NORMAL_LABEL for phrase in NORMAL_PHRASES})
        # longest phrase first, so "ring enhancing lesion" wins over "lesion"
        self._phrases = sorted(self._exact, key=len, reverse=True)

    def strict(self, text: str | None) -> str | None:
        """The label whose name (or synonym) *is* the text after normalisation, else ``None``."""
        return self._exact.get(normalize(text)) if text else None

    def match(self, text: str | None) -> str | None:
        """Exact, then a label phrase contained in the text, then the closest near miss above ``cutoff``."""
        if not text:
            return None
        key = normalize(text)
        if key in self._exact:
            return self._exact[key]
        padded = f" {key} "
        for phrase in self._phrases:
            if phrase and f" {phrase} " in padded:
                return self._exact[phrase]
        close = difflib.get_close_matches(key, self._phrases, n=1, cutoff=self.cutoff)
        return self._exact[close[0]] if close else None
