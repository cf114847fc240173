"""Visual questions with known answers, made from a phantom's ground truth (never from a model).

Question types follow VQA-RAD / SLAKE: presence, organ, side, count, size, kind (their "abnormality"), position,
modality and plane. Every type comes closed (``options`` given, shuffled; the answer is one of them) and open
(``options`` is ``None``), each in one of several phrasings picked by the caller's generator. Answers are short
canonical words ("liver", "right", "yes", "2", "cyst", "about 20 mm") so that closed accuracy (exact after
normalisation) and open token recall (:func:`monailabel_evlf.tasks.metrics.token_recall`) both score them.

Slice questions (scope ``"slice"``) see the lesions whose ``slice_boxes`` contain that ``(axis, index)``; when a
slice or study holds several lesions, a question about "the lesion" is about the largest one (on the slice: the
largest in-plane box; in the study: the most voxels) and says so ("the largest lesion"), or names it by its kind
when no other lesion there shares it ("the cyst"). Sidecar fields used: docs/sample-data.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monailabel_evlf.data.phantoms import GROUND_TRUTH_DIR, LESION_KINDS, NORMAL_LABEL, ORGANS

QUESTION_TYPES = ("presence", "organ", "side", "count", "size", "kind", "position", "modality", "plane")
SIZE_BUCKETS = ("under 10 mm", "10 to 20 mm", "20 to 30 mm", "over 30 mm")
MODALITIES = ("CT", "MRI", "X-ray", "ultrasound")
PLANES = ("axial", "coronal", "sagittal")
VQA_SUFFIX = "_vqa.jsonl"
# a position word is asked only where the lesion is this far (in organ half extents) from the organ centre
_DECISIVE_OFFSET = 0.2
# sidecar position key, its LPS axis, and the two words it decides between
_DIRECTIONS = {
    "superior_inferior": (2, ("upper", "lower")),
    "anterior_posterior": (1, ("anterior", "posterior")),
    "medial_lateral": (0, ("medial", "lateral")),
}
# the directions a slice of each plane shows
_IN_PLANE = {
    "axial": ("anterior_posterior", "medial_lateral"),
    "coronal": ("superior_inferior", "medial_lateral"),
    "sagittal": ("superior_inferior", "anterior_posterior"),
}

_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "slice": {
        "presence": (
            "Is there a lesion in this slice?",
            "Does this image show any focal lesion?",
            "Is any abnormality visible in this slice?",
        ),
        "organ_presence": (
            "Is there a lesion in the {organ} in this slice?",
            "Does the {organ} show a lesion in this image?",
            "Is the {organ} abnormal in this slice?",
        ),
        "count": (
            "How many lesions are in this slice?",
            "How many focal lesions does this image show?",
            "What is the number of lesions visible in this slice?",
        ),
        "size": (
            "How large is {subject} in this slice?",
            "What is the size of {subject} in this image?",
            "How big is {subject} on this slice?",
        ),
        "modality": (
            "What imaging modality is this?",
            "Which modality was used to acquire this image?",
            "What kind of scan is this image from?",
        ),
        "plane": (
            "In which plane is this image?",
            "What is the imaging plane of this slice?",
            "Which plane is this slice in?",
        ),
    },
    "study": {
        "presence": (
            "Is there a lesion in this study?",
            "Does this CT show any focal lesion?",
            "Is any abnormality present in this scan?",
        ),
        "organ_presence": (
            "Is there a lesion in the {organ}?",
            "Does the {organ} contain a focal lesion?",
            "Is the {organ} abnormal in this study?",
        ),
        "count": (
            "How many lesions are in this study?",
            "How many focal lesions does this CT show?",
            "What is the number of lesions in this scan?",
        ),
        "organ_count": (
            "How many lesions are in the {organ}?",
            "How many focal lesions does the {organ} contain?",
            "What is the number of lesions in the {organ}?",
        ),
        "size": (
            "How large is {subject}?",
            "What is the diameter of {subject}?",
            "What size is {subject}?",
        ),
        "modality": (
            "What imaging modality is this study?",
            "Which modality was used to acquire this scan?",
            "What kind of scan is this?",
        ),
    },
    "any": {
        "organ": ("In which organ is {subject}?", "Which organ contains {subject}?", "Where is {subject} located?"),
        "side": (
            "On which side of the patient is {subject}?",
            "Which side of the body is {subject} on?",
            "Is {subject} on the patient's right or left side?",
        ),
        "kind": (
            "What kind of abnormality is {subject}?",
            "Which type of lesion is {subject}?",
            "How would you classify {subject}?",
        ),
        "position_closed": (
            "Is {subject} in the {first} or the {second} part of the {organ}?",
            "Does {subject} lie in the {first} or {second} part of the {organ}?",
            "Which part of the {organ} holds {subject}, {first} or {second}?",
        ),
        "position": (
            "Where within the {organ} is {subject}?",
            "In which part of the {organ} is {subject}?",
            "Where in the {organ} does {subject} lie?",
        ),
    },
}


@dataclass(frozen=True)
class VQAItem:
    """One question with its reference answer; ``options`` set makes it closed (the answer is one of them)."""

    question: str
    answer: str
    question_type: str
    options: tuple[str, ...] | None
    scope: str  # "slice" or "study"
    axis: int | None  # the slice (scope "slice")
    index: int | None
    lesion_ids: tuple[int, ...]  # the lesions the answer rests on, the one asked about first

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "options": list(self.options) if self.options else None,
            "lesion_ids": list(self.lesion_ids),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VQAItem:
        options = data.get("options")
        return cls(**{**data, "options": tuple(options) if options else None, "lesion_ids": tuple(data["lesion_ids"])})


def size_bucket(mm: float) -> str:
    """The closed-question size class of a length in mm (:data:`SIZE_BUCKETS`)."""
    return SIZE_BUCKETS[int(np.searchsorted([10.0, 20.0, 30.0], mm, side="right"))]


def size_answer(mm: float) -> str:
    """Open size answer, rounded to 5 mm (at least 5): "about 20 mm"."""
    return f"about {max(5, 5 * round(mm / 5))} mm"


def plane_of(ground_truth: dict[str, Any], axis: int) -> str:
    """Axial / coronal / sagittal: the patient axis the slice normal (volume ``axis``) is closest to."""
    direction = np.asarray(ground_truth["affine_lps"], dtype=float)[:3, axis]
    return PLANES[[2, 1, 0].index(int(np.argmax(np.abs(direction))))]


def lesions_on_slice(ground_truth: dict[str, Any], axis: int, index: int) -> list[tuple[dict[str, Any], float]]:
    """``(lesion, in-plane extent in mm)`` for the lesions cut by the slice, largest in-plane box first."""
    a, b = (n for n in range(3) if n != axis)
    spacing = ground_truth["spacing"]
    found = []
    for lesion in ground_truth["lesions"]:
        for entry in lesion["slice_boxes"]:
            if entry["axis"] == axis and entry["index"] == index:
                a1, b1, a2, b2 = entry["box"]
                area = (a2 - a1) * (b2 - b1) * spacing[a] * spacing[b]
                extent = max((a2 - a1) * spacing[a], (b2 - b1) * spacing[b])
                found.append((area, lesion["id"], lesion, float(extent)))
    found.sort(key=lambda row: (-row[0], row[1]))
    return [(lesion, extent) for _, _, lesion, extent in found]


def _by_size(lesions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A study's lesions, most voxels first: the first is "the largest lesion" of study questions."""
    return sorted(lesions, key=lambda lesion: (-lesion["voxel_count"], lesion["id"]))


