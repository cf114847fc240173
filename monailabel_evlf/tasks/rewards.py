"""The paper's verifiable rewards as plain callables in TRL's reward-function shape.

``fn(prompts, completions, **columns) -> list[float | None]``: completions are strings or TRL conversational
messages; dataset columns arrive as keyword lists aligned with the completions (``task``, ``label``,
``gt_boxes``, ``answer``, ``image_size``, optional ``box_convention`` / ``model_input_size``). A reward returns
``None`` for samples of another task, which TRL (and our GRPO loop) skip rather than count as zero.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from monailabel_evlf.imaging.geometry import Box2D, box_iou_2d
from monailabel_evlf.model.backend import BoxConvention
from monailabel_evlf.tasks.labels import normalize
from monailabel_evlf.tasks.parsing import ParsedAnswer, parse_answer

RewardFunction = Callable[..., list[float | None]]
DEFAULT_IOU_FLOOR = 0.1


def completion_text(completion: Any) -> str:
    """The assistant text of a completion given as a string or as TRL conversational messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion:
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else ""
        if isinstance(content, list):  # multimodal content parts
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    return ""


def _column(columns: dict[str, Any], name: str, n: int, default: Any = None) -> list[Any]:
    values = columns.get(name)
    if values is None:
        return [default] * n
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} entries for {n} completions")
    return list(values)


def _parse(completion: Any, convention: Any, image_size: Any, model_input_size: Any) -> ParsedAnswer:
    convention = BoxConvention(convention) if convention is not None else BoxConvention.NORMALIZED_100
    return parse_answer(completion_text(completion), convention, tuple(image_size or (1, 1)), model_input_size)


def _applies(task: str | None, wanted: tuple[str, ...]) -> bool:
    return task is None or task in wanted


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """1 when the answer is exactly ``<think>...</think><answer>...</answer>`` with a non-empty answer, else 0."""
    out: list[float | None] = []
    for completion in completions:
        parsed = _parse(completion, None, None, None)
        out.append(1.0 if parsed.format_ok and parsed.answer else 0.0)
    return out


def diagnosis_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """+1 when the answer is in the expected format and *is* the correct label (case/punctuation aside), else 0."""
    n = len(completions)
    out: list[float | None] = []
    rows = zip(completions, _column(columns, "task", n), _column(columns, "label", n), strict=True)
    for completion, task, label in rows:
        if not _applies(task, ("diagnosis",)) or label is None:
            out.append(None)
            continue
        parsed = _parse(completion, None, None, None)
        correct = parsed.format_ok and normalize(parsed.label or "") == normalize(label)
        out.append(1.0 if correct else 0.0)
    return out


def best_iou(predicted: Sequence[Box2D], truth: Sequence[Box2D]) -> float:
    """Mean over ground-truth boxes of the best IoU any predicted box reaches (0 with no prediction)."""
    if not truth:
        return 1.0 if not predicted else 0.0
    if not predicted:
        return 0.0
    return sum(max(float(box_iou_2d(p, t)) for p in predicted) for t in truth) / len(truth)


def grounding_reward(
    prompts: Sequence[Any], completions: Sequence[Any], *, iou_floor: float = DEFAULT_IOU_FLOOR, **columns: Any
) -> list[float | None]:
    """IoU of the answer's boxes with the ground truth (best match per true box), 0 below ``iou_floor``."""
    n = len(completions)
    out: list[float | None] = []
    rows = zip(
        completions,
        _column(columns, "task", n),
        _column(columns, "gt_boxes", n),
        _column(columns, "image_size", n),
        _column(columns, "box_convention", n),
        _column(columns, "model_input_size", n),
        strict=True,
    )
    for completion, task, truth, size, convention, seen in rows:
        if not _applies(task, ("grounding",)) or truth is None:
            out.append(None)
            continue
        iou = best_iou(_parse(completion, convention, size, seen).boxes, truth)
        out.append(iou if iou >= iou_floor else 0.0)
    return out


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between two answers (bags of normalised words)."""
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
        if not _applies(task, ("vqa",)) or reference is None:
            out.append(None)
            continue
        out.append(token_f1(_parse(completion, None, None, None).answer, reference))
    return out


def default_reward_functions(iou_floor: float = DEFAULT_IOU_FLOOR) -> tuple[RewardFunction, ...]:
    """Diagnosis, grounding (with ``iou_floor``), VQA F1 and format, in that order."""
    grounding = partial(grounding_reward, iou_floor=iou_floor)
    grounding.__name__ = "grounding_reward"  # type: ignore[attr-defined]  # TRL logs rewards by __name__
    return (diagnosis_reward, grounding, vqa_f1_reward, format_reward)
