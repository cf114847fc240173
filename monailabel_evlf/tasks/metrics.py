"""The paper's evaluation metrics, each with its sample size and a 95% interval, and a table that prints them.

Diagnosis: accuracy and macro F1. Grounding: Acc@0.1/0.3/0.5 (share of samples whose IoU reaches the threshold)
and mIoU, a sample's IoU being :func:`~monailabel_evlf.tasks.rewards.best_iou` (the reward's, without the floor).
VQA: closed-question accuracy and open-question recall (share of reference tokens the answer contains).
Consistency: agreement across the ten prompt variants of Supplementary Table 4. Reasoning: which organs and
findings a ``<think>`` text names (:func:`named_organs`, :func:`names_finding`).

Intervals, so that 0.6 on 5 samples reads differently from 0.6 on 500: Wilson for proportions (accuracies, Acc@t,
agreement, rates), a percentile bootstrap over samples with a fixed seed for everything else (mIoU, macro F1, open
recall, the per-variant summary), so the same predictions always give the same interval.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from monailabel_evlf.data.phantoms import LESION_KINDS, ORGANS
from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.tasks.labels import _NEGATION_REACH, _NEGATIONS, normalize
from monailabel_evlf.tasks.rewards import best_iou

IOU_THRESHOLDS = (0.1, 0.3, 0.5)
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
ALL = "all"  # the group / key of the headline numbers
KIDNEY = "kidney"  # a kidney named without its side
_CLAUSE_BREAKS = re.compile(r"[.;:,!?]")  # a negation does not reach across these


@dataclass(frozen=True)
class Estimate:
    """A metric over ``n`` samples with its 95% interval (``None`` where ``n`` is too small for one)."""

    value: float
    n: int
    low: float | None
    high: float | None
    method: str  # "wilson" or "bootstrap"

    def to_json(self) -> dict[str, float | int | str | None]:
        return asdict(self)

    def interval_text(self) -> str:
        interval = f"[{self.low:.3f}, {self.high:.3f}]" if self.low is not None else "[ n/a ]"
        return f"n={self.n:<5d} {interval} {self.method}"

    def __str__(self) -> str:
        return f"{self.value:6.3f}  {self.interval_text()}"


def wilson(successes: int, n: int) -> Estimate:
    """A proportion with its Wilson score interval (sound near 0 and 1 and for small n, unlike the normal one)."""
    if n < 1:
        raise ValueError("a proportion needs at least one sample")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    interval = stats.binomtest(int(successes), int(n)).proportion_ci(CONFIDENCE, method="wilson")
    return Estimate(successes / n, n, float(interval.low), float(interval.high), "wilson")


def proportion(flags: Sequence[bool] | np.ndarray) -> Estimate:
    flags = np.asarray(flags, dtype=bool)
    return wilson(int(flags.sum()), len(flags))


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """``statistic`` of ``n`` samples with a percentile-bootstrap interval over the samples.

    ``statistic`` maps sample indices ``(..., n)`` to values ``(...)`` (vectorised, so thousands of resamples cost
    one call); the point value is ``statistic`` of all samples.
    """
    if n < 1:
        raise ValueError("a bootstrap needs at least one sample")
    value = float(statistic(np.arange(n)))
    if n < 2:
        return Estimate(value, n, None, None, "bootstrap")
    result = stats.bootstrap(
        (np.arange(n),),
        lambda idx, axis=-1: statistic(np.moveaxis(idx, axis, -1)),
        vectorized=True,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return Estimate(
        value, n, float(result.confidence_interval.low), float(result.confidence_interval.high), "bootstrap"
    )


def bootstrap_mean(values: Sequence[float] | np.ndarray, seed: int = BOOTSTRAP_SEED) -> Estimate:
    values = np.asarray(values, dtype=float)
    return bootstrap(lambda idx: values[idx].mean(axis=-1), len(values), seed)


def _values(estimates: Mapping[str, Estimate]) -> dict[str, float]:
    return {name: e.value for name, e in estimates.items()}


def _encode(
    truth: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer codes after :func:`normalize`: the scored labels first, then other true labels; a prediction
    matching none (or ``None``) gets a code no truth has."""
    scored = list(dict.fromkeys(normalize(label) for label in (labels or sorted(set(truth)))))
    vocabulary = {name: code for code, name in enumerate(dict.fromkeys([*scored, *map(normalize, truth)]))}
    other = len(vocabulary)
    t = np.array([vocabulary[normalize(label)] for label in truth])
    p = np.array([other if label is None else vocabulary.get(normalize(label), other) for label in predicted])
    return t, p, len(scored)