def _subject(lesion: dict[str, Any], others: Sequence[dict[str, Any]], name_kind: bool = True) -> str:
    if len(others) == 1:
        return "the lesion"
    if name_kind and sum(o["label"] == lesion["label"] for o in others) == 1:
        return f"the {lesion['label']}"
    return "the largest lesion"


class _Asker:
    """Builds the closed and open item of each type for one slice or study."""

    def __init__(self, rng: np.random.Generator, scope: str, axis: int | None, index: int | None) -> None:
        self.rng, self.scope, self.axis, self.index = rng, scope, axis, index
        self.items: list[VQAItem] = []

    def phrase(self, key: str, **fields: str) -> str:
        phrases = _PHRASES[self.scope].get(key) or _PHRASES["any"][key]
        return phrases[int(self.rng.integers(len(phrases)))].format(**fields)

    def add(self, qtype: str, question: str, answer: str, options: Sequence[str] | None, ids: Sequence[int]) -> None:
        shuffled = tuple(str(o) for o in self.rng.permutation(list(options))) if options else None
        item = VQAItem(question, answer, qtype, shuffled, self.scope, self.axis, self.index, tuple(int(i) for i in ids))
        self.items.append(item)

    def both(self, qtype: str, key: str, answer: str, options: Sequence[str], ids: Sequence[int], **fields) -> None:
        """The closed and the open form, each in its own drawn phrasing."""
        self.add(qtype, self.phrase(key, **fields), answer, options, ids)
        self.add(qtype, self.phrase(key, **fields), answer, None, ids)


