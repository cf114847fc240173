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

# Words that, shortly before a label, deny it: "no cyst is seen" must not read as "cyst".
_NEGATIONS = frozenset({"no", "not", "without", "negative", "absent", "excluded", "free"})
_NEGATION_REACH = 3

_PUNCTUATION = re.compile(r"[^\w\s-]")
_SPACES = re.compile(r"[\s_-]+")


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, runs of spaces/underscores/hyphens collapsed to one space."""
    return _SPACES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).strip()


def _mentioned(phrase: list[str], words: list[str]) -> bool:
    """``phrase`` occurs in ``words`` (whole words) without a negation in the few words before it."""
    n = len(phrase)
    return any(
        words[start : start + n] == phrase
        and not _NEGATIONS.intersection(words[max(0, start - _NEGATION_REACH) : start])
        for start in range(len(words) - n + 1)
    )


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
        """Exact, then a label phrase in the text (not negated), then the closest near miss above ``cutoff``."""
        if not text:
            return None
        key = normalize(text)
        if key in self._exact:
            return self._exact[key]
        words = key.split()
        for phrase in self._phrases:
            if phrase and _mentioned(phrase.split(), words):
                return self._exact[phrase]
        close = difflib.get_close_matches(key, self._phrases, n=1, cutoff=self.cutoff)
        return self._exact[close[0]] if close else None


def is_correct_diagnosis(answer_label: str | None, format_ok: bool, label: str, synonyms: Iterable[str] = ()) -> bool:
    """The paper's diagnosis reward rule: "the correct diagnosis in the expected format".

    ``answer_label`` is what the ``<answer>`` block names (``ParsedAnswer.label``); it counts only when the whole
    completion is well formed and it *is* ``label`` (or one of its ``synonyms``) after :func:`normalize` — a
    longer phrase containing the label, or a near miss, earns nothing, so GRPO pushes towards the exact term.
    For ``"normal"``, the :data:`NORMAL_PHRASES` ("no finding", ...) are the same diagnosis.
    """
    if not format_ok or not answer_label:
        return False
    accepted = {normalize(label), *(normalize(s) for s in synonyms)}
    if normalize(label) == NORMAL_LABEL:
        accepted.update(normalize(phrase) for phrase in NORMAL_PHRASES)
    return normalize(answer_label) in accepted
