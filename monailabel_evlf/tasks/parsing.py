"""Reading model answers: ``<think>`` reasoning, ``<answer>`` text, a label and boxes in rendered-image pixels.

Real VLMs write boxes in many shapes: Qwen2.5-VL JSON ``bbox_2d``, bare ``[x1, y1, x2, y2]`` lists, InternVL /
Qwen-VL ``<box>[[...]]</box>`` or ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` tags (or just ``(x1,y1),(x2,y2)``
once a tokenizer has dropped those special tokens), LLaVA-style 0-1 fractions, in absolute pixels or 0-1000, with
corners swapped, values off the image, inside code fences, truncated mid-answer. :func:`parse_answer` reads all of
these, records every repair in ``issues`` and never raises on model text: a server must answer even when the model
rambles. Regular expressions rather than a grammar because the text is, by definition, not well formed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.tasks.box_codec import SliceCodec

_STRICT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.S)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_THINK = re.compile(r"<think>(.*?)(?:</think>|(?=<answer>)|$)", re.S)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
# End-of-turn markers some decoders leave in (skip_special_tokens=False); they are not the model's formatting.
_END_OF_TURN = re.compile(r"(?:\s*(?:<\|im_end\|>|<\|endoftext\|>|</s>|<\|eot_id\|>|<end_of_turn>|<eos>))+\s*$")
_FENCE = re.compile(r"```(?:json|JSON|python)?")
_NUMBER = r"-?\d+(?:\.\d+)?"
_FOUR = rf"({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})"
_PAIRS = rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*,?\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)"
_BOX_KEY = re.compile(rf"""["'](?:bbox_2d|bbox|box)["']\s*:\s*\[\s*{_FOUR}\s*\]""")
_LABEL_KEY = re.compile(r"""["'](?:label|name|category)["']\s*:\s*["']([^"'\n]*)["']""")
_REF = r"(?:(?:<ref>|<\|object_ref_start\|>)(?P<ref>[^<]*)(?:</ref>|<\|object_ref_end\|>)\s*)?"
_TAGGED = re.compile(
    rf"{_REF}(?:(?:<\|box_start\|>|<box>)\s*{_PAIRS}\s*(?:<\|box_end\|>|</box>)"
    rf"|<box>\s*\[\s*\[\s*{_FOUR}\s*\]\s*\]\s*</box>)"
)
_BARE_PAIRS = re.compile(_PAIRS)
_BARE_LIST = re.compile(rf"\[\s*{_FOUR}\s*\]")
_LABEL_PREFIX = re.compile(r"^\s*(?:[-*]\s*)?(?:final\s+)?(?:diagnosis|answer|label|finding)\s*[:\-]\s*", re.I)

RawBox = tuple[list[float], str | None]


@dataclass
class ParsedAnswer:
    """What a model answer says, in the rendered image's pixels; ``issues`` lists every repair made.

    ``format_ok`` is strict: exactly one ``<think>...</think>`` followed by one ``<answer>...</answer>``, nothing
    else around them. ``label`` is the first label a box carries, or for answers without boxes the answer's first
    line without a "Diagnosis:" prefix (free text: match it against a label set with
    :class:`~monailabel_evlf.tasks.labels.LabelMatcher`).
    """

    text: str
    reasoning: str = ""
    answer: str = ""
    label: str | None = None
    boxes: list[Box2D] = field(default_factory=list)
    format_ok: bool = False
    issues: list[str] = field(default_factory=list)


def split_answer(text: str) -> tuple[str, str, bool]:
    """``(reasoning, answer, format_ok)``; format_ok only for exactly one think block then one answer block."""
    text = _END_OF_TURN.sub("", text)
    strict = _STRICT.fullmatch(text)
    if strict and all(text.count(tag) == 1 for tag in _TAGS):
        return strict["think"].strip(), strict["answer"].strip(), True
    think = _THINK.search(text)
    answer = _ANSWER.search(text)
    reasoning = think.group(1).strip() if think else ""
    if answer:
        body = answer.group(1)
    elif "</think>" in text:
        body = text.split("</think>", 1)[1]
    else:
        body = "" if think else text  # truncated inside <think>: there is no answer yet
    return reasoning, body.strip(), False


def _numbers(values: Any) -> list[float] | None:
    numeric = isinstance(values, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return [float(v) for v in values] if numeric and len(values) == 4 else None


def _json_boxes(body: str) -> list[RawBox]:
    """Boxes of a well-formed JSON answer (one object or a list of objects); [] when it is not JSON."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    found = []
    for item in data if isinstance(data, list) else [data]:
        if not isinstance(item, dict):
            continue
        coords = _numbers(item.get("bbox_2d", item.get("bbox", item.get("box"))))
        label = item.get("label", item.get("name", item.get("category")))
        if coords is not None:
            found.append((coords, str(label) if label is not None else None))
    return found


def _keyed_boxes(body: str) -> list[RawBox]:
    """``"bbox_2d": [...]`` keys anywhere (broken JSON: truncated, single quotes, prose around it).

    The label is looked up inside the same ``{...}`` object, before or after the box key.
    """
    found = []
    for match in _BOX_KEY.finditer(body):
        start = body.rfind("{", 0, match.start())
        end = body.find("}", match.end())
        obj = body[start + 1 if start >= 0 else 0 : end if end >= 0 else len(body)]
        label = _LABEL_KEY.search(obj)
        found.append(([float(v) for v in match.groups()], label.group(1) if label else None))
    return found


def _tagged_boxes(body: str) -> list[RawBox]:
    """InternVL / Qwen-VL ``<ref>label</ref><box>...</box>`` and ``<|box_start|>...<|box_end|>`` tags."""
    found = []
    for match in _TAGGED.finditer(body):
        coords = [float(v) for v in match.groups()[1:] if v is not None]
        found.append((coords, (match["ref"] or "").strip() or None))
    return found


def _raw_boxes(body: str) -> list[RawBox]:
    """Every box in the answer as (4 numbers as written, label or None), in reading order; first shape wins."""
    for reader in (_json_boxes, _keyed_boxes, _tagged_boxes):
        if found := reader(body):
            return found
    pairs = [([float(v) for v in m.groups()], None) for m in _BARE_PAIRS.finditer(body)]
    return pairs or [([float(v) for v in m.groups()], None) for m in _BARE_LIST.finditer(body)]


def _label_text(body: str) -> str | None:
    """The label a diagnosis / VQA answer names: first line, prefix and trailing punctuation removed."""
    line = next((ln for ln in body.splitlines() if ln.strip()), "").replace("**", "").replace("__", "")
    label = _LABEL_PREFIX.sub("", line).strip().strip(".;,!\"'`* ")
    return label or None


def _to_pixels(numbers: list[float], codec: SliceCodec, issues: list[str]) -> tuple[float, float, float, float]:
    """One answer box -> pixel edge coordinates (not clipped); 0-1 fractions are recognised whatever the convention.

    A box of four numbers in [0, 1] with a decimal among them is a fraction of the image (LLaVA / Shikra style):
    read in any of our conventions it would be under one answer unit wide, which no backend means.
    """
    if all(0.0 <= v <= 1.0 for v in numbers) and any(not v.is_integer() for v in numbers):
        issues.append(f"box {numbers} read as 0-1 fractions of the image")
        width, height = codec.image_size
        x_a, y_a, x_b, y_b = numbers
        return min(x_a, x_b) * width, min(y_a, y_b) * height, max(x_a, x_b) * width, max(y_a, y_b) * height
    return codec.to_pixels(numbers)


def parse_answer(text: str, codec: SliceCodec) -> ParsedAnswer:
    """Parse one model answer; boxes come back in pixels of, and clipped to, the image ``codec`` is bound to.

    ``codec`` is ``backend.box_codec.for_image((width, height))``. Nothing the model wrote raises.
    """
    parsed = ParsedAnswer(text=text if isinstance(text, str) else "")
    try:
        _parse_into(parsed, codec)
    except Exception as exc:  # never raise on model text; the issue says what went wrong
        parsed.issues.append(f"unparseable answer: {type(exc).__name__}: {exc}")
    return parsed


def _parse_into(parsed: ParsedAnswer, codec: SliceCodec) -> None:
    parsed.reasoning, body, parsed.format_ok = split_answer(parsed.text)
    parsed.answer = _FENCE.sub("", body).strip()
    if not parsed.format_ok:
        parsed.issues.append("not in <think>...</think><answer>...</answer> form")
    width, height = codec.image_size
    raw = _raw_boxes(parsed.answer)
    for numbers, label in raw:
        if not all(math.isfinite(v) for v in numbers):
            parsed.issues.append(f"box {numbers} is not finite; dropped")
            continue
        box = _to_pixels(numbers, codec, parsed.issues)
        x1, y1, x2, y2 = (min(max(v, 0.0), limit) for v, limit in zip(box, (width, height, width, height), strict=True))
        if (x1, y1, x2, y2) != box:
            parsed.issues.append(f"box {numbers} clipped to the image")
        if x2 <= x1 or y2 <= y1:
            parsed.issues.append(f"box {numbers} is empty inside the image; dropped")
            continue
        if numbers[0] > numbers[2] or numbers[1] > numbers[3]:
            parsed.issues.append(f"box {numbers} had swapped corners")
        parsed.boxes.append(Box2D(x1, y1, x2, y2, label=label))
    if raw:  # a grounding answer: the label is what the boxes say, even when a box was dropped
        parsed.label = next((label for _, label in raw if label), None)
    else:
        parsed.label = _label_text(parsed.answer)
