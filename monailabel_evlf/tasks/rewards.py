"""The paper's verifiable rewards as plain callables in TRL's reward-function shape.

``fn(prompts, completions, **columns) -> list[float | None]``. Completions are strings or TRL conversational
messages (``[{"role": "assistant", "content": ...}]``). Dataset columns arrive as keyword lists aligned with the
completions:

- ``task``: ``"diagnosis"`` / ``"grounding"`` / ``"vqa"`` (absent: every reward scores every sample);
- ``label``: the true diagnosis (diagnosis_reward);
- ``gt_boxes``: boxes in rendered-image pixels (grounding): :class:`~monailabel_evlf.imaging.geometry.Box2D`,
  their ``to_dict()`` form (what a ``datasets.Dataset`` stores) or ``[x1, y1, x2, y2]`` lists;
- ``image_size``: ``(width, height)`` of the rendered image (grounding);
- ``answer``: the reference answer (vqa_f1_reward).

How the answers write boxes is one backend's, not a sample's: ``grounding_reward`` takes the backend's
:class:`~monailabel_evlf.tasks.box_codec.BoxCodec` as the ``box_codec`` keyword (our GRPO loop passes
``backend.box_codec``; with TRL fix it with :func:`functools.partial`); the default is native EVLF's 0..100 grid.
A reward returns ``None`` for a sample of another task, which TRL (and our GRPO loop) skip rather than count as 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from monailabel_evlf.imaging.geometry import Box2D, box_iou_2d
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention, SliceCodec
from monailabel_evlf.tasks.labels import is_correct_diagnosis, normalize
from monailabel_evlf.tasks.parsing import ParsedAnswer, parse_answer

RewardFunction = Callable[..., list[float | None]]
DEFAULT_IOU_FLOOR = 0.1
_NATIVE_BOX_CODEC = BoxCodec(BoxConvention.NORMALIZED_100)
_TEXT_ONLY = _NATIVE_BOX_CODEC.for_image((100, 100))  # format / label / answer text do not depend on box geometry


def completion_text(completion: Any) -> str:
    """The assistant text of a completion given as a string or as TRL conversational messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # multimodal content parts
            return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
        return str(content)
    return ""


def _column(columns: Mapping[str, Any], name: str, n: int) -> list[Any]:
    values = columns.get(name)
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} entries for {n} completions")
    return list(values)


def _parse(completion: Any, codec: SliceCodec = _TEXT_ONLY) -> ParsedAnswer:
    return parse_answer(completion_text(completion), codec)


def _applies(task: str | None, wanted: str) -> bool:
    return task is None or task == wanted


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """1 when the answer is exactly ``<think>...</think><answer>...</answer>`` with a non-empty answer, else 0."""
    out: list[float | None] = []
    for completion in completions:
        parsed = _parse(completion)
        out.append(1.0 if parsed.format_ok and parsed.answer else 0.0)
    return out


def diagnosis_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    **columns: Any,
) -> list[float | None]:
    """+1 for the correct diagnosis in the expected format (:func:`~.labels.is_correct_diagnosis`), else 0.

    ``synonyms`` (label -> accepted spellings) is fixed with :func:`functools.partial`, not a column.
    """
    n = len(completions)
    out: list[float | None] = []
    rows = zip(completions, _column(columns, "task", n), _column(columns, "label", n), strict=True)
    for completion, task, label in rows:
        if not _applies(task, "diagnosis") or label is None:
            out.append(None)
            continue
        parsed = _parse(completion)
        correct = is_correct_diagnosis(parsed.label, parsed.format_ok, label, (synonyms or {}).get(label, ()))
        out.append(1.0 if correct else 0.0)
    return out


def best_iou(predicted: Sequence[Box2D], truth: Sequence[Box2D]) -> float:
    """Mean over ground-truth boxes of the best IoU any predicted box reaches with it (0 with no prediction).

    With no ground truth (a normal slice) an empty answer scores 1 and any box 0.
    """
    if not truth:
        return 0.0 if predicted else 1.0
    if not predicted:
        return 0.0
    ious = np.asarray(box_iou_2d(list(predicted), list(truth)))  # (predicted, truth)
    return float(ious.max(axis=0).mean())


