"""``evlf bench detector``: the detection pixel connector alone, trained from scratch and scored on held-out phantoms.

A demo build takes about 18 minutes, most of it the LLM stage; whether a detector change helps shows in the detector's
own numbers after a few minutes: the top-1 and best-of-K proposal against each true box (Acc@0.5, mIoU), by box
size, on held-out phantoms of another seed and on training slices (over- vs under-fitting). The model and data
come from the demo recipe (``configs/training/demo.yaml``), so the numbers speak for the committed design.

The model, training and imaging imports are lazy (inside the functions that run the benchmark): ``evlf`` imports
this module to register the sub-command, and ``evlf --help`` should not load monai and transformers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from monailabel_evlf.training.config import TRAINING_CONFIG_DIR as CONFIG_DIR

SIZE_BINS_PX = ((0, 4), (4, 8), (8, 16), (16, 10_000))  # the true box's longer side, slice pixels


def score_proposals(backend: Any, slices: Sequence[Any], batch_size: int = 32) -> dict[str, Any]:
    """Top-1 / best-of-K proposal IoU with every true box of ``slices``, and how well the top-1 proposal's score
    tells a slice whose top-1 hits a lesion (IoU >= 0.5) from a lesion-free slice (AUROC): what a false box on a
    normal slice would score against a true one."""
    from monailabel_evlf.imaging.geometry import box_iou_2d
    from monailabel_evlf.training.study_evaluation import box_auroc

    rows = []  # (longer side px, top-1 IoU, best IoU)
    hit_scores, lesion_free_scores = [], []  # top-1 scores
    lesion_free = 0
    for start in range(0, len(slices), batch_size):
        chunk = slices[start : start + batch_size]
        for sample, proposals in zip(chunk, backend.propose([s.image for s in chunk]), strict=True):
            top = proposals[0] if proposals else None
            if not sample.boxes:
                lesion_free += 1
                if top is not None and top.score is not None:
                    lesion_free_scores.append(top.score)
                continue
            top1_ious = []
            for truth in sample.boxes:
                ious = [float(box_iou_2d(truth, p)) for p in proposals] or [0.0]
                rows.append((max(truth.x2 - truth.x1, truth.y2 - truth.y1), ious[0], max(ious)))
                top1_ious.append(ious[0])
            if top is not None and top.score is not None and max(top1_ious) >= 0.5:
                hit_scores.append(top.score)
    table = np.array(rows).reshape(-1, 3)
    report: dict[str, Any] = {"n": len(table), "lesion_free_slices": lesion_free}
    if hit_scores and lesion_free_scores:
        scores = hit_scores + lesion_free_scores
        report["top1_score_auroc"] = box_auroc(scores, [True] * len(hit_scores) + [False] * len(lesion_free_scores))
    if not len(table):
        return report
    report.update(
        {
            "top1_acc@0.5": float((table[:, 1] >= 0.5).mean()),
            "top1_miou": float(table[:, 1].mean()),
            "best_of_k_acc@0.5": float((table[:, 2] >= 0.5).mean()),
        }
    )
    for lo, hi in SIZE_BINS_PX:
        inside = (table[:, 0] >= lo) & (table[:, 0] < hi)
        if inside.any():
            report[f"{lo}-{hi}px"] = {"n": int(inside.sum()), "top1_acc@0.5": float((table[inside, 1] >= 0.5).mean())}
    return report


def run_detector_bench(
    config_path: str | Path, out: str | Path, *, steps: int | None = None, train_studies: int | None = None
) -> dict[str, Any]:
    """Build the recipe's untrained model, fit its detector (``steps`` / ``train_studies`` override the recipe),
    score it; writes ``detector_bench.json`` under ``out``."""
    from monailabel_evlf.model.backends.evlf import EVLFBackend
    from monailabel_evlf.model.tiny import build_tiny_evlf
    from monailabel_evlf.training.demo_model import load_demo_config, phantom_split
    from monailabel_evlf.training.detector import train_detector, unique_slices
    from monailabel_evlf.training.samples import SampleOptions

    config = load_demo_config(config_path)
    if config.detector is None:
        raise ValueError(f"{config_path} has no detector section")
    data = replace(config.data, train_studies=train_studies or config.data.train_studies)
    detector = replace(config.detector, steps=steps or config.detector.steps)
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_evlf(folder, **{**config.model, "train_encoders": True})
        backend = EVLFBackend.from_pretrained(folder, **config.backend)
    options = SampleOptions(
        box_codec=backend.box_codec, size=tuple(data.size), window=data.window, tasks=("grounding",)
    )
    train = unique_slices(phantom_split(data, options, "train"))
    held_out = unique_slices(phantom_split(data, options, "held_out"))
    started = time.perf_counter()
    history = train_detector(backend, train, detector)
    seconds = time.perf_counter() - started
    result = {
        "config": str(config_path),
        "train_studies": data.train_studies,
        "steps": detector.steps,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / detector.steps, 3),
        "final_loss": history[-1]["loss"],
        "held_out": score_proposals(backend, held_out),
        "train": score_proposals(backend, train[: len(held_out) * 4]),
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "detector_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_command(args: argparse.Namespace) -> int:
    result = run_detector_bench(args.config, args.out, steps=args.steps, train_studies=args.train_studies)
    print(json.dumps(result, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("detector", help="the detection connector alone: proposal Acc@0.5 by box size")
    parser.add_argument("--config", default=str(CONFIG_DIR / "demo.yaml"), help="demo-model recipe YAML")
    parser.add_argument("--steps", type=int, default=None, help="detector steps (default: the recipe's)")
    parser.add_argument("--train-studies", type=int, default=None, help="training phantoms (default: the recipe's)")
    parser.add_argument("--out", default="bench-detector", help="output folder")
    parser.set_defaults(func=run_command)
