"""Volume inference: a 3D study in, a diagnosis, 3D boxes or a VQA answer out, with the model's reasoning.

The path (docs/conventions.md fixes every coordinate on it): load the volume keeping its orientation -> pick slices
along the display axis -> window and render each slice -> ``backend.generate`` in batches of ``batch_size`` slices
-> parse ``<think>/<answer>`` -> slice boxes (image pixels) -> voxel boxes -> link across slices into 3D boxes ->
LPS world boxes. Batching is where the speed is: one ``generate`` call decodes a whole batch of slices at once.

Nothing here knows about MONAI Label; the app (``monailabel_evlf.app``) wraps this for the server and the bench
command calls it directly.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import torch

from monailabel_evlf.data.vqa import size_answer
from monailabel_evlf.imaging.aggregation import extend_into_weak_detections, link_slice_detections
from monailabel_evlf.imaging.geometry import (
    Box2D,
    VoxelBox,
    WorldBox,
    affine_spacing_and_directions,
    box_iou_2d,
    voxel_box_to_world,
)
from monailabel_evlf.imaging.slicing import (
    RenderedSlice,
    choose_axis,
    render_slices,
    select_slices,
    slice_box_to_voxel_box,
)
from monailabel_evlf.imaging.volume import Volume
from monailabel_evlf.imaging.windowing import MODEL_WINDOW, resolve_window
from monailabel_evlf.model.backend import SamplingConfig, VLMBackend
from monailabel_evlf.tasks.labels import NORMAL_LABEL, LabelMatcher, normalize
from monailabel_evlf.tasks.parsing import ParsedAnswer, parse_answer
from monailabel_evlf.tasks.prompts import diagnosis_prompt, grounding_prompt, vqa_prompt
from monailabel_evlf.tasks.questions import organ_matches, parse_study_question, size_option


@dataclass(frozen=True)
class PipelineConfig:
    """How a volume is cut, shown to the model and put back together (the app fills it from ``--conf``)."""

    modality: str = "CT"
    labels: tuple[str, ...] = ("cyst", "hyperdense lesion", "ring-enhancing lesion", NORMAL_LABEL)
    slice_axis: int | None = None  # None: the axis closest to patient S-I
    slice_stride: int = 1
    max_slices: int = 64
    skip_outside_body: bool = True
    window: str | tuple[float, float] = MODEL_WINDOW  # "model": the backend's own input_window (else abdomen)
    image_size: int = 96
    batch_size: int = 8
    max_new_tokens: int = 96
    min_slices: int = 2
    confidence: bool = True  # score answers by the model's own token probabilities (one extra forward pass)
    # in-plane IoU that links boxes on neighbouring slices: low, because a lesion's first and last slices show
    # a small cap inside the next slice's cross-section (a 1x1 cap in a 6x6 section has IoU 0.03)
    link_iou: float = 0.01
    # hysteresis (aggregation.extend_into_weak_detections): a 3D box grows by up to ``max_extend`` slices per end
    # into detector proposals scored >= ``extend_score`` (models with region proposals; 0 slices turns it off)
    extend_score: float = 0.1
    max_extend: int = 2
    # 3D boxes scored below this are not reported: the operating point between missed lesions and false boxes,
    # chosen on validation phantoms of a seed neither trained on nor held out (docs/training.md)
    min_box_score: float = 0.25

    def __post_init__(self) -> None:
        for name in ("slice_stride", "max_slices", "image_size", "batch_size", "max_new_tokens", "min_slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.slice_axis not in (None, 0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1, 2 or None, got {self.slice_axis!r}")
        for name in ("extend_score", "min_box_score", "link_iou"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_extend < 0:
            raise ValueError(f"max_extend must be >= 0, got {self.max_extend}")


@dataclass
class SliceAnswer:
    """What the model said about one slice."""

    index: int
    text: str
    parsed: ParsedAnswer
    confidence: float | None = None  # the model's mean token probability of ``text``; None if it cannot say
    box_scores: list[float | None] = field(default_factory=list)  # per parsed box (see VolumePipeline.box_scores)


@dataclass
class VolumeResult:
    """One task's answer for a volume; :meth:`to_json` is the result JSON the app returns."""

    task: str
    model_id: str
    axis: int
    slice_indices: list[int]
    answers: list[SliceAnswer]
    labels: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    reasoning: str = ""
    answer: str = ""
    voxel_boxes: list[VoxelBox] = field(default_factory=list)
    world_boxes: list[WorldBox] = field(default_factory=list)
    box_slices: list[list[int]] = field(default_factory=list)  # slice indices that support each 3D box
    timings: dict[str, float] = field(default_factory=dict)

    def box_reasoning(self, number: int) -> str:
        """The model's reasoning on the middle slice that supports 3D box ``number``."""
        support = self.box_slices[number]
        if not support:
            return ""
        middle = support[len(support) // 2]
        return next((a.parsed.reasoning for a in self.answers if a.index == middle), "")

    def to_json(self) -> dict[str, Any]:
        boxes = [
            {
                "label": v.label,
                "score": v.score,
                "reasoning": self.box_reasoning(n),
                "voxel_box": {"lo": v.lo.tolist(), "hi": v.hi.tolist()},
                "world_box": w.to_dict(),
                "slices": k,
            }
            for n, (v, w, k) in enumerate(zip(self.voxel_boxes, self.world_boxes, self.box_slices, strict=True))
        ]
        return {
            "task": self.task,
            "model": {"id": self.model_id},
            "labels": self.labels,
            "scores": self.scores,
            "answer": self.answer,
            "reasoning": self.reasoning,
            "boxes": boxes,
            "slices": {"axis": self.axis, "indices": self.slice_indices},
            "slice_answers": [
                {"index": a.index, "label": a.parsed.label, "format_ok": a.parsed.format_ok, "confidence": a.confidence}
                for a in self.answers
            ],
            "latency_s": {key: round(value, 4) for key, value in self.timings.items()},
        }


def thin(indices: Sequence[int], max_slices: int) -> list[int]:
    """At most ``max_slices`` of ``indices``, evenly spread (so a 600-slice CT stays bounded)."""
    indices = list(indices)
    if len(indices) > max_slices:
        picks = np.linspace(0, len(indices) - 1, max_slices).round().astype(int)
        indices = [indices[i] for i in dict.fromkeys(picks.tolist())]
    return indices


def _batches(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


class VolumePipeline:
    """Runs the three tasks on a :class:`Volume` with one backend; not thread-safe (the app holds a lock)."""

    def __init__(self, backend: VLMBackend, config: PipelineConfig | None = None) -> None:
        self.backend = backend
        self.config = config or PipelineConfig()
        # slices are rendered the way the model saw them in training unless a window is configured
        self.window = resolve_window(self.config.window, getattr(backend, "input_window", None))
        # model text -> the configured vocabulary ("Cyst." / "a simple cyst" -> "cyst"); unknown text stays as is
        self.matcher = LabelMatcher(self.config.labels)

    def canonical(self, text: str | None) -> str | None:
        return self.matcher.match(text) or text

    # --- shared steps -------------------------------------------------------------------------------------
    def select(self, volume: Volume, around: int | None = None, radius: int = 0) -> tuple[int, list[int]]:
        """The display axis and the slices to read: every ``slice_stride``-th inside the body (or ``around ±
        radius``, a reader's hint), thinned to ``max_slices``."""
        cfg = self.config
        axis = choose_axis(volume.affine) if cfg.slice_axis is None else cfg.slice_axis
        indices = select_slices(
            volume,
            axis,
            stride=cfg.slice_stride,
            around=around,
            radius=radius,
            skip_outside_body=cfg.skip_outside_body and around is None,
        )
        return axis, thin(indices, cfg.max_slices)

    def render(self, volume: Volume, indices: Sequence[int] | None = None) -> tuple[int, list[RenderedSlice]]:
        """The display axis and the rendered slices (RGB uint8) the model will see."""
        volume.meta.setdefault("modality", self.config.modality)  # NIfTI carries none; windowing depends on it
        if indices is None:
            axis, indices = self.select(volume)
        else:
            axis = choose_axis(volume.affine) if self.config.slice_axis is None else self.config.slice_axis
            n_slices = volume.shape[axis]
            if bad := [k for k in indices if not 0 <= k < n_slices]:
                raise ValueError(f"slice indices {bad} outside 0..{n_slices - 1} along axis {axis}")
        if not indices:
            return axis, []
        size = (self.config.image_size, self.config.image_size)
        return axis, render_slices(volume, list(indices), axis=axis, size=size, window=self.window)

    def generate(
        self,
        slices: Sequence[RenderedSlice],
        prompts: Sequence[str],
        n: int = 1,
        sampling: SamplingConfig | None = None,
    ) -> list[list[str]]:
        """``n`` answers per slice, ``batch_size`` slices per ``backend.generate`` call."""
        sampling = sampling or SamplingConfig(max_new_tokens=self.config.max_new_tokens)
        answers: list[list[str]] = []
        for batch in _batches(len(slices), self.config.batch_size):
            answers += self.backend.generate(
                [slices[i].image for i in batch], [prompts[i] for i in batch], n=n, sampling=sampling
            )
        return answers

    def confidences(
        self, slices: Sequence[RenderedSlice], prompts: Sequence[str], texts: Sequence[str]
    ) -> list[float | None]:
        """Per answer, the geometric-mean probability the model gives its own tokens: one batched forward pass
        per ``batch_size`` slices (cheap next to decoding). ``None`` for backends that cannot score (e.g. an
        oracle or a remote model); boxes then carry no model confidence."""
        if not self.config.confidence:
            return [None] * len(texts)
        out: list[float | None] = []
        try:
            with torch.no_grad():
                for batch in _batches(len(slices), self.config.batch_size):
                    scored = self.backend.completion_logprobs(
                        [slices[i].image for i in batch], [prompts[i] for i in batch], [texts[i] for i in batch]
                    )
                    mask = scored.mask.to(scored.logprobs.dtype)
                    mean = (scored.logprobs * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
                    out += [round(float(v), 4) for v in torch.exp(mean)]
        except NotImplementedError:
            return [None] * len(texts)
        return out

    def box_scores(self, slices: Sequence[RenderedSlice], answers: Sequence[SliceAnswer]) -> list[list[Box2D]]:
        """Fill each answer's per-box scores: for a backend that proposes regions (the EVLF detection connector),
        a box the model copied from a proposal (IoU >= 0.5) carries that proposal's detector score (predicted IoU x
        centre peak) times the answer's confidence — the detector knows how well it localised, the LLM whether it
        believes the finding; otherwise the answer's confidence alone. Returns each slice's proposals (none for
        other backends)."""
        proposals: list[list[Box2D]] = [[] for _ in slices]
        if getattr(self.backend, "has_proposals", False):
            proposals = []
            for batch in _batches(len(slices), self.config.batch_size):
                proposals += self.backend.propose([slices[i].image for i in batch])
        for answer, candidates in zip(answers, proposals, strict=True):
            answer.box_scores = []
            for box in answer.parsed.boxes:
                ious = [_iou_or_zero(box, c) for c in candidates]
                best = int(np.argmax(ious)) if ious else -1
                if best >= 0 and ious[best] >= 0.5 and candidates[best].score is not None:
                    confidence = 1.0 if answer.confidence is None else answer.confidence
                    answer.box_scores.append(round(candidates[best].score * confidence, 4))
                else:
                    answer.box_scores.append(answer.confidence)
        return proposals

    def _parse(self, text: str, rendered: RenderedSlice) -> ParsedAnswer:
        height, width = rendered.image.shape[:2]
        return parse_answer(text, self.backend.box_codec.for_image((width, height)))

    def _ask(self, volume: Volume, prompt: str, indices: Sequence[int] | None) -> tuple[VolumeResult, list]:
        started = time.perf_counter()
        axis, slices = self.render(volume, indices)
        rendered_at = time.perf_counter()
        texts = [answers[0] for answers in self.generate(slices, [prompt] * len(slices))]
        confidences = self.confidences(slices, [prompt] * len(slices), texts)
        generated_at = time.perf_counter()
        answers = [
            SliceAnswer(s.index, t, self._parse(t, s), c) for s, t, c in zip(slices, texts, confidences, strict=True)
        ]
        result = VolumeResult(
            task="",
            model_id=self.backend.model_id,
            axis=axis,
            slice_indices=[s.index for s in slices],
            answers=answers,
            timings={"render": rendered_at - started, "model": generated_at - rendered_at},
        )
        return result, slices

    # --- tasks --------------------------------------------------------------------------------------------
    def diagnose(self, volume: Volume, indices: Sequence[int] | None = None) -> VolumeResult:
        """Slice votes -> study labels.

        ``scores[label]`` is the fraction of examined slices whose answer was ``label``. A lesion shows on a few
        slices only, so the study is abnormal when a lesion label got at least ``min_slices`` votes; its labels
        are those, strongest first, and the reasoning is that of the first slice that voted for the top label.
        """
        started = time.perf_counter()
        result, _ = self._ask(volume, diagnosis_prompt(self.config.modality, list(self.config.labels)), indices)
        slice_labels = [self.matcher.match(a.parsed.label) for a in result.answers]
        votes = Counter(label for label in slice_labels if label)
        total = max(1, len(result.answers))
        result.task = "diagnosis"
        result.scores = {label: votes.get(label, 0) / total for label in self.config.labels}
        findings = [
            label for label, count in votes.most_common() if label != NORMAL_LABEL and count >= self.config.min_slices
        ]
        result.labels = findings or [NORMAL_LABEL]
        top = result.labels[0]
        voters = [a for a, label in zip(result.answers, slice_labels, strict=True) if label == top]
        result.reasoning = voters[0].parsed.reasoning if voters else ""
        result.answer = ", ".join(result.labels)
        result.timings["total"] = time.perf_counter() - started
        return result

    def ground(self, volume: Volume, target: str | None = None, indices: Sequence[int] | None = None) -> VolumeResult:
        """Boxes on each slice, linked into 3D boxes (``link_slice_detections``), put on whole-voxel edges
        (:meth:`VoxelBox.snapped`) and mapped to LPS mm.

        A 3D box's score is the linked detections' mean confidence (1.0 where the model gives none) times the fraction
        of examined slices in its span where it was seen, so a box with holes ranks below a solid one.
        """
        started = time.perf_counter()
        prompt = grounding_prompt(self.config.modality, target, self.backend.box_codec)
        result, slices = self._ask(volume, prompt, indices)
        proposals = self.box_scores(slices, result.answers)
        detections = [
            slice_box_to_voxel_box(_labelled(box, self.canonical(box.label or target), score), rendered)
            for answer, rendered in zip(result.answers, slices, strict=True)
            for box, score in zip(answer.parsed.boxes, answer.box_scores, strict=True)
            if box.width > 0 and box.height > 0
        ]
        linked = link_slice_detections(
            detections, result.axis, iou_threshold=self.config.link_iou, min_slices=self.config.min_slices
        )
        weak = [
            slice_box_to_voxel_box(box, rendered)
            for candidates, rendered in zip(proposals, slices, strict=True)
            for box in candidates
            if box.width > 0 and box.height > 0
        ]
        examined = set(result.slice_indices)
        scored: list[tuple[VoxelBox, list[int]]] = []
        for box in linked:
            span = [k for k in range(int(box.lo[result.axis]), int(box.hi[result.axis])) if k in examined]
            support = sorted({int(d.lo[result.axis]) for d in detections if _inside(d, box)})
            score = (1.0 if box.score is None else box.score) * len(support) / max(1, len(span))
            # grown after scoring: the caps it takes in are weak evidence of the finding's extent, not its existence
            (grown,) = extend_into_weak_detections(
                [box], weak, result.axis, min_score=self.config.extend_score, max_extend=self.config.max_extend
            )
            scored.append((VoxelBox(grown.lo, grown.hi, label=box.label, score=round(score, 4)), support))
        scored = [item for item in scored if item[0].score >= self.config.min_box_score]
        scored.sort(key=lambda item: -item[0].score)
        result.voxel_boxes = [box.snapped() for box, _ in scored]  # whole voxels, as the finding lies
        result.box_slices = [support for _, support in scored]
        result.task = "grounding"
        result.world_boxes = [voxel_box_to_world(box, volume.affine) for box in result.voxel_boxes]
        result.labels = list(dict.fromkeys(b.label for b in result.voxel_boxes if b.label)) or [NORMAL_LABEL]
        result.reasoning = _reasoning_for(result)
        result.answer = f"{len(result.voxel_boxes)} finding(s)" if result.voxel_boxes else "no finding"
        result.timings["total"] = time.perf_counter() - started
        return result

    def answer(
        self,
        volume: Volume,
        question: str,
        options: Sequence[str] | None = None,
        indices: Sequence[int] | None = None,
    ) -> VolumeResult:
        """The most common answer over the examined slices, with the reasoning of its first slice."""
        if not question or not question.strip():
            raise ValueError("a VQA request needs a non-empty 'question'")
        started = time.perf_counter()
        prompt = vqa_prompt(self.config.modality, question, closed_options=list(options) if options else None)
        result, _ = self._ask(volume, prompt, indices)
        votes = Counter(a.parsed.answer.strip() for a in result.answers if a.parsed.answer.strip())
        result.task = "vqa"
        total = max(1, len(result.answers))
        result.scores = {text: count / total for text, count in votes.most_common()}
        result.answer = votes.most_common(1)[0][0] if votes else ""
        result.reasoning = next(
            (a.parsed.reasoning for a in result.answers if a.parsed.answer.strip() == result.answer), ""
        )
        result.timings["total"] = time.perf_counter() - started
        return result

    def answer_study(
        self,
        volume: Volume,
        question: str,
        options: Sequence[str] | None = None,
        grounded: VolumeResult | None = None,
    ) -> VolumeResult:
        """A question about the whole study (:mod:`~monailabel_evlf.tasks.questions`): presence, counts and sizes from
        the study's 3D findings (:meth:`ground`; a finding's organ is asked on its middle slice when the question names
        one; a size is the longest edge in mm of the largest finding's box), questions about a finding asked on the
        middle slice of the largest one, anything else by slice vote.
        ``scores`` holds the 3D findings the answer rests on (label -> score); ``grounded``: this volume's
        :meth:`ground` result if already at hand (several questions about one study)."""
        if not question or not question.strip():
            raise ValueError("a VQA request needs a non-empty 'question'")
        started = time.perf_counter()
        asked = parse_study_question(question, [label for label in self.config.labels if label != NORMAL_LABEL])
        if asked.kind == "other":
            return self.answer(volume, question, options)
        found = grounded or self.ground(volume)
        boxes = list(zip(found.voxel_boxes, found.box_slices, strict=True))
        if asked.organ is not None and boxes:
            organ_question = "In which organ is the lesion?"
            organs = [self.answer(volume, organ_question, indices=[self._middle(s)]).answer for _, s in boxes]
            boxes = [b for b, organ in zip(boxes, organs, strict=True) if organ_matches(organ, asked.organ)]
        where = f" in the {asked.organ}" if asked.organ else ""
        largest = max(boxes, key=lambda item: float(np.prod(item[0].hi - item[0].lo)), default=None)
        if asked.kind == "finding" and largest is not None:
            result = self.answer(volume, question, options, indices=[self._middle(largest[1])])
        else:
            result = VolumeResult("vqa", self.backend.model_id, found.axis, found.slice_indices, found.answers)
            if asked.kind == "count":
                result.answer = _closest_option(str(len(boxes)), options)
            elif asked.kind == "presence":
                result.answer = _closest_option("yes" if boxes else "no", options)
            elif asked.kind == "size" and largest is not None:
                boxes = [largest]
                mm = _longest_edge_mm(largest[0], volume.affine)
                result.answer = size_option(mm, options) or size_answer(mm)
            else:  # a question about a finding where there is none
                result.answer = "no finding"
            labels = ", ".join(f"{b.label} (slices {s[0]}-{s[-1]}, score {b.score:.2f})" for b, s in boxes if s)
            if asked.kind == "size" and boxes:
                result.reasoning = f"The largest finding{where}, {labels}, measures {mm:.1f} mm along its longest edge."
            elif boxes:
                result.reasoning = f"The study shows {len(boxes)} finding(s){where} as 3D boxes: {labels}."
            else:
                result.reasoning = f"No finding{where} was seen on any examined slice."
        result.task = "vqa"
        result.voxel_boxes = [b for b, _ in boxes]
        result.box_slices = [s for _, s in boxes]
        result.world_boxes = [voxel_box_to_world(b, volume.affine) for b in result.voxel_boxes]
        result.scores = {b.label or "finding": float(b.score or 0.0) for b in result.voxel_boxes}
        result.timings["total"] = time.perf_counter() - started
        return result

    @staticmethod
    def _middle(support: Sequence[int]) -> int:
        return int(support[len(support) // 2])

    def disagreement(self, volume: Volume, n: int, seed: int = 0) -> dict[str, float]:
        """How much ``n`` sampled grounding answers per slice disagree: the active-learning uncertainty.

        ``label_entropy``: mean over slices of the entropy (bits) of the sampled labels; ``box_spread``: mean over
        slices with any box of ``1 - mean pairwise IoU`` of the samples' first boxes (a missing box counts as
        IoU 0 with a present one); ``score`` is their sum. Greedy decoding would hide the uncertainty, hence sampling.
        """
        if n < 2:
            raise ValueError(f"disagreement needs at least 2 samples per slice, got {n}")
        _, slices = self.render(volume)
        sampling = SamplingConfig(max_new_tokens=self.config.max_new_tokens, do_sample=True, seed=seed)
        prompt = grounding_prompt(self.config.modality, None, self.backend.box_codec)
        groups = self.generate(slices, [prompt] * len(slices), n, sampling)
        entropies, spreads = [], []
        for rendered, texts in zip(slices, groups, strict=True):
            parsed = [self._parse(text, rendered) for text in texts]
            labels = [",".join(sorted({self.canonical(b.label) or "" for b in p.boxes})) for p in parsed]
            counts = np.array(list(Counter(labels).values()), dtype=float)
            probs = counts / counts.sum()
            entropies.append(float(-(probs * np.log2(probs)).sum()))
            firsts = [p.boxes[0] if p.boxes else None for p in parsed]
            if any(firsts):
                ious = [_iou_or_zero(a, b) for a, b in combinations(firsts, 2)]
                spreads.append(1.0 - float(np.mean(ious)))
        label_entropy = float(np.mean(entropies)) if entropies else 0.0
        box_spread = float(np.mean(spreads)) if spreads else 0.0
        return {"score": label_entropy + box_spread, "label_entropy": label_entropy, "box_spread": box_spread}


def _labelled(box: Box2D, label: str | None, score: float | None) -> Box2D:
    return Box2D(box.x1, box.y1, box.x2, box.y2, label=label, score=score)


def _longest_edge_mm(box: VoxelBox, affine: np.ndarray) -> float:
    """The longest edge of a voxel box in mm (voxel axes scaled by their spacing; oblique grids included)."""
    spacing = affine_spacing_and_directions(affine)[0]
    return float(np.max((box.hi - box.lo) * spacing))


def _closest_option(answer: str, options: Sequence[str] | None) -> str:
    """``answer`` as the caller's option that says it ("Yes." for "yes"), or as is."""
    return next((o for o in options or () if normalize(o) == normalize(answer)), answer)


def _inside(detection: VoxelBox, box: VoxelBox) -> bool:
    """Whether a one-slice detection's centre lies inside a 3D box (it supports that box)."""
    centre = (detection.lo + detection.hi) / 2
    return bool(np.all(box.lo <= centre) and np.all(centre <= box.hi))


def _iou_or_zero(a: Box2D | None, b: Box2D | None) -> float:
    if a is None and b is None:
        return 1.0
    if a is None or b is None:
        return 0.0
    value = float(box_iou_2d(a, b))
    return 0.0 if math.isnan(value) else value


def _reasoning_for(result: VolumeResult) -> str:
    """The reasoning behind the strongest 3D box (or of the first slice when there is none)."""
    if not result.answers:
        return ""
    return result.box_reasoning(0) if result.voxel_boxes else result.answers[0].parsed.reasoning
