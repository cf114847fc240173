"""Per-study evaluation through the app's own volume pipeline: what a reader scrolling the study would see.

Slice metrics say whether the model draws the right box on a slice it is shown; a reader sees 3D boxes linked
across the study's slices. Here every study goes through :meth:`VolumePipeline.ground` (the code the app's
``evlf_grounding`` task runs) and its 3D boxes are matched one-to-one (greedy by score) with the true lesions:

- lesion recall: share of lesions matched by one 3D box with 3D IoU >= ``iou_threshold`` (0.5);
- false boxes per lesion-free study, and per study with lesions (boxes matching no lesion);
- box-score AUROC: do the boxes' scores rank true boxes above false ones (Mann-Whitney U / (n_true * n_false)),
  over every scored box: the pipeline runs without its operating point (``min_box_score``), which recall and
  false boxes then apply, so the AUROC measures the scores rather than what the threshold left;
- a reliability table / plot: share of true boxes per score bin;
- study questions (the phantoms' VQA set, scope "study": presence, counts, the largest lesion's organ / side /
  kind / size / position, modality) answered by :meth:`VolumePipeline.answer_study`, the app's ``evlf_vqa``
  default: closed accuracy and open recall, overall and per question type.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

from monailabel_evlf.data.phantoms import vqa_items
from monailabel_evlf.imaging.geometry import VoxelBox, box_iou_3d
from monailabel_evlf.imaging.volume import Volume
from monailabel_evlf.inference import PipelineConfig, VolumePipeline
from monailabel_evlf.tasks.metrics import Estimate, bootstrap, bootstrap_mean, vqa_estimates, wilson


@dataclass
class StudyReport:
    """Per-study counts, every scored 3D box (score, is it a true box) and the summary metrics."""

    studies: list[dict[str, Any]] = field(default_factory=list)
    box_scores: list[float] = field(default_factory=list)
    box_true: list[bool] = field(default_factory=list)
    vqa: list[dict[str, Any]] = field(default_factory=list)  # question_type, closed, reference, prediction

    def metrics(self) -> dict[str, float]:
        lesions = sum(s["lesions"] for s in self.studies)
        found = sum(s["found"] for s in self.studies)
        normal = [s for s in self.studies if s["lesions"] == 0]
        abnormal = [s for s in self.studies if s["lesions"] > 0]
        out = {
            "studies": float(len(self.studies)),
            "lesions": float(lesions),
            "lesion_recall@0.5": found / lesions if lesions else float("nan"),
            "false_boxes_per_normal_study": (
                sum(s["false_boxes"] for s in normal) / len(normal) if normal else float("nan")
            ),
            "normal_studies": float(len(normal)),
            "false_boxes_per_lesion_study": (
                sum(s["false_boxes"] for s in abnormal) / len(abnormal) if abnormal else float("nan")
            ),
            "box_score_auroc": box_auroc(self.box_scores, self.box_true),
        }
        return out

    def estimates(self) -> dict[str, Estimate]:
        """The summary metrics with their n and 95% interval: recall over lesions (Wilson), false boxes per study
        (bootstrap over studies), AUROC (bootstrap over boxes). A few dozen boxes leave AUROC uncertain by about
        +-0.1, which a reader must see before comparing models."""
        out: dict[str, Estimate] = {}
        lesions = sum(s["lesions"] for s in self.studies)
        if lesions:
            out["lesion_recall@0.5"] = wilson(sum(s["found"] for s in self.studies), lesions)
        for name, rows in (
            ("false_boxes_per_normal_study", [s for s in self.studies if s["lesions"] == 0]),
            ("false_boxes_per_lesion_study", [s for s in self.studies if s["lesions"] > 0]),
        ):
            if rows:
                out[name] = bootstrap_mean([s["false_boxes"] for s in rows])
        scores, true = np.asarray(self.box_scores, dtype=float), np.asarray(self.box_true, dtype=bool)
        if true.any() and not true.all():

            def auroc(idx: np.ndarray) -> np.ndarray:  # resamples without both kinds of box count as chance
                flat = idx.reshape(-1, idx.shape[-1])
                values = [box_auroc(scores[row], true[row]) for row in flat]
                return np.nan_to_num(np.array(values), nan=0.5).reshape(idx.shape[:-1])

            out["box_score_auroc"] = bootstrap(auroc, len(scores))
        return out

    def vqa_estimates(self) -> dict[str, Any]:
        """Study-question closed accuracy / open recall (with n and 95% interval), overall and per question type."""

        def table(rows: list[dict[str, Any]]) -> dict[str, Any]:
            return vqa_estimates(
                [r["reference"] for r in rows], [r["prediction"] for r in rows], [r["closed"] for r in rows]
            )

        out: dict[str, Any] = {"all": table(self.vqa)} if self.vqa else {}
        for qtype in sorted({r["question_type"] for r in self.vqa}):
            out[qtype] = table([r for r in self.vqa if r["question_type"] == qtype])
        return out

    def reliability(self, bins: int = 10) -> list[dict[str, float]]:
        """Per score bin (equal width over [0, 1]): number of boxes, mean score, share of true boxes."""
        scores, true = np.asarray(self.box_scores, dtype=float), np.asarray(self.box_true, dtype=bool)
        rows = []
        edges = np.linspace(0.0, 1.0, bins + 1)
        for lo, hi in pairwise(edges):
            inside = (scores >= lo) & ((scores < hi) | (hi == 1.0))
            if inside.any():
                rows.append(
                    {
                        "bin": f"{lo:.1f}-{hi:.1f}",
                        "n": int(inside.sum()),
                        "mean_score": float(scores[inside].mean()),
                        "true_fraction": float(true[inside].mean()),
                    }
                )
        return rows

    def to_text(self) -> str:
        lines = ["per study (3D boxes through the volume pipeline): metric, value, n, 95% interval"]
        estimates = self.estimates()
        for name, value in self.metrics().items():
            shown = estimates.get(name, f"{value:6.3f}")
            lines.append(f"  {name:<30} {shown}")
        lines.append("  reliability: score bin, n, mean score, true fraction")
        lines += [
            f"    {r['bin']:<8} {r['n']:5d} {r['mean_score']:6.3f} {r['true_fraction']:6.3f}"
            for r in self.reliability()
        ]
        if self.vqa:
            lines.append("  study questions (evlf_vqa scope study): metric, value, n, 95% interval")
            for group, estimates in self.vqa_estimates().items():
                for name, e in estimates.items():
                    lines.append(f"    {group:<14} {name:<16} {e.value:6.3f}  {e.interval_text()}")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "studies.json", "text": out / "studies.txt", "png": out / "reliability.png"}
        vqa = {g: {k: e.to_json() for k, e in est.items()} for g, est in self.vqa_estimates().items()}
        payload = {
            "metrics": self.metrics(),
            "estimates": {name: e.to_json() for name, e in self.estimates().items()},
            "reliability": self.reliability(),
            "study_vqa": vqa,
            "studies": self.studies,
            "study_vqa_answers": self.vqa,
        }
        paths["json"].write_text(json.dumps(payload, indent=2, default=float) + "\n")
        paths["text"].write_text(self.to_text() + "\n")
        plot_reliability(self.reliability(), paths["png"])
        return paths


def box_auroc(scores: Sequence[float], true: Sequence[bool]) -> float:
    """Probability that a true box outscores a false one (ties count half); NaN without both kinds."""
    scores, true = np.asarray(scores, dtype=float), np.asarray(true, dtype=bool)
    if true.all() or not true.any():
        return float("nan")
    statistic = mannwhitneyu(scores[true], scores[~true], alternative="two-sided").statistic
    return float(statistic / (true.sum() * (~true).sum()))


def _truth_boxes(ground_truth: dict[str, Any]) -> list[VoxelBox]:
    return [
        VoxelBox(lo=np.asarray(les["voxel_box"]["lo"], float), hi=np.asarray(les["voxel_box"]["hi"], float))
        for les in ground_truth.get("lesions", [])
    ]


def match_study(
    predicted: Sequence[VoxelBox], truth: Sequence[VoxelBox], iou_threshold: float = 0.5
) -> tuple[int, list[bool]]:
    """``(lesions found, per predicted box: is it a true box)``; greedy one-to-one, best-scored boxes first."""
    order = sorted(range(len(predicted)), key=lambda n: -(predicted[n].score or 0.0))
    is_true = [False] * len(predicted)
    if not truth or not predicted:
        return 0, is_true
    iou = np.atleast_2d(box_iou_3d(list(predicted), list(truth)))
    taken: set[int] = set()
    for n in order:
        free = [(iou[n, t], t) for t in range(len(truth)) if t not in taken and iou[n, t] >= iou_threshold]
        if free:
            taken.add(max(free)[1])
            is_true[n] = True
    return len(taken), is_true


def evaluate_studies(
    backend: Any,
    studies: Sequence[tuple[np.ndarray, np.ndarray, dict[str, Any]]],
    pipeline_config: Any = None,
    *,
    iou_threshold: float = 0.5,
    questions: bool = True,
) -> StudyReport:
    """Run the grounding pipeline on ``(image, affine, ground_truth)`` studies and score their 3D boxes; with
    ``questions``, also the study's ground-truth study questions (:func:`data.phantoms.vqa_items`)."""
    config = pipeline_config or PipelineConfig()
    pipeline = VolumePipeline(backend, replace(config, min_box_score=0.0))
    report = StudyReport()
    for image, affine, truth in studies:
        volume = Volume(image, affine, {"modality": truth.get("modality", "CT")})
        result = pipeline.ground(volume)
        lesions = _truth_boxes(truth)
        _, every_true = match_study(result.voxel_boxes, lesions, iou_threshold)
        report.box_scores += [float(b.score or 0.0) for b in result.voxel_boxes]
        report.box_true += every_true
        result = _at_operating_point(result, config.min_box_score)
        found, is_true = match_study(result.voxel_boxes, lesions, iou_threshold)
        iou = np.atleast_2d(box_iou_3d(list(result.voxel_boxes), lesions)) if result.voxel_boxes and lesions else None
        report.studies.append(
            {
                "study_id": truth.get("study_id"),
                "lesions": len(lesions),
                "found": found,
                "boxes": len(result.voxel_boxes),
                "false_boxes": int(sum(not t for t in is_true)),
                # why a lesion was missed: its best 3D IoU with any box, and its voxel extent
                "lesion_best_iou": [
                    round(float(v), 3) for v in (iou.max(axis=0) if iou is not None else [0.0] * len(lesions))
                ],
                "lesion_extent_voxels": [(b.hi - b.lo).round(1).tolist() for b in lesions],
            }
        )
        for item in [i for i in vqa_items(truth) if i.scope == "study"] if questions else []:
            answered = pipeline.answer_study(volume, item.question, item.options, grounded=result)
            report.vqa.append(
                {
                    "study_id": truth.get("study_id"),
                    "question": item.question,
                    "question_type": item.question_type,
                    "closed": item.options is not None,
                    "reference": item.answer,
                    "prediction": answered.answer,
                }
            )
    return report


