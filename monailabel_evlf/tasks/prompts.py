"""User prompts for the three EVLF tasks and the target completions SFT trains on.

The diagnosis wording is the paper's: the base prompt and its ten variants (Supplementary Table 4), used both for
training (a random variant per sample) and for the prompt-consistency metric. Every answer is asked for as
``<think>reasoning</think><answer>answer</answer>``; grounding answers hold ``{"label", "bbox_2d"}`` JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.tasks.box_codec import BoxCodec, SliceCodec

SYSTEM_PROMPT = (
    "You are a careful radiology assistant. Think step by step about the image, then answer. "
    "Write your reasoning inside <think></think> and only the final answer inside <answer></answer>."
)

#: Supplementary Table 4: the base prompt (index 0) and its ten variants (1..10), verbatim.
DIAGNOSIS_PROMPTS: tuple[str, ...] = (
    "Analyze the given {modality} image for diagnosis.",
    "Please perform diagnostic analysis on the provided {modality} image for diagnosis.",
    "Given a {modality} scan, determine the correct diagnosis",
    "Evaluate the following {modality} image for diagnosis",
    "Assess the {modality} image and provide a diagnosis",
    "Based on the {modality} image, identify the diagnosis",
    "For this {modality} image, specify its diagnosis",
    "Analyze the provided {modality} scan for diagnosis",
    "Interpret the {modality} image to determine its diagnosis",
    "Diagnose the given {modality} image",
    "Use the {modality} image to establish its diagnosis",
)
NUM_PROMPT_VARIANTS = len(DIAGNOSIS_PROMPTS) - 1

NO_FINDING = "no finding"  # the grounding answer for a slice without the asked-for finding

_MODALITY_NAMES = {
    "CT": "CT",
    "MR": "MRI",
    "MRI": "MRI",
    "CR": "X-ray",
    "DX": "X-ray",
    "XR": "X-ray",
    "US": "ultrasound",
    "PT": "PET",
    "OCT": "OCT",
}


def modality_name(modality: str) -> str:
    """DICOM modality code or common name -> the word used in prompts ("MR" -> "MRI")."""
    return _MODALITY_NAMES.get(modality.strip().upper(), modality.strip() or "medical")


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else f"{text}."


def diagnosis_prompt(modality: str, labels: Sequence[str], variant: int = 0) -> str:
    """The paper's diagnosis prompt (``variant`` 0 = base, 1..10 = Supplementary Table 4) with the choices."""
    if not 0 <= variant <= NUM_PROMPT_VARIANTS:
        raise ValueError(f"variant must be 0..{NUM_PROMPT_VARIANTS}, got {variant}")
    prompt = _sentence(DIAGNOSIS_PROMPTS[variant].format(modality=modality_name(modality)))
    if labels:
        prompt += f" Choose one of: {', '.join(labels)}."
    return prompt


def grounding_prompt(modality: str, target: str | None, codec: BoxCodec) -> str:
    """Ask for boxes around ``target`` (or around every abnormality when ``None``) in the backend's coordinates."""
    what = f"the {target}" if target else "every abnormality"
    return (
        f"Locate {what} in this {modality_name(modality)} image. Answer with JSON "
        f'{{"label": ..., "bbox_2d": [x1, y1, x2, y2]}} for each finding, {codec.prompt_words}.'
    )


def vqa_prompt(modality: str, question: str, closed_options: Sequence[str] | None = None) -> str:
    """A question about the image; closed questions list their options."""
    if not question.strip():
        raise ValueError("a VQA prompt needs a question")
    prompt = f"Look at this {modality_name(modality)} image. {_sentence(question)}"
    if closed_options:
        prompt += f" Options: {', '.join(closed_options)}."
    return prompt


def format_answer(reasoning: str, answer: str) -> str:
    """The one answer layout every task uses."""
    return f"<think>{reasoning.strip()}</think><answer>{answer.strip()}</answer>"


def diagnosis_target(reasoning: str, label: str) -> str:
    """SFT target for a diagnosis prompt: the answer block holds the label and nothing else (the reward's rule)."""
    return format_answer(reasoning, label)


def vqa_target(reasoning: str, answer: str) -> str:
    """SFT target for a VQA prompt."""
    return format_answer(reasoning, answer)


def grounding_target(reasoning: str, boxes: Sequence[Box2D], codec: SliceCodec) -> str:
    """A correct grounding completion: one ``{"label", "bbox_2d"}`` object, or a JSON list when several; ``boxes``
    are in pixels of the image ``codec`` is bound to, written as :meth:`~.box_codec.SliceCodec.answer_numbers`."""
    if not boxes:
        raise ValueError("a grounding target needs at least one box")
    items = [{"label": box.label or "", "bbox_2d": codec.answer_numbers(box.as_array())} for box in boxes]
    body = json.dumps(items[0] if len(items) == 1 else items, separators=(", ", ": "))
    return format_answer(reasoning, body)
