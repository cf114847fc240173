"""What a question about a whole study asks, so the pipeline can answer it from the study's 3D findings.

A slice-by-slice model cannot answer "is there a lesion in this study?" or "how many lesions?" by voting: most
slices of an abnormal study are normal, and a lesion on five slices is one lesion, not five. Those two question
kinds are answered from the grounding pipeline's 3D boxes; questions about a finding ("which side is the lesion
on?") go to the model on the slice that shows the largest finding; the rest (modality, ...) keep the slice vote.
Plain keyword rules, because the question kinds are few and a wrong rule must be easy to see and fix.
"""

from __future__ import annotations

from collections.abc import Iterable
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

StudyQuestionKind = Literal["presence", "count", "finding", "other"]


@dataclass(frozen=True)
class StudyQuestion:
    """``kind`` of question and the organ it is restricted to (``None``: the whole study)."""

    kind: StudyQuestionKind
    organ: str | None = None


def parse_study_question(
    question: str, labels: Iterable[str] = (), organs: Iterable[str] = ORGAN_WORDS
) -> StudyQuestion:
    """``presence``: a yes/no question about any finding ("Does the liver contain a focal lesion?"); ``count``: "how
    many" / "number of"; ``finding``: about a finding ("Which side is the lesion on?", "Is the cyst in the upper or
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
    if about_finding or "largest" in words:
        return StudyQuestion("finding", organ)
    return StudyQuestion("other", organ)


def organ_matches(answer: str, organ: str) -> bool:
    """Whether a model's organ answer names ``organ`` ("the left kidney" names "left kidney" and "kidney")."""
    return f" {normalize(organ)} " in f" {normalize(answer)} "


__all__ = ["ORGAN_WORDS", "StudyQuestion", "organ_matches", "parse_study_question"]
