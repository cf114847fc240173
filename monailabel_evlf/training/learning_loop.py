"""``evlf bench learning-loop``: does the annotation loop learn? Zero-shot vs few-shot fine-tuning on a shift.

The shifted cases are something the demo model lacks (configs/training/learning-loop.yaml says which and why:
a contrast-enhanced protocol whose bright organs it never saw). Each "corrected case" is one phantom study whose
lesion boxes stand in for a radiologist's corrected ROI boxes and go through
:func:`~monailabel_evlf.training.samples.correction_samples`, the path the MONAI Label train task uses. For each
number of cases the adapter is reset to the demo weights and trained by each method on the same samples — SFT,
GRPO (grounding IoU + format rewards) and the paper's SFT then GRPO, each after the detector stage for models with
the detection connector — then measured on held-out shifted cases (Acc@0.5, mIoU) with wall time and, for GRPO,
the share of groups whose rewards differ (the groups with signal).

The model, training and imaging imports are lazy (inside the functions that run the benchmark): ``evlf`` imports
this module to register the sub-command, and ``evlf --help`` should not load monai and transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from monailabel_evlf.model import load_backend
from monailabel_evlf.training.config import TRAINING_CONFIG_DIR as CONFIG_DIR
from monailabel_evlf.training.config import (
    DetectorConfig,
    GRPOConfig,
    SFTConfig,
    config_from_dict,
    load_training_yaml,
    tqdm_progress,
)

logger = logging.getLogger(__name__)


@dataclass
class LearningLoopConfig:
    model: str = "models/evlf-demo"
    backend: str = "evlf"
    kinds: list[str] | None = None  # the shift: lesion kinds of the new cases
    organs: list[str] | None = None  # ... and their host organs
    shots: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    held_out_cases: int = 48
    seed: int = 2024
    size: tuple[int, int] = (96, 96)
    window: str = "model"  # "model": the window the model was trained with
    noise_sd_hu: tuple[float, float] | None = None  # a shift: a noisier (low-dose) protocol
    organ_enhancement_hu: tuple[float, float] | None = None  # a shift: a contrast-enhanced protocol
    phantom_shape: tuple[int, int, int] = (96, 96, 40)
    methods: list[str] = field(default_factory=lambda: ["sft", "grpo", "sft+grpo"])
    detector: dict[str, Any] | None = None  # the detector stage before each method (detection-connector models)
    sft: dict[str, Any] = field(default_factory=dict)
    grpo: dict[str, Any] = field(default_factory=dict)


def load_learning_loop_config(path: str | Path) -> LearningLoopConfig:
    return config_from_dict(LearningLoopConfig, load_training_yaml(path))


def shifted_cases(config: LearningLoopConfig, count: int, seed_offset: int, options: Any) -> list[list[Any]]:
    """``count`` studies of the shifted distribution with one lesion each -> one sample list per case."""
    from monailabel_evlf.data.phantoms import make_phantom
    from monailabel_evlf.imaging.geometry import VoxelBox
    from monailabel_evlf.imaging.volume import Volume
    from monailabel_evlf.training.samples import correction_samples

    cases = []
    index = 0
    while len(cases) < count:
        phantom = make_phantom(
            [config.seed, seed_offset, index],
            shape=config.phantom_shape,
            kinds=config.kinds,
            organs=config.organs,
            n_lesions=1,
            noise_sd_hu=config.noise_sd_hu,
            organ_enhancement_hu=config.organ_enhancement_hu,
        )
        index += 1
        lesions = phantom.ground_truth["lesions"]
        if not lesions:  # the generator found no room for the lesion in this anatomy
            continue
        boxes = [VoxelBox(lo=les["voxel_box"]["lo"], hi=les["voxel_box"]["hi"], label=les["label"]) for les in lesions]
        volume = Volume(phantom.image, phantom.affine, {"modality": "CT"})
        cases.append(correction_samples(volume, boxes, options, seed=index))
    return cases


def run_learning_loop(config: LearningLoopConfig, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """The whole benchmark; writes ``learning_loop.json``, ``learning_loop.md`` and ``learning_loop.png``."""
    from monailabel_evlf.imaging.windowing import resolve_window
    from monailabel_evlf.training.detector import copy_proposal_targets, detector_held, train_detector
    from monailabel_evlf.training.evaluate import evaluate
    from monailabel_evlf.training.finetune import grounding_rewards
    from monailabel_evlf.training.grpo import train_grpo
    from monailabel_evlf.training.samples import SampleOptions
    from monailabel_evlf.training.sft import train_sft

    if not config.shots or min(config.shots) < 1:
        raise ValueError(f"shots must be positive case counts, got {config.shots}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = load_backend(config.backend, config.model)
    window = resolve_window(config.window, getattr(backend, "input_window", None))
    options = SampleOptions(box_codec=backend.box_codec, size=tuple(config.size), window=window, tasks=("grounding",))
    train_cases = shifted_cases(config, max(config.shots), 1, options)
    held_out = [s for case in shifted_cases(config, config.held_out_cases, 2, options) for s in case]
    sft_config, grpo_config = config_from_dict(SFTConfig, config.sft), config_from_dict(GRPOConfig, config.grpo)
    use_detector = config.detector is not None and getattr(backend, "has_proposals", False)
    detector_config = config_from_dict(DetectorConfig, config.detector) if use_detector else None
    unknown = sorted(set(config.methods) - {"sft", "grpo", "sft+grpo"})
    if unknown:
        raise ValueError(f"unknown learning-loop methods {unknown}; known: sft, grpo, sft+grpo")

    def measure(name: str, shots: int, seconds: float, spread: float | None = None) -> dict[str, Any]:
        metrics = evaluate(backend, held_out).flat()
        row = {
            "method": name,
            "cases": shots,
            "acc@0.5": metrics["acc@0.5"],
            "miou": metrics["miou"],
            "seconds": seconds,
            "grpo_groups_with_spread": spread,
        }
        logger.info("%s", row)
        return row

    backend.load_adapter(None)
    rows = [measure("zero-shot", 0, 0.0)]
    for shots in sorted(config.shots):
        for name in config.methods:
            train = [s for case in train_cases[:shots] for s in case]
            backend.load_adapter(None)  # every run starts from the demo weights with a fresh adapter
            started = time.perf_counter()
            callback = _progress(f"{name} {shots}") if progress else None
            spread = None
            with contextlib.ExitStack() as held:
                if detector_config is not None:
                    train_detector(backend, train, detector_config, callback=callback)
                    train = copy_proposal_targets(backend, train)
                    held.enter_context(detector_held(backend))
                if name in ("sft", "sft+grpo"):
                    train_sft(backend, train, sft_config, callback=callback)
                if name in ("grpo", "sft+grpo"):
                    history = train_grpo(backend, train, grounding_rewards(), grpo_config, callback=callback)
                    spread = sum(h["groups_with_spread"] for h in history) / len(history)
            rows.append(measure(name, shots, time.perf_counter() - started, spread))
    backend.load_adapter(None)
    result = {"config": asdict(config), "held_out_samples": len(held_out), "rows": rows}
    (out / "learning_loop.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "learning_loop.md").write_text(format_table(rows) + "\n")
    plot_learning_curve(rows, out / "learning_loop.png")
    return result


def _progress(desc: str):
    return tqdm_progress(desc)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| method | corrected cases | Acc@0.5 | mIoU | train time (s) | GRPO groups with reward spread |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        spread = row.get("grpo_groups_with_spread")
        lines.append(
            f"| {row['method']} | {row['cases']} | {row['acc@0.5']:.3f} | {row['miou']:.3f} | {row['seconds']:.1f} "
            f"| {'-' if spread is None else f'{spread:.2f}'} |"
        )
    return "\n".join(lines)


def plot_learning_curve(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    import matplotlib  # lazy: plots only; Agg is chosen here, not for every importer

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    zero = next(r for r in rows if r["method"] == "zero-shot")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, metric, title in zip(axes, ("acc@0.5", "miou"), ("Acc@0.5", "mIoU"), strict=True):
        for method, colour in (("grpo", "#228833"), ("sft", "#4477aa"), ("sft+grpo", "#aa3377")):
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                continue
            ax.plot([r["cases"] for r in mine], [r[metric] for r in mine], "o-", color=colour, label=method.upper())
        ax.axhline(zero[metric], color="#999999", linestyle="--", label="zero-shot")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("corrected cases")
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def run_command(args: argparse.Namespace) -> int:
    config = load_learning_loop_config(args.config)
    if args.model:
        config.model = args.model
    if args.shots:
        config.shots = args.shots
    result = run_learning_loop(config, args.out)
    print(format_table(result["rows"]))
    print(f"\nwrote {args.out}/learning_loop.json, .md, .png")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "learning-loop", help="zero-shot vs few-shot GRPO vs SFT on a distribution shift (Acc@0.5, mIoU, time)"
    )
    parser.add_argument("--config", default=str(CONFIG_DIR / "learning-loop.yaml"), help="benchmark YAML")
    parser.add_argument("--model", default=None, help="override the model path")
    parser.add_argument(
        "--shots", nargs="+", type=int, default=None, help="numbers of corrected cases, e.g. 8 16 32 64"
    )
    parser.add_argument("--out", default="bench-learning-loop", help="output folder")
    parser.set_defaults(func=run_command)