def _ask(
    asker: _Asker,
    ground_truth: dict[str, Any],
    lesions: Sequence[dict[str, Any]],
    size_mm: float | None,
    directions: Sequence[str],
) -> list[VQAItem]:
    """Items about ``lesions`` (largest first; ``size_mm`` the largest's size) for the asker's slice or study."""
    ids = [lesion["id"] for lesion in lesions]
    yes_no = ("yes", "no")
    asker.both("presence", "presence", "yes" if lesions else "no", yes_no, ids)
    organ = str(asker.rng.choice(ORGANS))
    in_organ = [lesion["id"] for lesion in lesions if lesion["organ"] == organ]
    asker.both("presence", "organ_presence", "yes" if in_organ else "no", yes_no, in_organ, organ=organ)
    counts = [str(n) for n in range(max(5, len(lesions) + 1))]
    asker.both("count", "count", str(len(lesions)), counts, ids)
    asker.both("modality", "modality", ground_truth["modality"], MODALITIES, ())
    if not lesions:
        return asker.items
    largest = lesions[0]
    subject = _subject(largest, lesions)
    one = [largest["id"]]
    asker.both("organ", "organ", largest["organ"], ORGANS, one, subject=subject)
    asker.both("side", "side", largest["side"], ("right", "left"), one, subject=subject)
    asker.add("size", asker.phrase("size", subject=subject), size_bucket(size_mm), SIZE_BUCKETS, one)
    asker.add("size", asker.phrase("size", subject=subject), size_answer(size_mm), None, one)
    asker.both("kind", "kind", largest["label"], LESION_KINDS, one, subject=_subject(largest, lesions, False))
    position = largest["position"]
    decisive = [d for d in directions if abs(position["relative_offset_lps"][_DIRECTIONS[d][0]]) >= _DECISIVE_OFFSET]
    if decisive:
        where = {"subject": subject, "organ": largest["organ"]}
        asked = str(asker.rng.choice(decisive))
        words = _DIRECTIONS[asked][1]
        first, second = (str(w) for w in asker.rng.permutation(list(words)))
        question = asker.phrase("position_closed", first=first, second=second, **where)
        asker.add("position", question, position[asked], words, one)
        open_answer = " ".join(position[d] for d in _DIRECTIONS if d in decisive)
        asker.add("position", asker.phrase("position", **where), open_answer, None, one)
    return asker.items


def slice_questions(ground_truth: dict[str, Any], axis: int, index: int, rng: np.random.Generator) -> list[VQAItem]:
    """Closed and open questions about one slice of a phantom (its sidecar dict); lesion-free slices get the
    presence ("no"), count ("0") and modality / plane questions. About several lesions: module docstring.
    Position asks only the directions the slice shows (anterior / posterior, medial / lateral on an axial one)."""
    if not 0 <= index < ground_truth["shape"][axis]:
        raise ValueError(f"slice {index} is outside axis {axis} of a {ground_truth['shape']} study")
    found = lesions_on_slice(ground_truth, axis, index)
    asker = _Asker(rng, "slice", axis, index)
    plane = plane_of(ground_truth, axis)
    _ask(asker, ground_truth, [lesion for lesion, _ in found], found[0][1] if found else None, _IN_PLANE[plane])
    asker.both("plane", "plane", plane, PLANES, ())
    return asker.items


