"""What a question about a whole study asks, so the pipeline can answer it from the study's 3D findings.

A slice-by-slice model cannot answer "is there a lesion in this study?" or "how many lesions?" by voting: most
slices of an abnormal study are normal, and a lesion on five slices is one lesion, not five. Those two question
kinds are answered from the grounding pipeline's 3D boxes, and so is "how large" (measured on the box in mm, as a
reader measures, rather than guessed from a picture resized without its pixel spacing); questions about a finding
("which side is the lesion on?") go to the model on the slice that shows the largest finding; the rest (modality,
...) keep the slice vote. Plain keyword rules, because the question kinds are few and a wrong rule must be easy to
see and fix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from monailabel_evlf.tasks.labels import normalize

# organ names a question may restrict itself to ("a lesion in the left kidney"); longest first when matching
ORGAN_WORDS: tuple[str, ...] = (
    "liver",
    "spleen",
    "right kidney",
    "left kidney",
    "kidney",
    "pancreas",
    "gallbladder",
    "adrenal",
    "right lung",
    "left lung",
    "lung",
    "bladder",
    "prostate",
    "uterus",
    "brain",
)
_YES_NO_STARTS = ("is ", "are ", "does ", "do ", "has ", "have ", "can ")
_FINDING_WORDS = ("lesion", "lesions", "abnormality", "abnormal", "finding", "findings", "mass", "nodule", "tumour")

_SIZE_WORDS = ("size", "large", "big", "diameter", "measure", "measures", "wide", "long")
_BELOW_WORDS = ("under", "below", "less", "smaller")
_ABOVE_WORDS = ("over", "above", "more", "larger", "greater", "bigger")

StudyQuestionKind = Literal["presence", "count", "size", "finding", "other"]


@dataclass(frozen=True)
class StudyQuestion:
    """``kind`` of question and the organ it is restricted to (``None``: the whole study)."""

    kind: StudyQuestionKind
    organ: str | None = None


def parse_study_question(
    question: str, labels: Iterable[str] = (), organs: Iterable[str] = ORGAN_WORDS
) -> StudyQuestion:
    """``presence``: a yes/no question about any finding ("Does the liver contain a focal lesion?"); ``count``: "how
    many" / "number of"; ``size``: how large a finding is ("What is the diameter of the cyst?"); ``finding``: about a
    finding ("Which side is the lesion on?", "Is the cyst in the upper or
    lower part ...?"; ``labels`` are finding names too); ``other``: anything else (modality)."""
    text = f" {normalize(question)} "
    words = set(text.split())
    organ = next((o for o in sorted(organs, key=len, reverse=True) if f" {normalize(o)} " in text), None)
    named = any(f" {normalize(label)} " in text for label in labels)
    about_finding = named or bool(words.intersection(_FINDING_WORDS))
    if "how many" in text or "number of" in text:
        return StudyQuestion("count", organ)
    if text.lstrip().startswith(_YES_NO_STARTS) and " or " not in text and about_finding:
        return StudyQuestion("presence", organ)
    if about_finding and words.intersection(_SIZE_WORDS):
        return StudyQuestion("size", organ)
    if about_finding or "largest" in words:
        return StudyQuestion("finding", organ)
    return StudyQuestion("other", organ)


def organ_matches(answer: str, organ: str) -> bool:
    """Whether a model's organ answer names ``organ`` ("the left kidney" names "left kidney" and "kidney")."""
    return f" {normalize(organ)} " in f" {normalize(answer)} "


def size_option(mm: float, options: Sequence[str] | None) -> str | None:
    """The option whose size range holds ``mm`` ("under 10 mm", "10 to 20 mm", "over 3 cm"), or None (no options, or
    none says a range that holds it)."""
    for option in options or ():
        text = option.lower()  # not normalize(): it would split "2.5 cm" into two numbers
        words = set(re.findall(r"[a-z]+", text))
        scale = 10.0 if "cm" in words else 1.0
        numbers = [float(n) * scale for n in re.findall(r"\d+(?:\.\d+)?", text)]
        if len(numbers) == 2:
            low, high = sorted(numbers)
        elif len(numbers) == 1 and words.intersection(_BELOW_WORDS):
            low, high = 0.0, numbers[0]
        elif len(numbers) == 1 and words.intersection(_ABOVE_WORDS):
            low, high = numbers[0], math.inf
        else:
            continue
        if low <= mm < high:
            return option
    return None


__all__ = ["ORGAN_WORDS", "StudyQuestion", "organ_matches", "parse_study_question", "size_option"]
