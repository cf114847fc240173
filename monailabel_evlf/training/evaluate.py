"""``evlf eval``: a backend (+ adapter) on labelled samples -> the paper's metrics table, JSON and a plot.

Diagnosis: accuracy and macro F1; grounding: Acc@0.1/0.3/0.5 and mIoU (best predicted box per ground-truth box);
VQA: closed accuracy and open recall; consistency: the same diagnosis question in the paper's prompt variants
(fraction of cases where every variant gives the same label, and the per-variant accuracy spread). Generation is
greedy, so the numbers are reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monailabel_evlf.model.backend import SamplingConfig, VLMBackend
from monailabel_evlf.training.samples import TrainingSample

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    sample: TrainingSample
    text: str
    parsed: Any  # monailabel_evlf.tasks.parsing.ParsedAnswer


@dataclass
class EvaluationReport:
    """Metrics per task plus the predictions they came from."""

    table: Any  # monailabel_evlf.tasks.metrics.MetricsTable
    predictions: list[Prediction] = field(default_factory=list)

    def flat(self) -> dict[str, float]:
        """``{"acc@0.5": ..., "miou": ..., "diagnosis/accuracy": ...}``: the keys the validation gate reads."""
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
        plot_metrics(self.flat(), paths["png"], title)
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
    from monailabel_evlf.tasks.parsing import parse_answer

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
            size = sample.image_size
            parsed = parse_answer(answers[0], backend.box_convention, size, backend.model_input_size(size))
            out.append(Prediction(sample, answers[0], parsed))
    return out


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
    from monailabel_evlf.tasks import metrics, prompts

    if not samples:
        raise ValueError("nothing to evaluate: no samples")
    predictions = predict(backend, samples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    table = metrics.MetricsTable()
    by_task = {task: [p for p in predictions if p.sample.task == task] for task in ("diagnosis", "grounding", "vqa")}
    diagnosis = by_task["diagnosis"]
    if diagnosis:
        truth = [p.sample.label for p in diagnosis]
        labels = sorted(set(truth) | {o for p in diagnosis for o in p.sample.options or []})
        table.add("diagnosis", metrics.classification_metrics(truth, [p.parsed.label for p in diagnosis], labels))
    if by_task["grounding"]:
        grounding = by_task["grounding"]
        table.add(
            "grounding",
            metrics.grounding_metrics([p.sample.boxes for p in grounding], [p.parsed.boxes for p in grounding]),
        )
    if by_task["vqa"]:
        vqa = by_task["vqa"]
        references = [p.sample.answer or "" for p in vqa]
        closed = [bool(p.sample.options) for p in vqa]
        table.add("vqa", metrics.vqa_metrics(references, [p.parsed.answer for p in vqa], closed))
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
        table.add("consistency", metrics.consistency_metrics([p.sample.label for p in diagnosis], per_variant))
    return EvaluationReport(table=table, predictions=predictions)


def plot_metrics(metrics: dict[str, float], path: str | Path, title: str) -> Path:
    """A bar chart of every metric in [0, 1] (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, v in metrics.items() if 0.0 <= v <= 1.0]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(names) + 1), 3.5))
    bars = ax.bar(range(len(names)), [metrics[n] for n in names], color="#4477aa")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