def _at_operating_point(result: Any, min_score: float) -> Any:
    """``result`` with only the 3D boxes the pipeline would report at ``min_score`` (what the app returns)."""
    keep = [n for n, box in enumerate(result.voxel_boxes) if (box.score or 0.0) >= min_score]
    return replace(
        result,
        voxel_boxes=[result.voxel_boxes[n] for n in keep],
        world_boxes=[result.world_boxes[n] for n in keep],
        box_slices=[result.box_slices[n] for n in keep],
    )


def plot_reliability(rows: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Reliability diagram: share of true boxes against mean score per bin (the diagonal is calibrated)."""
    import matplotlib  # lazy: plots only; Agg is chosen here, not for every importer

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(4.0, 4.0))
    ax.plot([0, 1], [0, 1], color="#bbbbbb", linestyle="--", linewidth=1)
    if rows:
        ax.plot([r["mean_score"] for r in rows], [r["true_fraction"] for r in rows], marker="o", color="#4477aa")
        for r in rows:
            ax.annotate(
                str(r["n"]),
                (r["mean_score"], r["true_fraction"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("3D box score")
    ax.set_ylabel("share of true boxes (3D IoU >= 0.5)")
    ax.set_title("box-score reliability (n per point)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


__all__ = ["StudyReport", "box_auroc", "evaluate_studies", "match_study", "plot_reliability"]
