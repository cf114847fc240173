"""``evlf eval``: a backend (+ adapter) on labelled samples -> the paper's metrics table, JSON and a plot.

Diagnosis: accuracy and macro F1; grounding: Acc@0.1/0.3/0.5 and mIoU (best predicted box per ground-truth box);
VQA: closed accuracy and open recall; consistency: the same diagnosis question in the paper's prompt variants
(fraction of cases where every variant gives the same label, and the per-variant accuracy spread); reasoning:
whether the ``<think>`` text names the true organ, contradicts its own answer, or invents a finding
(:func:`reasoning_rates`). Every number comes with its n and 95% interval, overall and per group (question type,
lesion kind, size bucket, prompt variant; :data:`GROUPS`), read from ``TrainingSample.source`` where the samples
carry it. Generation is greedy, so the numbers are reproducible.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monailabel_evlf.model.backend import SamplingConfig, VLMBackend
from monailabel_evlf.tasks import metrics, prompts
from monailabel_evlf.tasks.metrics import ALL, Estimate, MetricsTable
from monailabel_evlf.tasks.parsing import parse_answer
from monailabel_evlf.training.samples import NORMAL_LABEL, TrainingSample

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    sample: TrainingSample
    text: str
    parsed: Any  # monailabel_evlf.tasks.parsing.ParsedAnswer


@dataclass
class EvaluationReport:
    """Metrics per task plus the predictions they came from."""

    table: MetricsTable  # plain numbers in ``sections``, n and intervals per group in ``details``
    predictions: list[Prediction] = field(default_factory=list)

    def flat(self) -> dict[str, float]:
        """``{"acc@0.5": ..., "miou": ..., "accuracy": ...}``: the keys the validation gate reads."""
        return dict(self.table.flat())

    def to_text(self) -> str:
        return self.table.to_text()

    def to_json(self) -> str:
        return self.table.to_json()

    def save(self, out_dir: str | Path, title: str = "EVLF evaluation") -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"text": out / "metrics.txt", "json": out / "metrics.json", "png": out / "metrics.png"}
        paths["text"].write_text(self.to_text() + "\n")
        paths["json"].write_text(self.to_json() + "\n")
        plot_metrics(self.table, paths["png"], title)
        return paths


def predict(
    backend: VLMBackend,
    samples: Sequence[TrainingSample],
    *,
    batch_size: int = 16,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 96,
) -> list[Prediction]:
    """Greedy answers for ``samples`` (optionally with other prompts, e.g. prompt variants), parsed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [s.prompt for s in samples] if prompts is None else list(prompts)
    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompts for {len(samples)} samples")
    backend.eval()
    greedy = SamplingConfig(max_new_tokens=max_new_tokens)
    out = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        texts = backend.generate([s.image for s in batch], prompts[start : start + batch_size], n=1, sampling=greedy)
        for sample, answers in zip(batch, texts, strict=True):
            parsed = parse_answer(answers[0], backend.box_codec.for_image(sample.image_size))
            out.append(Prediction(sample, answers[0], parsed))
    return out


# pixel sizes of a true box (its longer side, in rendered pixels) for samples without ``source["size_bucket"]``
PIXEL_SIZE_BUCKETS = ((4.0, "under 4 px"), (8.0, "4 to 8 px"), (16.0, "8 to 16 px"), (np.inf, "16 px or more"))
NO_LESION = "no lesion"
GROUPS = {  # task -> the groups its metrics are broken down by
    "diagnosis": ("lesion_kind", "size_bucket"),
    "grounding": ("lesion_kind", "size_bucket"),
    "vqa": ("question_type", "lesion_kind", "size_bucket"),
}


def group_key(sample: TrainingSample, group: str) -> str | None:
    """The sample's key in ``group`` (``None``: not known, left out of that breakdown).

    ``question_type``: ``source["question_type"]``. ``lesion_kind``: ``source["lesion_kind"]``, else the label,
    else the label of the largest true box. ``size_bucket``: ``source["size_bucket"]``, else the longer side of
    the largest true box in rendered pixels (:data:`PIXEL_SIZE_BUCKETS`), :data:`NO_LESION` for a normal sample.
    """
    source = sample.source
    largest = max(sample.boxes, key=lambda box: box.area) if sample.boxes else None
    if group == "question_type":
        return source.get("question_type")
    if group == "lesion_kind":
        return source.get("lesion_kind") or sample.label or (largest.label if largest else None)
    if group == "size_bucket":
        if source.get("size_bucket"):
            return source["size_bucket"]
        if largest is not None:
            side = max(largest.width, largest.height)
            return next(name for limit, name in PIXEL_SIZE_BUCKETS if side < limit)
        return NO_LESION if sample.label == NORMAL_LABEL else None
    raise ValueError(f"unknown group {group!r}")