def _macro_f1(t: np.ndarray, p: np.ndarray, n_scored: int) -> np.ndarray:
    """Macro F1 over the scored codes along the last axis; a label with no tp, fp or fn is left out."""
    codes = np.arange(n_scored)
    is_true, is_pred = t[..., None] == codes, p[..., None] == codes
    tp = (is_true & is_pred).sum(axis=-2)
    fp = (is_pred & ~is_true).sum(axis=-2)
    fn = (is_true & ~is_pred).sum(axis=-2)
    denominator = 2 * tp + fp + fn
    f1 = 2 * tp / np.maximum(denominator, 1)
    return f1.sum(axis=-1) / np.maximum((denominator > 0).sum(axis=-1), 1)


def classification_estimates(
    truth: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str] | None = None
) -> dict[str, Estimate]:
    """Accuracy (Wilson) and macro F1 (bootstrap) over ``labels`` (default: the true labels seen); unmatched
    predictions count wrong."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} true labels for {len(predicted)} predictions")
    if not truth:
        raise ValueError("no samples")
    t, p, n_scored = _encode(truth, predicted, labels)
    return {
        "accuracy": proportion(t == p),
        "macro_f1": bootstrap(lambda idx: _macro_f1(t[idx], p[idx], n_scored), len(t)),
    }


def classification_metrics(
    truth: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """The values of :func:`classification_estimates`."""
    return _values(classification_estimates(truth, predicted, labels))


def grounding_estimates(truth: Sequence[Sequence[Box2D]], predicted: Sequence[Sequence[Box2D]]) -> dict[str, Estimate]:
    """Acc@0.1/0.3/0.5 (Wilson) and mIoU (bootstrap); a sample's IoU is the mean best IoU of its true boxes."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} ground truths for {len(predicted)} predictions")
    if not truth:
        raise ValueError("no samples")
    ious = np.array([best_iou(p, t) for t, p in zip(truth, predicted, strict=True)])
    out = {f"acc@{threshold}": proportion(ious >= threshold) for threshold in IOU_THRESHOLDS}
    out["miou"] = bootstrap_mean(ious)
    return out


def grounding_metrics(truth: Sequence[Sequence[Box2D]], predicted: Sequence[Sequence[Box2D]]) -> dict[str, float]:
    """The values of :func:`grounding_estimates`."""
    return _values(grounding_estimates(truth, predicted))


def token_recall(prediction: str, reference: str) -> float:
    """Share of the reference's tokens present in the prediction (open-VQA recall)."""
    expected = normalize(reference).split()
    if not expected:
        return 1.0
    found = Counter(normalize(prediction).split())
    return sum(min(count, found[token]) for token, count in Counter(expected).items()) / len(expected)


def vqa_estimates(references: Sequence[str], predictions: Sequence[str], closed: Sequence[bool]) -> dict[str, Estimate]:
    """Closed accuracy (exact after normalisation; Wilson) and open recall (bootstrap); a kind with no question
    is left out."""
    if not len(references) == len(predictions) == len(closed):
        raise ValueError("references, predictions and closed flags must have the same length")
    rows = list(zip(references, predictions, closed, strict=True))
    closed_rows = [normalize(r) == normalize(p or "") for r, p, c in rows if c]
    open_rows = [token_recall(p or "", r) for r, p, c in rows if not c]
    out = {}
    if closed_rows:
        out["closed_accuracy"] = proportion(closed_rows)
    if open_rows:
        out["open_recall"] = bootstrap_mean(open_rows)
    return out