def _truth_boxes(values: Sequence[Any]) -> list[Box2D]:
    """Ground-truth boxes as Box2D, whichever of the documented ``gt_boxes`` forms a dataset stored."""
    boxes = []
    for value in values:
        if isinstance(value, Box2D):
            boxes.append(value)
        elif isinstance(value, Mapping):
            boxes.append(Box2D.from_dict(value))
        elif isinstance(value, Sequence) and len(value) == 4:
            boxes.append(Box2D(*value))
        else:
            raise ValueError(f"gt_boxes entries must be Box2D, dicts or [x1, y1, x2, y2], got {value!r}")
    return boxes


def grounding_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    iou_floor: float = DEFAULT_IOU_FLOOR,
    box_codec: BoxCodec = _NATIVE_BOX_CODEC,
    **columns: Any,
) -> list[float | None]:
    """IoU of the answer's boxes, read with ``box_codec``, with the ground truth (:func:`best_iou`), 0 below
    ``iou_floor``.

    Below the floor the model "pointed to the wrong location entirely" (paper, Methods) and earns nothing.
    """
    if not 0.0 <= iou_floor <= 1.0:
        raise ValueError(f"iou_floor must be in [0, 1], got {iou_floor}")
    n = len(completions)
    out: list[float | None] = []
    rows = zip(
        completions,
        _column(columns, "task", n),
        _column(columns, "gt_boxes", n),
        _column(columns, "image_size", n),
        strict=True,
    )
    for completion, task, truth, size in rows:
        if not _applies(task, "grounding") or truth is None:
            out.append(None)
            continue
        if size is None:
            raise ValueError("grounding_reward needs the image_size column to read boxes")
        iou = best_iou(_parse(completion, box_codec.for_image(size)).boxes, _truth_boxes(truth))
        out.append(iou if iou >= iou_floor else 0.0)
    return out


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between two answers (bags of :func:`~.labels.normalize`-d words)."""
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def vqa_f1_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """Token F1 between the ``<answer>`` text and the reference answer (the paper's open-VQA score)."""
    n = len(completions)
    out: list[float | None] = []
    rows = zip(completions, _column(columns, "task", n), _column(columns, "answer", n), strict=True)
    for completion, task, reference in rows:
        if not _applies(task, "vqa") or reference is None:
            out.append(None)
            continue
        out.append(token_f1(_parse(completion).answer, reference))
    return out


def combined(weighted: Mapping[RewardFunction, float] | Sequence[tuple[RewardFunction, float]]) -> RewardFunction:
    """One reward function: the weighted sum of several (``None`` terms skipped; ``None`` when all are).

    For trainers that take a single reward; TRL's ``GRPOTrainer`` can instead take the list and
    ``reward_weights``, which also logs each term.
    """
    pairs = list(weighted.items() if isinstance(weighted, Mapping) else weighted)
    if not pairs:
        raise ValueError("combined() needs at least one (reward function, weight) pair")

    def combined_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        total: list[float | None] = [None] * len(completions)
        for fn, weight in pairs:
            values = fn(prompts, completions, **columns)
            if len(values) != len(completions):
                raise ValueError(f"{_name(fn)} returned {len(values)} rewards for {len(completions)} completions")
            for i, value in enumerate(values):
                if value is not None:
                    total[i] = (total[i] or 0.0) + weight * value
        return total

    combined_reward.__name__ = "+".join(f"{weight:g}*{_name(fn)}" for fn, weight in pairs)
    return combined_reward


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def default_reward_functions(iou_floor: float = DEFAULT_IOU_FLOOR) -> tuple[RewardFunction, ...]:
    """Diagnosis, grounding (with ``iou_floor``), VQA F1 and format, in that order."""
    grounding = partial(grounding_reward, iou_floor=iou_floor)
    grounding.__name__ = "grounding_reward"  # type: ignore[attr-defined]  # TRL logs rewards by __name__
    return (diagnosis_reward, grounding, vqa_f1_reward, format_reward)
