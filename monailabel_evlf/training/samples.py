"""Training samples: rendered slice + prompt + target answer + ground truth, from phantoms or corrections.

Two sources feed the same :class:`TrainingSample`: the phantom sidecar JSON (docs/sample-data.md) and boxes a
radiologist corrected in 3D Slicer / OHIF (``VoxelBox`` list for a volume). Both become "boxes on one slice":
a lesion's per-slice extent (phantoms) or the corrected box cut at a slice (corrections), mapped to rendered
pixels with :func:`~monailabel_evlf.imaging.slicing.voxel_box_to_slice_box`. Boxes are carried in image pixels
(edge coordinates, docs/conventions.md); the target answer writes them in the backend's box convention.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from monailabel_evlf.data.phantoms import GROUND_TRUTH_DIR, LESION_KINDS, ORGANS, read_ground_truth
from monailabel_evlf.data.vqa import item_truth, read_vqa, slice_questions, vqa_path
from monailabel_evlf.imaging.geometry import Box2D, VoxelBox
from monailabel_evlf.imaging.slicing import (
    RenderedSlice,
    body_slices,
    choose_axis,
    render_slices,
    voxel_box_to_slice_box,
)
from monailabel_evlf.imaging.volume import Volume, load_volume
from monailabel_evlf.tasks import prompts
from monailabel_evlf.tasks.box_codec import BoxCodec
from monailabel_evlf.tasks.labels import NORMAL_LABEL

TASKS = ("grounding", "diagnosis", "vqa")
NO_FINDING_REASONING = "No focal lesion is seen in this slice."


@dataclass
class TrainingSample:
    """One (image, prompt) pair with what a correct answer must contain."""

    image: np.ndarray  # (H, W, 3) uint8, as the backend receives it
    prompt: str
    target: str  # a correct completion: <think>...</think><answer>...</answer>
    task: str
    label: str | None = None  # diagnosis label / grounding target
    boxes: list[Box2D] = field(default_factory=list)  # ground truth in image pixels
    answer: str | None = None  # VQA reference answer
    options: list[str] | None = None  # closed VQA / diagnosis choices
    source: dict[str, Any] = field(default_factory=dict)  # study id, axis, slice index, prompt variant

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}")

    @property
    def image_size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])

    @staticmethod
    def columns(samples: Sequence[TrainingSample]) -> dict[str, list[Any]]:
        """The extra columns TRL-shaped reward functions receive, one entry per sample."""
        return {
            "task": [s.task for s in samples],
            "label": [s.label for s in samples],
            "gt_boxes": [list(s.boxes) for s in samples],
            "answer": [s.answer for s in samples],
            "image_size": [s.image_size for s in samples],
        }


@dataclass(frozen=True)
class SampleOptions:
    """How slices become samples: picture size and window, which tasks, the label set for diagnosis prompts."""

    box_codec: BoxCodec  # the backend's: how prompts name and targets write boxes
    size: tuple[int, int] = (96, 96)
    window: str = "abdomen"
    tasks: tuple[str, ...] = ("grounding", "diagnosis")
    labels: tuple[str, ...] = ()  # diagnosis choices besides "normal"; empty: the labels seen in the data
    modality: str = "CT"
    prompt_variants: int = 0  # diagnosis prompts: the base one (0) or a random one of 0..N (paper: N = 10)
    detailed_reasoning: bool = False  # phantoms: the sidecar's full finding sentence as <think> text
    vqa_per_slice: int = 3  # phantoms: questions drawn per slice from its ground-truth VQA set (data/vqa.py)


@dataclass(frozen=True)
class _SliceFinding:
    box: VoxelBox  # one slice thick along ``axis``
    finding: str
    lesion: int  # which lesion / corrected box it is a cut of
    axis: int
    site: str | None = None  # the host organ, where known (phantoms)


def lesion_findings(ground_truth: dict[str, Any], detailed: bool = False) -> list[_SliceFinding]:
    """Every lesion's extent on every slice it crosses, from a phantom sidecar (``slice_boxes``).

    The reasoning is the sidecar's full ``finding`` sentence when ``detailed``, else a short "<kind> in the
    <organ>." (what a small model can learn in minutes; the numbers in the long one are not visible to it).
    """
    findings = []
    for lesion in ground_truth.get("lesions", []):
        reasoning = lesion["finding"] if detailed else f"{lesion['label'].capitalize()} in the {lesion['organ']}."
        for entry in lesion["slice_boxes"]:
            axis, k = int(entry["axis"]), int(entry["index"])
            a, b = (n for n in range(3) if n != axis)
            lo, hi = np.zeros(3), np.zeros(3)
            lo[[a, b, axis]] = entry["box"][0], entry["box"][1], k
            hi[[a, b, axis]] = entry["box"][2], entry["box"][3], k + 1
            box = VoxelBox(lo=lo, hi=hi, label=lesion["label"])
            findings.append(_SliceFinding(box, reasoning, int(lesion["id"]), axis, lesion.get("organ")))
    return findings


def correction_findings(volume: Volume, boxes: Iterable[VoxelBox], slices_per_box: int = 1) -> list[_SliceFinding]:
    """Corrected 3D boxes cut at their ``slices_per_box`` central slices along the display axis."""
    if slices_per_box < 1:
        raise ValueError(f"slices_per_box must be >= 1, got {slices_per_box}")
    axis = choose_axis(volume.affine)
    findings = []
    for number, box in enumerate(boxes):
        if not box.label:
            raise ValueError(f"corrected box {box.lo.tolist()}..{box.hi.tolist()} has no label")
        first, last = int(np.floor(box.lo[axis])), int(np.ceil(box.hi[axis])) - 1
        if first < 0 or last >= volume.shape[axis] or last < first:
            raise ValueError(f"corrected box {box.lo.tolist()}..{box.hi.tolist()} lies outside the volume")
        start = max(first, (first + last + 1 - slices_per_box) // 2)
        for k in range(start, min(last, start + slices_per_box - 1) + 1):
            lo, hi = box.lo.copy(), box.hi.copy()
            lo[axis], hi[axis] = k, k + 1
            findings.append(
                _SliceFinding(VoxelBox(lo=lo, hi=hi, label=box.label), f"{box.label.capitalize()}.", number, axis)
            )
    return findings


# a lesion's central slices: those whose cut is at least this fraction of its largest (thin end caps fall below)
CENTRAL_AREA_FRACTION = 0.5


def _central_slices(findings: Sequence[_SliceFinding], min_area_fraction: float) -> list[_SliceFinding]:
    """Per lesion, keep the slices whose cut is at least ``min_area_fraction`` of its largest (central slices)."""
    if min_area_fraction <= 0:
        return list(findings)
    by_lesion: dict[int, list[_SliceFinding]] = defaultdict(list)
    for finding in findings:
        by_lesion[finding.lesion].append(finding)
    kept = []
    for group in by_lesion.values():
        areas = [float(np.prod(f.box.size)) for f in group]
        kept += [f for f, area in zip(group, areas, strict=True) if area >= min_area_fraction * max(areas)]
    return kept


def samples_for_volume(
    volume: Volume,
    findings: Sequence[_SliceFinding],
    options: SampleOptions,
    *,
    normal_slices: int = 0,
    min_area_fraction: float = CENTRAL_AREA_FRACTION,
    seed: int = 0,
    source: dict[str, Any] | None = None,
    ground_truth: dict[str, Any] | None = None,
) -> list[TrainingSample]:
    """Samples from the slices the findings lie on, plus ``normal_slices`` lesion-free slices inside the body.

    Grounding: one sample per (slice, label), answer listing every box of that label on the slice, and the open
    question ("every abnormality"; "no finding" on lesion-free slices). Diagnosis: one per slice, label of the
    largest finding there (``"normal"`` on lesion-free slices). VQA: with a phantom's ``ground_truth``,
    ``vqa_per_slice`` questions drawn from the slice's ground-truth set (:func:`monailabel_evlf.data.vqa.
    slice_questions`, every VQA-RAD / SLAKE type); otherwise which label is on the slice (closed).
    """
    # lesion-free slices are drawn away from every slice a lesion crosses, its thin caps included: a cap left out of
    # the samples below is still a lesion, never a negative
    display_axis = choose_axis(volume.affine)
    lesion_slices = {k for f in findings for k in range(int(f.box.lo[display_axis]), int(f.box.hi[display_axis]))}
    findings = _central_slices(findings, min_area_fraction)
    by_slice: dict[tuple[int, int], list[_SliceFinding]] = defaultdict(list)
    for finding in findings:
        by_slice[(finding.axis, int(finding.box.lo[finding.axis]))].append(finding)
    labels = [NORMAL_LABEL, *(options.labels or sorted({f.box.label for f in findings}))]
    rng = np.random.default_rng(seed)
    if normal_slices:
        taken = {k for (axis, k) in by_slice if axis == display_axis}
        free = [int(k) for k in body_slices(volume, display_axis) if k not in lesion_slices and k not in taken]
        for k in rng.permutation(free)[:normal_slices]:
            by_slice[(display_axis, int(k))] = []
    samples: list[TrainingSample] = []
    # phantoms ask their ground-truth VQA set instead of the one generic question
    slice_options = (
        options if ground_truth is None else replace(options, tasks=tuple(t for t in options.tasks if t != "vqa"))
    )
    for axis in sorted({axis for axis, _ in by_slice}):
        keys = sorted(k for a, k in by_slice if a == axis)
        for rendered in render_slices(volume, keys, axis=axis, size=options.size, window=options.window):
            on_slice = by_slice[(axis, rendered.index)]
            meta = {**(source or {}), "axis": axis, "index": rendered.index}
            samples += _slice_samples(rendered, on_slice, labels, slice_options, prompts, rng, meta)
            if "vqa" in options.tasks and ground_truth is not None:
                samples += _vqa_samples(rendered, ground_truth, options, prompts, rng, meta)
    return samples


def _slice_samples(
    rendered: RenderedSlice,
    on_slice: Sequence[_SliceFinding],
    labels: Sequence[str],
    options: SampleOptions,
    prompts: Any,
    rng: np.random.Generator,
    meta: dict[str, Any],
) -> list[TrainingSample]:
    boxes = [voxel_box_to_slice_box(f.box, rendered) for f in on_slice]
    reasons = {f.box.label: f.finding for f in on_slice}
    largest = max(zip(boxes, on_slice, strict=True), key=lambda pair: pair[0].area)[1] if on_slice else None
    diagnosis = largest.box.label if largest else NORMAL_LABEL
    reasoning = largest.finding if largest else NO_FINDING_REASONING
    meta = {
        **meta,
        "box_sites": [f.site for f in on_slice],
        "organ": largest.site if largest else None,
        "lesion_kind": diagnosis,
    }
    out = []
    if "grounding" in options.tasks:
        # one question per label ("Locate the cyst") plus the open question the app asks by default ("Locate every
        # abnormality"), answered with every box on the slice, so training and inference prompts agree; a lesion-free
        # slice answers the open question with "no finding" (negatives teach the model when to say nothing)
        targets = [(label, [b for b in boxes if b.label == label]) for label in sorted({b.label for b in boxes})]
        targets.append((None, boxes))
        for label, mine in targets:
            reason = reasons[label] if label else " ".join(dict.fromkeys(reasons.values()))
            if mine:
                target = prompts.grounding_target(reason, mine, options.box_codec.for_image(rendered.size))
            else:
                target = prompts.format_answer(NO_FINDING_REASONING, prompts.NO_FINDING)
            out.append(
                TrainingSample(
                    image=rendered.image,
                    prompt=prompts.grounding_prompt(options.modality, label, options.box_codec),
                    target=target,
                    task="grounding",
                    label=label,
                    boxes=mine,
                    source=meta,
                )
            )
    if "diagnosis" in options.tasks:
        variant = int(rng.integers(options.prompt_variants + 1))
        out.append(
            TrainingSample(
                image=rendered.image,
                prompt=prompts.diagnosis_prompt(options.modality, labels, variant=variant),
                target=prompts.diagnosis_target(reasoning, diagnosis),
                task="diagnosis",
                label=diagnosis,
                boxes=boxes,
                options=list(labels),
                source={**meta, "variant": variant},
            )
        )
    if "vqa" in options.tasks:
        question = "Which abnormality does this slice show?"
        out.append(
            TrainingSample(
                image=rendered.image,
                prompt=prompts.vqa_prompt(options.modality, question, closed_options=list(labels)),
                target=prompts.vqa_target(reasoning, diagnosis),
                task="vqa",
                label=diagnosis,
                answer=diagnosis,
                options=list(labels),
                source=meta,
            )
        )
    return out


def vqa_reasoning(ground_truth: dict[str, Any], item: Any) -> str:
    """The ``<think>`` text a VQA answer rests on: the lesions it is about (kind, organ, side), or what the slice
    shows when it is about none of them — never a finding the answer does not name."""
    by_id = {lesion["id"]: lesion for lesion in ground_truth.get("lesions", [])}
    about = [by_id[i] for i in item.lesion_ids if i in by_id]
    if about:
        return " ".join(
            f"{lesion['label'].capitalize()} in the {lesion['organ']}, on the patient's {lesion['side']}."
            for lesion in about
        )
    if item.question_type in ("modality", "plane"):
        return f"An {'axial' if item.axis in (None, 2) else 'oblique'} {ground_truth.get('modality', 'CT')} slice."
    organ = next((name for name in sorted(ORGANS, key=len, reverse=True) if name in item.question.lower()), None)
    return f"No focal lesion in the {organ}." if organ else NO_FINDING_REASONING


def _vqa_samples(
    rendered: RenderedSlice,
    ground_truth: dict[str, Any],
    options: SampleOptions,
    prompts: Any,
    rng: np.random.Generator,
    meta: dict[str, Any],
) -> list[TrainingSample]:
    """``options.vqa_per_slice`` questions drawn from the slice's ground-truth VQA set."""
    items = slice_questions(ground_truth, rendered.axis, rendered.index, rng)
    picked = [items[int(n)] for n in rng.permutation(len(items))[: options.vqa_per_slice]]
    return [_vqa_sample(rendered, ground_truth, item, options, meta) for item in picked]


def _vqa_sample(
    rendered: RenderedSlice, ground_truth: dict[str, Any], item: Any, options: SampleOptions, meta: dict[str, Any]
) -> TrainingSample:
    return TrainingSample(
        image=rendered.image,
        prompt=prompts.vqa_prompt(options.modality, item.question, closed_options=item.options),
        target=prompts.vqa_target(vqa_reasoning(ground_truth, item), item.answer),
        task="vqa",
        answer=item.answer,
        options=list(item.options) if item.options else None,
        source={**meta, **item_truth(ground_truth, item), "question": item.question},
    )


def vqa_file_samples(
    volume: Volume, ground_truth: dict[str, Any], items: Sequence[Any], options: SampleOptions, study_id: str
) -> list[TrainingSample]:
    """Every slice question of a study's written VQA set (``ground_truth/<study>_vqa.jsonl``) as a sample, on the
    slice it asks about: what ``evlf eval --tasks vqa`` scores, so the numbers are those of the published set."""
    by_slice: dict[tuple[int, int], list[Any]] = defaultdict(list)
    for item in items:
        if item.scope == "slice":
            by_slice[(item.axis, item.index)].append(item)
    samples = []
    for axis in sorted({a for a, _ in by_slice}):
        keys = sorted(k for a, k in by_slice if a == axis)
        for rendered in render_slices(volume, keys, axis=axis, size=options.size, window=options.window):
            meta = {"study_id": study_id, "axis": axis, "index": rendered.index}
            samples += [_vqa_sample(rendered, ground_truth, i, options, meta) for i in by_slice[(axis, rendered.index)]]
    return samples


def phantom_samples(
    image: np.ndarray, affine: np.ndarray, ground_truth: dict[str, Any], options: SampleOptions, **kwargs: Any
) -> list[TrainingSample]:
    """Samples from one phantom (arrays + sidecar dict), e.g. ``make_phantom(seed)`` in memory."""
    volume = Volume(image, affine, {"modality": ground_truth.get("modality", "CT")})
    source = {"study_id": ground_truth.get("study_id")}
    findings = lesion_findings(ground_truth, options.detailed_reasoning)
    return samples_for_volume(
        volume, findings, _phantom_labels(options), source=source, ground_truth=ground_truth, **kwargs
    )


def _phantom_labels(options: SampleOptions) -> SampleOptions:
    """Phantom diagnosis prompts offer every lesion kind, not only those one study happens to contain."""
    return options if options.labels else replace(options, labels=tuple(LESION_KINDS))


def datastore_samples(
    datastore_dir: str | Path, options: SampleOptions, study_ids: Sequence[str] | None = None, **kwargs: Any
) -> list[TrainingSample]:
    """Samples from a phantom folder written by ``evlf make-sample-data`` (images + ``ground_truth/*.json``)."""
    root = Path(datastore_dir)
    if study_ids is None:
        study_ids = sorted(p.stem for p in (root / GROUND_TRUTH_DIR).glob("*.json"))
    if not study_ids:
        raise FileNotFoundError(f"no phantom ground truth under {root / GROUND_TRUTH_DIR}")

    samples = []
    for index, study_id in enumerate(study_ids):
        truth = read_ground_truth(root, study_id)
        volume = load_volume(root / truth["files"]["image"])
        volume.meta.setdefault("modality", truth.get("modality", "CT"))
        study_options = options
        if "vqa" in options.tasks and vqa_path(root, study_id).is_file():  # the written set, not a new draw
            samples += vqa_file_samples(volume, truth, read_vqa(root, study_id), options, study_id)
            study_options = replace(options, tasks=tuple(t for t in options.tasks if t != "vqa"))
        if study_options.tasks:
            samples += samples_for_volume(
                volume,
                lesion_findings(truth, options.detailed_reasoning),
                _phantom_labels(study_options),
                source={"study_id": study_id},
                seed=index,
                ground_truth=truth,
                **kwargs,
            )
    return samples


def correction_samples(
    volume: Volume, boxes: Sequence[VoxelBox], options: SampleOptions, *, slices_per_box: int = 1, **kwargs: Any
) -> list[TrainingSample]:
    """Samples from a reader's corrected boxes on one volume (the app's train task calls this)."""
    findings = correction_findings(volume, boxes, slices_per_box)
    return samples_for_volume(volume, findings, options, min_area_fraction=0.0, **kwargs)


MANIFEST = "manifest.jsonl"


def manifest_samples(folder: str | Path, options: SampleOptions) -> list[TrainingSample]:
    """Samples from 2D pictures listed in ``folder/manifest.jsonl`` (any modality; format in docs/training.md).

    One JSON object per line: ``image`` (path relative to ``folder``; PNG/JPEG, grey or RGB), ``task``,
    ``label``, ``boxes`` (``[[x1, y1, x2, y2], ...]`` in that picture's pixels, edge coordinates), ``question`` /
    ``answer`` / ``options`` for VQA and diagnosis, optional ``reasoning`` and ``modality``.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}")
    samples = []
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            image = np.asarray(Image.open(folder / entry["image"]).convert("RGB"))
            task, label = entry["task"], entry.get("label")
            modality = entry.get("modality", options.modality)
            reasoning = entry.get("reasoning", "")
            size = (image.shape[1], image.shape[0])
            boxes = [Box2D(*coords, label=label) for coords in entry.get("boxes", [])]
            choices = entry.get("options")
            if task == "grounding":
                prompt = prompts.grounding_prompt(modality, label, options.box_codec)
                target = prompts.grounding_target(reasoning, boxes, options.box_codec.for_image(size))
            elif task == "diagnosis":
                prompt = prompts.diagnosis_prompt(modality, choices or list(options.labels), variant=0)
                target = prompts.diagnosis_target(reasoning, label)
            else:
                prompt = prompts.vqa_prompt(modality, entry["question"], closed_options=choices)
                target = prompts.vqa_target(reasoning, entry["answer"])
            source = {"manifest_line": number, "image": entry["image"]}
            samples.append(
                TrainingSample(
                    image=image,
                    prompt=prompt,
                    target=target,
                    task=task,
                    label=label,
                    boxes=boxes,
                    answer=entry.get("answer"),
                    options=choices,
                    source=source,
                )
            )
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise ValueError(f"{manifest}:{number}: {exc}") from exc
    if not samples:
        raise ValueError(f"{manifest} lists no samples")
    return samples


def load_samples(path: str | Path, options: SampleOptions, **kwargs: Any) -> list[TrainingSample]:
    """A phantom folder (``ground_truth/*.json``) or a folder with ``manifest.jsonl`` -> samples."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return manifest_samples(path, options)
    if (path / "ground_truth").is_dir():
        return datastore_samples(path, options, **kwargs)
    raise FileNotFoundError(f"{path} is neither a phantom folder (ground_truth/) nor holds a {MANIFEST}")