def vqa_metrics(references: Sequence[str], predictions: Sequence[str], closed: Sequence[bool]) -> dict[str, float]:
    """The values of :func:`vqa_estimates`."""
    return _values(vqa_estimates(references, predictions, closed))


def consistency_estimates(truth: Sequence[str], per_variant: Sequence[Sequence[str | None]]) -> dict[str, Estimate]:
    """Agreement across prompt variants: all-agree rate (Wilson), accuracy per variant (mean, min, max, spread;
    bootstrap over samples, each resample re-scoring every variant).

    ``per_variant[v][i]`` is the label predicted for sample ``i`` under prompt variant ``v``; a sample agrees when
    every variant gave the same (normalised) answer, right or wrong.
    """
    if not truth:
        raise ValueError("no samples")
    if not per_variant or any(len(v) != len(truth) for v in per_variant):
        raise ValueError("every variant needs one prediction per sample")
    correct = variant_correct(truth, per_variant)
    agree = [len({normalize(v[i] or "") for v in per_variant}) == 1 for i in range(len(truth))]

    def summary(reduce: Callable[[np.ndarray], np.ndarray]) -> Estimate:
        return bootstrap(lambda idx: reduce(correct[:, idx].mean(axis=-1)), len(truth))

    return {
        "all_variants_agree": proportion(agree),
        "variant_accuracy_mean": summary(lambda acc: acc.mean(axis=0)),
        "variant_accuracy_min": summary(lambda acc: acc.min(axis=0)),
        "variant_accuracy_max": summary(lambda acc: acc.max(axis=0)),
        "variant_accuracy_spread": summary(lambda acc: acc.max(axis=0) - acc.min(axis=0)),
    }


def variant_correct(truth: Sequence[str], per_variant: Sequence[Sequence[str | None]]) -> np.ndarray:
    """``(variants, samples)`` booleans: variant ``v`` got sample ``i`` right."""
    codes = [_encode(truth, v, None) for v in per_variant]
    return np.array([t == p for t, p, _ in codes])


def consistency_metrics(truth: Sequence[str], per_variant: Sequence[Sequence[str | None]]) -> dict[str, float]:
    """The values of :func:`consistency_estimates`."""
    return _values(consistency_estimates(truth, per_variant))


def _mentions(text: str, phrases: Mapping[str, str]) -> list[str]:
    """Canonical names of the ``phrases`` (normalised text -> name) in ``text``, longest phrase first at each word
    ("right kidney" is not also a "kidney"), leaving out those a negation shortly before in the same clause
    denies ("no cyst"; but "no cyst; a hyperdense lesion" names the lesion)."""
    table = sorted(((phrase.split(), name) for phrase, name in phrases.items()), key=lambda row: -len(row[0]))
    found = []
    for clause in _CLAUSE_BREAKS.split(text):
        words, start = normalize(clause).split(), 0
        while start < len(words):
            for tokens, name in table:
                if words[start : start + len(tokens)] == tokens:
                    if not _NEGATIONS.intersection(words[max(0, start - _NEGATION_REACH) : start]):
                        found.append(name)
                    start += len(tokens)
                    break
            else:
                start += 1
    return found


_ORGAN_PHRASES = {
    **{normalize(organ): organ for organ in ORGANS},
    **{"hepatic": "liver", "splenic": "spleen", "kidneys": KIDNEY, "renal": KIDNEY, KIDNEY: KIDNEY},
}
_KIND_PHRASES = {
    **{normalize(kind): kind for kind in LESION_KINDS},
    **{f"{normalize(kind)}s": kind for kind in LESION_KINDS},  # plurals
}
# a finding named without its kind still claims one
_FINDING_PHRASES = {
    **_KIND_PHRASES,
    **{w: w for w in ("lesion", "lesions", "mass", "masses", "nodule", "nodules", "abnormality", "abnormalities")},
}


