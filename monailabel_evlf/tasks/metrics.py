"""The paper's evaluation metrics and a table that prints them as text or JSON.

Diagnosis: accuracy and macro F1. Grounding: Acc@0.1/0.3/0.5 (share of samples whose IoU reaches the threshold)
and mIoU, a sample's IoU being :func:`~monailabel_evlf.tasks.rewards.best_iou` (the reward's, without the floor).
VQA: closed-question accuracy and open-question recall (share of reference tokens the answer contains).
Consistency: agreement across the ten prompt variants of Supplementary Table 4.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.tasks.labels import normalize
from monailabel_evlf.tasks.rewards import best_iou

IOU_THRESHOLDS = (0.1, 0.3, 0.5)


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and normalize(a) == normalize(b)


def classification_metrics(
    truth: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """Accuracy and macro F1 over ``labels`` (default: the true labels seen); unmatched predictions count wrong."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} true labels for {len(predicted)} predictions")
    if not truth:
        raise ValueError("no samples")
    correct = [_same(t, p) for t, p in zip(truth, predicted, strict=True)]
    f1s = []
    for label in labels or sorted(set(truth)):
        tp = sum(c and _same(t, label) for t, c in zip(truth, correct, strict=True))
        fp = sum(_same(p, label) and not _same(t, label) for t, p in zip(truth, predicted, strict=True))
        fn = sum(_same(t, label) and not c for t, c in zip(truth, correct, strict=True))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": sum(correct) / len(truth), "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}


def grounding_metrics(truth: Sequence[Sequence[Box2D]], predicted: Sequence[Sequence[Box2D]]) -> dict[str, float]:
    """Acc@0.1/0.3/0.5 and mIoU over samples; a sample's IoU is the mean best IoU of its true boxes."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} ground truths for {len(predicted)} predictions")
    if not truth:
        raise ValueError("no samples")
    ious = [best_iou(p, t) for t, p in zip(truth, predicted, strict=True)]
    out = {f"acc@{t}": sum(iou >= t for iou in ious) / len(ious) for t in IOU_THRESHOLDS}
    out["miou"] = sum(ious) / len(ious)
    return out


def token_recall(prediction: str, reference: str) -> float:
    """Share of the reference's tokens present in the prediction (open-VQA recall)."""
    expected = normalize(reference).split()
    if not expected:
        return 1.0
    found = Counter(normalize(prediction).split())
    return sum(min(count, found[token]) for token, count in Counter(expected).items()) / len(expected)


def vqa_metrics(references: Sequence[str], predictions: Sequence[str], closed: Sequence[bool]) -> dict[str, float]:
    """Closed accuracy (exact after normalisation) and open recall; a kind with no question is left out."""
    if not len(references) == len(predictions) == len(closed):
        raise ValueError("references, predictions and closed flags must have the same length")
    rows = list(zip(references, predictions, closed, strict=True))
    closed_rows = [_same(r, p) for r, p, c in rows if c]
    open_rows = [token_recall(p, r) for r, p, c in rows if not c]
    out = {}
    if closed_rows:
        out["closed_accuracy"] = sum(closed_rows) / len(closed_rows)
    if open_rows:
        out["open_recall"] = sum(open_rows) / len(open_rows)
    return out


def consistency_metrics(truth: Sequence[str], per_variant: Sequence[Sequence[str | None]]) -> dict[str, float]:
    """Agreement across prompt variants: all-agree rate, accuracy per variant (mean, min, max, spread).

    ``per_variant[v][i]`` is the label predicted for sample ``i`` under prompt variant ``v``; a sample agrees when
    every variant gave the same (normalised) answer, right or wrong.
    """
    if not truth:
        raise ValueError("no samples")
    if not per_variant or any(len(v) != len(truth) for v in per_variant):
        raise ValueError("every variant needs one prediction per sample")
    accuracies = [sum(_same(t, p) for t, p in zip(truth, v, strict=True)) / len(truth) for v in per_variant]
    agree = [len({normalize(v[i] or "") for v in per_variant}) == 1 for i in range(len(truth))]
    return {
        "all_variants_agree": sum(agree) / len(agree),
        "variant_accuracy_mean": sum(accuracies) / len(accuracies),
        "variant_accuracy_min": min(accuracies),
        "variant_accuracy_max": max(accuracies),
        "variant_accuracy_spread": max(accuracies) - min(accuracies),
    }


@dataclass
class MetricsTable:
    """Sections of named metrics (diagnosis, grounding, vqa, consistency) with text and JSON renderings."""

    sections: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, section: str, values: dict[str, float]) -> None:
        self.sections.setdefault(section, {}).update(values)

    def flat(self) -> Iterator[tuple[str, float]]:
        """``("acc@0.5", 0.62)`` pairs (metric names are unique across sections): the keys the validation gate
        and the benchmarks read."""
        for values in self.sections.values():
            yield from values.items()

    def to_json(self) -> str:
        return json.dumps(self.sections, indent=2, sort_keys=True)

    def to_text(self) -> str:
        width = max((len(name) for values in self.sections.values() for name in values), default=0)
        lines = []
        for section, values in self.sections.items():
            lines.append(section)
            lines += [f"  {name:<{width}}  {value:6.3f}" for name, value in values.items()]
        return "\n".join(lines)