def study_questions(ground_truth: dict[str, Any], rng: np.random.Generator) -> list[VQAItem]:
    """Closed and open questions about a whole study (sizes are the lesions' diameters; position includes
    upper / lower), plus how many lesions one drawn organ holds."""
    lesions = _by_size(ground_truth["lesions"])
    asker = _Asker(rng, "study", None, None)
    _ask(asker, ground_truth, lesions, lesions[0]["diameter_mm"] if lesions else None, tuple(_DIRECTIONS))
    organ = str(rng.choice(ORGANS))
    in_organ = [lesion["id"] for lesion in lesions if lesion["organ"] == organ]
    counts = [str(n) for n in range(max(5, len(in_organ) + 1))]
    asker.both("count", "organ_count", str(len(in_organ)), counts, in_organ, organ=organ)
    return asker.items


def study_vqa(ground_truth: dict[str, Any], seed: Any, normal_slices: int = 3) -> list[VQAItem]:
    """The VQA set written beside a sidecar: every slice a lesion crosses, ``normal_slices`` lesion-free slices
    (every phantom slice cuts the body) and the study questions; deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    axis = 2
    crossed = sorted(
        {e["index"] for lesion in ground_truth["lesions"] for e in lesion["slice_boxes"] if e["axis"] == axis}
    )
    free = [k for k in range(ground_truth["shape"][axis]) if k not in set(crossed)]
    chosen = sorted(int(k) for k in rng.permutation(free)[:normal_slices])
    items = [item for k in sorted(crossed + chosen) for item in slice_questions(ground_truth, axis, k, rng)]
    return items + study_questions(ground_truth, rng)


def item_truth(ground_truth: dict[str, Any], item: VQAItem) -> dict[str, Any]:
    """The truth behind ``item`` for evaluation groups and reasoning checks (the ``TrainingSample.source`` keys
    ``evlf eval`` reads): ``organ``, the host organ of the lesion the answer rests on (``lesion_ids[0]``), ``None``
    when it rests on none (a lesion-free slice, or "Is there a lesion in the spleen?" "no" beside a liver cyst);
    ``lesion_kind`` and ``size_bucket`` of that lesion, else of the largest lesion there (what the slice or study
    shows; ``"normal"`` / ``None`` when lesion-free); ``question_type``, ``scope``, ``closed``."""
    if item.scope == "slice":
        found = lesions_on_slice(ground_truth, item.axis, item.index)
    else:
        found = [(lesion, lesion["diameter_mm"]) for lesion in _by_size(ground_truth["lesions"])]
    about = [row for row in found if row[0]["id"] in item.lesion_ids[:1]]
    lesion, size = (about or found or [(None, None)])[0]
    return {
        "question_type": item.question_type,
        "scope": item.scope,
        "closed": item.options is not None,
        "organ": lesion["organ"] if about else None,
        "lesion_kind": lesion["label"] if lesion else NORMAL_LABEL,
        "size_bucket": size_bucket(size) if lesion else None,
    }


def vqa_path(datastore_dir: str | Path, study_id: str) -> Path:
    return Path(datastore_dir) / GROUND_TRUTH_DIR / f"{study_id}{VQA_SUFFIX}"


def write_vqa(items: Sequence[VQAItem], path: str | Path) -> Path:
    """One JSON object per line (the :class:`VQAItem` fields)."""
    path = Path(path)
    path.write_text("".join(json.dumps(item.to_json()) + "\n" for item in items))
    return path


def read_vqa(datastore_dir: str | Path, study_id: str) -> list[VQAItem]:
    """The VQA set ``evlf make-sample-data`` wrote for one study."""
    path = vqa_path(datastore_dir, study_id)
    if not path.is_file():
        raise FileNotFoundError(f"no VQA set for study {study_id!r}: {path}")
    return [VQAItem.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