def _add_groups(
    table: MetricsTable,
    section: str,
    predictions: Sequence[Prediction],
    score: Callable[[Sequence[Prediction]], dict[str, Estimate]],
    group_score: Callable[[Sequence[Prediction]], dict[str, Estimate]] | None = None,
) -> None:
    """The section's headline estimates, then ``group_score`` (default: the same) per key of each of its
    :data:`GROUPS`."""
    table.add(section, score(predictions))
    group_score = group_score or score
    for group in GROUPS.get(section, ()):
        keyed: dict[str, list[Prediction]] = defaultdict(list)
        for prediction in predictions:
            key = group_key(prediction.sample, group)
            if key is not None:
                keyed[str(key)].append(prediction)
        for key in sorted(keyed):
            table.add(section, group_score(keyed[key]), group, key)


def _is_lesion_free(sample: TrainingSample) -> bool:
    """What the slice shows (``source["lesion_kind"]``, else the label), not what the question is about."""
    return (sample.source.get("lesion_kind") or sample.label) == NORMAL_LABEL


def _contradicts(prediction: Prediction) -> bool:
    """The reasoning names a lesion kind or organ the answer (its text and box labels) does not, or (grounding,
    diagnosis) claims a finding where the answer has none or the reverse."""
    parsed = prediction.parsed
    answer = " ".join([parsed.answer, *(box.label or "" for box in parsed.boxes)])
    claimed_kinds, claimed_organs = metrics.named_kinds(answer), metrics.named_organs(answer)
    kinds, organs = metrics.named_kinds(parsed.reasoning), metrics.named_organs(parsed.reasoning)
    if claimed_kinds and not kinds <= claimed_kinds:
        return True
    if claimed_organs and any(not any(metrics.organs_agree(o, c) for c in claimed_organs) for o in organs):
        return True
    if prediction.sample.task in ("grounding", "diagnosis"):
        answer_finding = bool(parsed.boxes) or bool(claimed_kinds)
        return answer_finding != metrics.names_finding(parsed.reasoning)
    return False


def reasoning_rates(predictions: Sequence[Prediction]) -> dict[str, Estimate]:
    """Whether the ``<think>`` text is true, over the predictions whose sample says what it rests on: those with
    ``source["organ"]`` (the host organ of the lesion the answer is about, ``None`` when about none) and the
    lesion-free ones (``source["lesion_kind"]``, else ``label``, is ``"normal"``).

    - ``organ_named_rate``: where ``source["organ"]`` names one, the reasoning names that organ (a kidney without
      its side does not count: "kidney" is not "left kidney").
    - ``contradiction_rate``: on all of them, the reasoning names a lesion kind or organ other than the answer
      and its boxes do ("left kidney" against "right kidney"; "kidney" agrees with either), or (grounding,
      diagnosis) names a finding the answer does not have, or none for one it has.
    - ``hallucination_rate``: on lesion-free samples, the reasoning names a finding (a lesion kind, "lesion",
      "mass", ...; "no focal lesion" is none).
    Rates with no sample to count are left out.
    """
    cases = [p for p in predictions if "organ" in p.sample.source or _is_lesion_free(p.sample)]
    lesion = [p for p in cases if p.sample.source.get("organ") is not None]
    free = [p for p in cases if _is_lesion_free(p.sample)]
    out = {}
    if lesion:
        out["organ_named_rate"] = metrics.proportion(
            [p.sample.source["organ"] in metrics.named_organs(p.parsed.reasoning) for p in lesion]
        )
    if cases:
        out["contradiction_rate"] = metrics.proportion([_contradicts(p) for p in cases])
    if free:
        out["hallucination_rate"] = metrics.proportion([metrics.names_finding(p.parsed.reasoning) for p in free])
    return out


def _grounding_score(predictions: Sequence[Prediction]) -> dict[str, Estimate]:
    return metrics.grounding_estimates([p.sample.boxes for p in predictions], [p.parsed.boxes for p in predictions])


def _vqa_score(predictions: Sequence[Prediction]) -> dict[str, Estimate]:
    references = [p.sample.answer or "" for p in predictions]
    closed = [bool(p.sample.options) for p in predictions]
    return metrics.vqa_estimates(references, [p.parsed.answer for p in predictions], closed)