def named_organs(text: str) -> set[str]:
    """Organs of :data:`~monailabel_evlf.data.phantoms.ORGANS` the text names; a kidney without its side is
    :data:`KIDNEY` ("hepatic", "splenic", "renal" count)."""
    return set(_mentions(text, _ORGAN_PHRASES))


def named_kinds(text: str) -> set[str]:
    """Lesion kinds of :data:`~monailabel_evlf.data.phantoms.LESION_KINDS` the text names, not negated."""
    return set(_mentions(text, _KIND_PHRASES))


def names_finding(text: str) -> bool:
    """Whether the text claims a finding: a lesion kind or a word like "lesion" / "mass", not negated ("No focal
    lesion is seen" claims none)."""
    return bool(_mentions(text, _FINDING_PHRASES))


def organs_agree(a: str, b: str) -> bool:
    """Same organ, where "kidney" without a side agrees with either kidney (but right and left do not)."""
    return a == b or (KIDNEY in (a, b) and a.endswith(KIDNEY) and b.endswith(KIDNEY))


@dataclass
class MetricsTable:
    """Sections (task -> metric -> value: the plain numbers, :meth:`flat`) and their ``details``:
    section -> group -> key -> metric -> :class:`Estimate`, group/key ``"all"`` holding the headline estimate and
    e.g. group ``"question_type"`` key ``"organ"`` one breakdown."""

    sections: dict[str, dict[str, float]] = field(default_factory=dict)
    details: dict[str, dict[str, dict[str, dict[str, Estimate]]]] = field(default_factory=dict)

    def add(self, section: str, values: Mapping[str, float | Estimate], group: str = ALL, key: str = ALL) -> None:
        """Plain values or estimates; those of group ``"all"`` are also the section's plain numbers."""
        estimates = {name: v for name, v in values.items() if isinstance(v, Estimate)}
        if estimates:
            self.details.setdefault(section, {}).setdefault(group, {}).setdefault(key, {}).update(estimates)
        if group == ALL:
            plain = {name: v.value if isinstance(v, Estimate) else float(v) for name, v in values.items()}
            self.sections.setdefault(section, {}).update(plain)

    def flat(self) -> Iterator[tuple[str, float]]:
        """``("acc@0.5", 0.62)`` pairs (metric names are unique across sections): the keys the validation gate
        and the benchmarks read."""
        for values in self.sections.values():
            yield from values.items()

    def to_json(self) -> str:
        """The sections' plain numbers at the top level (as before) and ``details`` with n and intervals."""
        details = {
            section: {
                group: {key: {name: e.to_json() for name, e in metrics.items()} for key, metrics in keys.items()}
                for group, keys in groups.items()
            }
            for section, groups in self.details.items()
        }
        return json.dumps({**self.sections, "details": details}, indent=2, sort_keys=True)

    def to_text(self) -> str:
        width = max((len(name) for values in self.sections.values() for name in values), default=0)
        lines = []
        for section, values in self.sections.items():
            lines.append(section)
            headline = self.details.get(section, {}).get(ALL, {}).get(ALL, {})
            for name, value in values.items():
                detail = f"  {headline[name].interval_text()}" if name in headline else ""
                lines.append(f"  {name:<{width}}  {value:6.3f}{detail}")
            for group, keys in self.details.get(section, {}).items():
                if group == ALL:
                    continue
                lines.append(f"  by {group}")
                key_width = max(len(key) for key in keys)
                name_width = max(len(name) for found in keys.values() for name in found)
                for key, found in keys.items():
                    lines += [f"    {key:<{key_width}}  {name:<{name_width}}  {e}" for name, e in found.items()]
        return "\n".join(lines)
