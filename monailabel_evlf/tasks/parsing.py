"""Reading model answers: ``<think>`` reasoning, ``<answer>`` text, a label and boxes in rendered-image pixels.

Real VLMs write boxes in many shapes: Qwen2.5-VL JSON ``bbox_2d``, bare ``[x1, y1, x2, y2]`` lists, InternVL /
Qwen-VL ``<box>[[...]]</box>`` or ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` tags, in absolute pixels or 0-1000,
with corners swapped, values off the image, inside code fences, truncated mid-answer. :func:`parse_answer` reads
all of these, records what it had to repair in ``issues`` and never raises on model text: a server must answer
even when the model rambles.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.model.backend import BoxConvention
from monailabel_evlf.tasks.box_format import decode_box

_STRICT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.S)
_THINK = re.compile(r"<think>(.*?)(?:</think>|(?=<answer>)|$)", re.S)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
_FENCE = re.compile(r"```(?:json|JSON)?")
_NUMBER = r"-?\d+(?:\.\d+)?"
_FOUR = rf"({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})"
_BBOX_KEY = re.compile(rf'"(?:bbox_2d|bbox|box)"\s*:\s*\[\s*{_FOUR}\s*\]')
_LABEL_KEY = re.compile(r'"(?:label|name|category)"\s*:\s*"([^"]*)"')
_REF = r"(?:(?:<ref>|<\|object_ref_start\|>)(?P<ref>[^<]*)(?:</ref>|<\|object_ref_end\|>)\s*)?"
_PAIR_TAG = re.compile(
    rf"{_REF}(?:<\|box_start\|>|<box>)\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*,?\s*"
    rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*(?:<\|box_end\|>|</box>)"
)
_LIST_TAG = re.compile(rf"{_REF}<box>\s*\[\s*\[\s*{_FOUR}\s*\]\s*\]\s*</box>")
_BARE_LIST = re.compile(rf"\[\s*{_FOUR}\s*\]")
_LABEL_PREFIX = re.compile(r"^\s*(?:final\s+)?(?:diagnosis|answer|label|finding)\s*[:\-]\s*", re.I)


@dataclass
class ParsedAnswer:
    """What a model answer says, in the rendered image's pixels; ``issues`` lists every repair made."""

    text: str
    reasoning: str = ""
    answer: str = ""
    label: str | None = None
    boxes: list[Box2D] = field(default_factory=list)
    format_ok: bool = False
    issues: list[str] = field(default_factory=list)


def split_answer(text: str) -> tuple[str, str, bool]:
    """``(reasoning, answer, format_ok)``; format_ok only for exactly one think block then one answer block."""
    strict = _STRICT.fullmatch(text)
    if strict and text.count("<think>") == 1 and text.count("<answer>") == 1:
        return strict["think"].strip(), strict["answer"].strip(), True
    think = _THINK.search(text)
    answer = _ANSWER.search(text)
    reasoning = think.group(1).strip() if think else ""
    if answer:
        body = answer.group(1)
    elif "</think>" in text:
        body = text.split("</think>", 1)[1]
    else:
        body = "" if think else text
    return reasoning, body.strip(), False


def _json_items(body: str) -> list[dict[str, Any]]:
    """Objects with a box from a JSON answer (one object or a list), or [] when it is not JSON."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    items = data if isinstance(data, list) else [data]
    return [item for item in items if isinstance(item, dict)]


def _raw_boxes(body: str) -> list[tuple[list[float], str | None]]:
    """Every box in the answer as (4 numbers in the backend's convention, label or None), in reading order."""
    found: list[tuple[list[float], str | None]] = []
    for item in _json_items(body):
        coords = item.get("bbox_2d", item.get("bbox", item.get("box")))
        label = item.get("label", item.get("name", item.get("category")))
        if isinstance(coords, list) and len(coords) == 4 and all(isinstance(v, int | float) for v in coords):
            found.append(([float(v) for v in coords], str(label) if label is not None else None))
    if found:
        return found
    # Not valid JSON (truncated, trailing prose, single quotes...): read key by key.
    for match in _BBOX_KEY.finditer(body):
        # the label may come before or after the box inside the same object
        start = body.rfind("{", 0, match.start())
        end = body.find("}", match.end())
        label = _LABEL_KEY.findall(body[max(start, 0) : end if end >= 0 else len(body)])
        found.append(([float(v) for v in match.groups()], label[0] if label else None))
    if found:
        return found
    for match in _PAIR_TAG.finditer(body):
        found.append(([float(v) for v in match.groups()[1:]], (match["ref"] or "").strip() or None))
    for match in _LIST_TAG.finditer(body):
        found.append(([float(v) for v in match.groups()[1:]], (match["ref"] or "").strip() or None))
    if found:
        return found
    return [([float(v) for v in match.groups()], None) for match in _BARE_LIST.finditer(body)]


def _label_text(body: str, boxes_found: bool) -> str | None:
    """The label a diagnosis / VQA answer names: first line, prefix and trailing punctuation removed."""
    if boxes_found:
        return None
    line = next((ln for ln in body.splitlines() if ln.strip()), "")
    label = _LABEL_PREFIX.sub("", line).strip().strip(".;,!\"'` ")
    return label or None


def parse_answer(
    text: str,
    convention: BoxConvention,
    image_size: tuple[int, int],
    model_input_size: tuple[int, int] | None = None,
) -> ParsedAnswer:
    """Parse one model answer; boxes come back clipped to the ``image_size`` (w, h) rendered image."""
    parsed = ParsedAnswer(text=text if isinstance(text, str) else "")
    try:
        _parse_into(parsed, convention, image_size, model_input_size)
    except Exception as exc:  # never raise on model text; the issue says what went wrong
        parsed.issues.append(f"unparseable answer: {type(exc).__name__}: {exc}")
    return parsed


def _parse_into(
    parsed: ParsedAnswer,
    convention: BoxConvention,
    image_size: tuple[int, int],
    model_input_size: tuple[int, int] | None,
) -> None:
    reasoning, body, parsed.format_ok = split_answer(parsed.text)
    parsed.reasoning = reasoning
    parsed.answer = _FENCE.sub("", body).strip()
    if not parsed.format_ok:
        parsed.issues.append("not in <think>...</think><answer>...</answer> form")
    width, height = image_size
    raw = _raw_boxes(parsed.answer)
    for numbers, label in raw:
        box = decode_box(numbers, convention, image_size, model_input_size, label=label)
        x1, y1 = min(max(box.x1, 0.0), width), min(max(box.y1, 0.0), height)
        x2, y2 = min(max(box.x2, 0.0), width), min(max(box.y2, 0.0), height)
        if (x1, y1, x2, y2) != (box.x1, box.y1, box.x2, box.y2):
            parsed.issues.append(f"box {numbers} clipped to the image")
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            parsed.issues.append(f"box {numbers} is empty inside the image; dropped")
            continue
        if numbers[0] > numbers[2] or numbers[1] > numbers[3]:
            parsed.issues.append(f"box {numbers} had swapped corners")
        parsed.boxes.append(Box2D(x1, y1, x2, y2, label=label))
    labels = [box.label for box in parsed.boxes if box.label]
    parsed.label = labels[0] if labels else _label_text(parsed.answer, bool(raw))