def evaluate(
    backend: VLMBackend,
    samples: Sequence[TrainingSample],
    *,
    batch_size: int = 16,
    consistency_variants: int = 0,
    max_new_tokens: int = 96,
) -> EvaluationReport:
    """All metrics the samples allow; ``consistency_variants`` N > 0 re-asks the diagnosis samples in the base
    prompt and the paper's variants 1..N (N = 10 for Supplementary Table 4)."""
    if not samples:
        raise ValueError("nothing to evaluate: no samples")
    predictions = predict(backend, samples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    table = MetricsTable()
    by_task = {task: [p for p in predictions if p.sample.task == task] for task in ("diagnosis", "grounding", "vqa")}
    diagnosis = by_task["diagnosis"]
    if diagnosis:
        labels = sorted({p.sample.label for p in diagnosis} | {o for p in diagnosis for o in p.sample.options or []})

        def diagnosis_score(subset: Sequence[Prediction]) -> dict[str, Estimate]:
            truth, predicted = [p.sample.label for p in subset], [p.parsed.label for p in subset]
            return metrics.classification_estimates(truth, predicted, labels)

        def accuracy(subset: Sequence[Prediction]) -> dict[str, Estimate]:
            # within one true kind macro F1 means little: the breakdowns report accuracy (that kind's recall)
            return {"accuracy": diagnosis_score(subset)["accuracy"]}

        _add_groups(table, "diagnosis", diagnosis, diagnosis_score, accuracy)
    if by_task["grounding"]:
        _add_groups(table, "grounding", by_task["grounding"], _grounding_score)
    if by_task["vqa"]:
        _add_groups(table, "vqa", by_task["vqa"], _vqa_score)
    if consistency_variants > 0 and diagnosis:
        per_variant = []
        for variant in range(consistency_variants + 1):
            asked = [
                prompts.diagnosis_prompt(p.sample.source.get("modality", "CT"), p.sample.options or [], variant)
                for p in diagnosis
            ]
            answers = predict(
                backend,
                [p.sample for p in diagnosis],
                batch_size=batch_size,
                prompts=asked,
                max_new_tokens=max_new_tokens,
            )
            per_variant.append([a.parsed.label for a in answers])
        truth = [p.sample.label for p in diagnosis]
        table.add("consistency", metrics.consistency_estimates(truth, per_variant))
        for variant, correct in enumerate(metrics.variant_correct(truth, per_variant)):
            table.add("consistency", {"accuracy": metrics.proportion(correct)}, "variant", str(variant))
    rates = reasoning_rates(predictions)
    if rates:
        table.add("reasoning", rates)
        for task, task_predictions in by_task.items():
            if task_rates := reasoning_rates(task_predictions):
                table.add("reasoning", task_rates, "task", task)
    return EvaluationReport(table=table, predictions=predictions)


def plot_metrics(table: MetricsTable, path: str | Path, title: str) -> Path:
    """One bar panel per section and per breakdown: every metric in [0, 1] with its 95% interval as an error bar
    and its n (matplotlib, Agg: no display needed)."""
    import matplotlib  # lazy: plots only; Agg is chosen here, not for every importer

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    panels = []
    for section, values in table.sections.items():
        headline = table.details.get(section, {}).get(ALL, {}).get(ALL, {})
        panels.append((section, [(name, headline.get(name, value)) for name, value in values.items()]))
        for group, keys in table.details.get(section, {}).items():
            if group != ALL:
                bars = [(f"{key}\n{name}", e) for key, found in keys.items() for name, e in found.items()]
                panels.append((f"{section} by {group}", bars))
    panels = [(name, [(label, v) for label, v in bars if 0.0 <= _value(v) <= 1.0]) for name, bars in panels]
    panels = [(name, bars) for name, bars in panels if bars]
    widest = max((len(bars) for _, bars in panels), default=1)
    columns = min(3, max(1, len(panels)))
    rows = -(-max(1, len(panels)) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * max(3.5, 0.4 * widest + 1.2), 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (name, bars) in zip(axes.flat, panels, strict=False):
        values = [_value(v) for _, v in bars]
        errors = np.array(
            [
                [v.value - v.low, v.high - v.value] if isinstance(v, Estimate) and v.low is not None else [0.0, 0.0]
                for _, v in bars
            ]
        ).T
        drawn = ax.bar(range(len(bars)), values, yerr=errors, capsize=3, color="#4477aa", ecolor="#222222")
        annotations = [f"{_value(v):.2f}\nn={v.n}" if isinstance(v, Estimate) else f"{v:.2f}" for _, v in bars]
        ax.bar_label(drawn, labels=annotations, fontsize=6, padding=2)
        ax.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 1.25)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _value(value: float | Estimate) -> float:
    return value.value if isinstance(value, Estimate) else float(value)
