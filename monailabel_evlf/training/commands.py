"""``evlf eval``, ``evlf train`` and ``evlf build-demo-model``.

``evlf --help`` imports this module to register the commands, so what loads torch, monai or ITK (the model, imaging,
samples and training modules) is imported inside the command that needs it, each line saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from monailabel_evlf.training.adapters import AdapterRegistry
from monailabel_evlf.training.config import TRAINING_CONFIG_DIR as CONFIG_DIR
from monailabel_evlf.training.config import (
    GRPOConfig,
    SFTConfig,
    TRLConfig,
    config_from_dict,
    load_training_yaml,
    tqdm_progress,
)

logger = logging.getLogger(__name__)

# a preset (configs/models/demo.yaml): resolved against the checkout or the wheel's bundle, so any cwd works
DEFAULT_MODEL = "demo"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="evlf", help="evlf, qwen2_5_vl, qwen3_vl or module:Class (default evlf)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model path, hub id or preset (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--adapter", default=None, help="adapter directory (a registry version folder)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default float32)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)"
    )


def _add_sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks", nargs="+", default=["grounding", "diagnosis"], choices=["grounding", "diagnosis", "vqa"]
    )
    parser.add_argument("--size", nargs=2, type=int, default=None, metavar=("W", "H"), help="rendered slice size")
    parser.add_argument(
        "--window",
        default="model",
        help="CT window preset, level,width, or three '/'-separated (RGB); default: the model's own training window",
    )


def load_backend_from_args(args: argparse.Namespace) -> Any:
    from monailabel_evlf.model import load_backend  # lazy: torch, kept out of `evlf --help`

    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # accelerate launch / torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return load_backend(
        args.backend,
        args.model,
        device=device,
        dtype=args.dtype or "float32",
        trust_remote_code=args.trust_remote_code,
        adapter=args.adapter,
    )


def sample_options_from_args(args: argparse.Namespace, backend: Any) -> Any:
    from monailabel_evlf.imaging.windowing import resolve_window  # lazy: monai + ITK, kept out of `evlf --help`
    from monailabel_evlf.training.samples import SampleOptions  # lazy: torch + monai, kept out of `evlf --help`

    size = tuple(args.size) if args.size else (96, 96)
    window = resolve_window(args.window, getattr(backend, "input_window", None))
    return SampleOptions(box_codec=backend.box_codec, size=size, window=window, tasks=tuple(args.tasks))


def run_eval(args: argparse.Namespace) -> int:
    from monailabel_evlf.inference import PipelineConfig  # lazy: torch + monai, kept out of `evlf --help`
    from monailabel_evlf.training.evaluate import evaluate  # lazy: torch + monai, kept out of `evlf --help`
    from monailabel_evlf.training.samples import load_samples  # lazy: torch + monai, kept out of `evlf --help`
    from monailabel_evlf.training.study_evaluation import evaluate_studies  # lazy: torch + monai, as above

    backend = load_backend_from_args(args)
    options = sample_options_from_args(args, backend)
    samples = load_samples(args.data, options)
    if args.limit:
        samples = samples[: args.limit]
    report = evaluate(backend, samples, batch_size=args.batch_size, consistency_variants=args.consistency)
    paths = list(report.save(args.out, title=f"{Path(args.model).name} on {Path(args.data).name}").values())
    print(report.to_text())
    if args.studies and (Path(args.data) / "ground_truth").is_dir():
        studies = phantom_folder_studies(args.data)
        study_report = evaluate_studies(backend, studies, PipelineConfig(window=args.window))
        paths += list(study_report.save(args.out).values())
        print(study_report.to_text())
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0


def phantom_folder_studies(folder: str | Path) -> list[tuple[Any, Any, dict[str, Any]]]:
    """``(image, affine, ground truth)`` of every study in a phantom folder, read from its files."""
    from monailabel_evlf.data.phantoms import GROUND_TRUTH_DIR, read_ground_truth  # lazy: monai, not for --help
    from monailabel_evlf.imaging.volume import load_volume  # lazy: monai + ITK, kept out of `evlf --help`

    root = Path(folder)
    studies = []
    for path in sorted((root / GROUND_TRUTH_DIR).glob("*.json")):
        truth = read_ground_truth(root, path.stem)
        volume = load_volume(root / truth["files"]["image"])
        studies.append((volume.array, volume.affine, truth))
    return studies


def trl_options(settings: dict[str, Any], args: argparse.Namespace) -> Any:
    """The YAML's ``trl`` section with the command line's switches on top (they win)."""
    options = config_from_dict(TRLConfig, settings.get("trl"))
    switches = {
        "output_dir": args.trl_output_dir,
        "resume_from_checkpoint": args.resume,
        "bf16": args.bf16 or None,
        "gradient_checkpointing": args.gradient_checkpointing or None,
        "use_vllm": args.use_vllm or None,
    }
    return dataclasses.replace(options, **{k: v for k, v in switches.items() if v is not None})


def bf16_weights_notice(args: argparse.Namespace, trl: Any) -> str | None:
    """What ``evlf train`` says when TRL trains in bf16 on a GPU over float32 base weights because ``--dtype`` was
    not given. The default stays float32 (no silent switch): with bf16 base weights the fully trained connectors
    (peft ``modules_to_save``: EVLF's connectors, the Qwen merger) are bf16 parameters too, as peft keeps only
    LoRA in float32, so that memory-for-precision trade is the user's to make (docs/training.md, TRL)."""
    if trl is None or not trl.bf16 or args.dtype is not None or not str(args.device).startswith("cuda"):
        return None
    return (
        "--bf16 is autocast only: the base weights load in float32 (the --dtype default), twice their bf16 memory on "
        "the GPU. --dtype bfloat16 loads them in bf16 (the connectors then train as bf16 parameters; LoRA stays "
        "float32); --dtype float32 keeps this and silences this notice"
    )


def run_train(args: argparse.Namespace) -> int:
    from monailabel_evlf.training.finetune import finetune_adapter, method_stages  # lazy: torch, not for --help
    from monailabel_evlf.training.samples import load_samples  # lazy: torch + monai, kept out of `evlf --help`

    settings = load_training_yaml(args.config)
    trl = trl_options(settings, args) if args.trainer == "trl" else None
    notice = bf16_weights_notice(args, trl)
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    stages = method_stages(
        "+".join(name for name in ("sft", "grpo") if name in args.stages),  # SFT first, as the paper
        sft=config_from_dict(SFTConfig, settings.get("sft")),
        grpo=config_from_dict(GRPOConfig, settings.get("grpo")),
        trainer=args.trainer,
        trl=trl,
    )
    backend = load_backend_from_args(args)
    options = sample_options_from_args(args, backend)
    train, held_out = load_samples(args.data, options), load_samples(args.held_out, options)
    registry = AdapterRegistry(args.registry, args.model_name or Path(args.model).name)
    result = finetune_adapter(
        backend,
        train,
        held_out,
        registry,
        stages,
        gate_metric=args.gate_metric,
        tolerance=args.tolerance,
        callback=tqdm_progress("train"),
        config_extra={"data": str(args.data), "config_file": str(args.config)},
    )
    if result is None:  # not the main process of a multi-process (accelerate launch) run: it only trained
        return 0
    state = "promoted" if result.promoted else "kept (not promoted: worse than the current one on held-out data)"
    print(f"adapter {result.version.path} {state}")
    print({k: round(v, 4) for k, v in result.metrics.items()})
    return 0


def run_build_demo_model(args: argparse.Namespace) -> int:
    from monailabel_evlf.training.demo_model import (  # lazy: torch + transformers, kept out of `evlf --help`
        build_demo_model,
        evaluate_demo_model,
        load_demo_config,
    )

    config = load_demo_config(args.config)
    if args.evaluate_only:
        metrics = evaluate_demo_model(args.out_dir, config)
    else:
        metrics = build_demo_model(args.out_dir, config, callback=tqdm_progress("demo"))
    print({k: round(v, 4) for k, v in metrics.items()})
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "eval", help="metrics of a model (+adapter) on phantoms or a manifest folder: text, JSON and PNG"
    )
    _add_model_args(evaluate)
    _add_sample_args(evaluate)
    evaluate.add_argument(
        "--data", required=True, help="phantom folder (evlf make-sample-data) or folder with manifest.jsonl"
    )
    evaluate.add_argument("--out", default="eval-out", help="folder for metrics.txt/json/png (default eval-out)")
    evaluate.add_argument("--consistency", type=int, default=10, help="diagnosis prompt variants to compare (0: off)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--limit", type=int, default=0, help="evaluate only the first N samples")
    evaluate.add_argument(
        "--no-studies",
        dest="studies",
        action="store_false",
        help="skip the per-study 3D-box evaluation through the volume pipeline (phantom folders only)",
    )
    evaluate.set_defaults(func=run_eval)

    train = subparsers.add_parser("train", help="SFT and/or GRPO an adapter, save it as a new version, gate + promote")
    _add_model_args(train)
    _add_sample_args(train)
    train.add_argument("--data", required=True, help="training samples: phantom folder or manifest folder")
    train.add_argument("--held-out", required=True, help="held-out samples for the validation gate")
    train.add_argument("--config", default=str(CONFIG_DIR / "default.yaml"), help="training YAML (sft/grpo sections)")
    train.add_argument("--stages", nargs="+", default=["grpo"], choices=["sft", "grpo"], help="default: grpo")
    train.add_argument("--registry", default="adapters", help="adapter registry root (default ./adapters)")
    train.add_argument("--model-name", default=None, help="registry folder name (default: the model folder name)")
    train.add_argument("--gate-metric", default="acc@0.5", help="held-out metric that must not get worse")
    train.add_argument("--tolerance", type=float, default=0.0, help="allowed drop of the gate metric")
    train.add_argument(
        "--trainer",
        default="compact",
        choices=["compact", "trl"],
        help="compact: our loops (every backend, CPU-friendly); trl: TRL's GRPOTrainer / SFTTrainer "
        "(transformers backends; accelerate launch for several GPUs, see docs/training.md)",
    )
    trl = train.add_argument_group("--trainer trl (override the YAML's trl section)")
    trl.add_argument("--trl-output-dir", default=None, help="checkpoints and TensorBoard runs (default trl-runs)")
    trl.add_argument("--resume", default=None, metavar="CHECKPOINT", help="a checkpoint-N folder, or 'latest'")
    trl.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    trl.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    trl.add_argument("--use-vllm", action="store_true", help="generate GRPO samples with vLLM (needs vllm, a GPU)")
    train.set_defaults(func=run_train)

    demo = subparsers.add_parser(
        "build-demo-model", help="train the small offline EVLF demo model on phantoms (SFT + GRPO, CPU minutes)"
    )
    demo.add_argument("out_dir", help="output folder (the committed one is models/evlf-demo)")
    demo.add_argument("--config", default=str(CONFIG_DIR / "demo.yaml"), help="demo recipe YAML")
    demo.add_argument(
        "--evaluate-only",
        action="store_true",
        help="re-run the held-out evaluation of the model already in out_dir (eval/, training_summary.json)",
    )
    demo.set_defaults(func=run_build_demo_model)
