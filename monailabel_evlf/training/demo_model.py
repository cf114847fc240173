"""``evlf build-demo-model``: the small offline EVLF committed at models/evlf-demo, trained here on phantoms.

Nothing pretrained exists offline, so the recipe adds a Stage 0 before the paper's two stages; it plays the part of
the foundation model's pre-training. Stage 0a fits the detection pixel connector (pixel encoder + proposal head) on
the true boxes (:mod:`monailabel_evlf.training.detector`); Stage 0b trains every other weight (disease encoder,
connectors, LLM) with the SFT loop on targets that copy the proposals' numbers. Optional Stage 1 (SFT on LoRA +
connectors, plus the tiny encoders, which ``train_encoders`` unfreezes because they start random) and Stage 2 (GRPO
with the verifiable rewards) run through the ordinary backend exactly as a user's fine-tuning would. The LoRA
weights are merged and the model is saved with ``save_pretrained`` (safetensors + tokenizer + processor), so the app
loads it like any other checkpoint and a user's adapters start from it. Held-out metrics and the recipe go into
the folder.
The lesion kinds / organs listed in the recipe are the only ones it sees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from monailabel_evlf.data.phantoms import make_phantom
from monailabel_evlf.model.backends.evlf import EVLFBackend
from monailabel_evlf.model.tiny import build_tiny_evlf
from monailabel_evlf.training.config import (
    DetectorConfig,
    GRPOConfig,
    ProgressCallback,
    SFTConfig,
    config_from_dict,
    load_training_yaml,
)
from monailabel_evlf.training.detector import copy_proposal_targets, detector_held, train_detector
from monailabel_evlf.training.evaluate import evaluate
from monailabel_evlf.training.finetune import default_rewards
from monailabel_evlf.training.grpo import train_grpo
from monailabel_evlf.training.samples import CENTRAL_AREA_FRACTION, SampleOptions, phantom_samples
from monailabel_evlf.training.sft import train_sft
from monailabel_evlf.training.study_evaluation import evaluate_studies

logger = logging.getLogger(__name__)


@dataclass
class DemoData:
    train_studies: int = 60
    held_out_studies: int = 12
    held_out_normal_studies: int = 0  # extra lesion-free held-out studies for the per-study false-box rate
    seed: int = 0  # training studies use seeds [seed, i], held-out ones [seed + 1, i]
    kinds: list[str] | None = None
    organs: list[str] | None = None
    size: tuple[int, int] = (96, 96)
    window: str = "abdomen"
    tasks: tuple[str, ...] = ("grounding", "diagnosis")
    normal_slices: int = 1
    prompt_variants: int = 10
    # training slices per lesion: those whose cut is >= this fraction of its largest. Below 0.5 the thin caps at a
    # lesion's ends are taught too (the 3D box's extent, and complete answers where a cap shares a slice with
    # another lesion); the held-out slice benchmark always keeps the central slices, as it was defined
    train_min_area_fraction: float = CENTRAL_AREA_FRACTION
    # training grounding samples whose answer holds two or more boxes are shown this many times per epoch: they are
    # few (7% of them), and a model that saw them once answers one box where a slice holds two lesions
    multi_box_repeat: int = 1

    def __post_init__(self) -> None:
        if self.multi_box_repeat < 1:
            raise ValueError(f"multi_box_repeat must be >= 1, got {self.multi_box_repeat}")


@dataclass
class DemoConfig:
    model: dict[str, Any] = field(default_factory=dict)  # monailabel_evlf.model.tiny.build_tiny_evlf arguments
    backend: dict[str, Any] = field(default_factory=dict)  # EVLFBackend options (lora_r, lora_alpha, ...)
    data: DemoData = field(default_factory=DemoData)
    detector: DetectorConfig | None = None  # Stage 0a: the detection connector (models with num_proposals > 0)
    pretrain: SFTConfig = field(default_factory=SFTConfig)  # Stage 0(b): all (other) weights
    sft: SFTConfig | None = None  # Stage 1: LoRA + connectors (+ tiny encoders)
    grpo: GRPOConfig | None = None  # Stage 2


CONSISTENCY_VARIANTS = 10  # the paper's diagnosis prompt variants, all re-asked in the held-out evaluation


def load_demo_config(path: str | Path) -> DemoConfig:
    raw = load_training_yaml(path)
    unknown = sorted(set(raw) - {"model", "backend", "data", "detector", "pretrain", "sft", "grpo"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}")
    return DemoConfig(
        model=dict(raw.get("model") or {}),
        backend=dict(raw.get("backend") or {}),
        data=config_from_dict(DemoData, raw.get("data")),
        detector=config_from_dict(DetectorConfig, raw["detector"]) if raw.get("detector") else None,
        pretrain=config_from_dict(SFTConfig, raw.get("pretrain")),
        sft=config_from_dict(SFTConfig, raw["sft"]) if raw.get("sft") else None,
        grpo=config_from_dict(GRPOConfig, raw["grpo"]) if raw.get("grpo") else None,
    )


def sample_options(data: DemoData, backend: Any) -> Any:
    """How the recipe's phantoms become samples for ``backend``."""
    return SampleOptions(
        box_codec=backend.box_codec,
        size=tuple(data.size),
        window=data.window,
        tasks=tuple(data.tasks),
        prompt_variants=data.prompt_variants,
    )


def phantom_studies(data: DemoData, split: str) -> list[Any]:
    """The training or held-out phantoms, in memory (no files: fast and exactly reproducible)."""
    count, seed = (data.train_studies, data.seed) if split == "train" else (data.held_out_studies, data.seed + 1)
    return [
        make_phantom([seed, index], kinds=data.kinds, organs=data.organs, study_id=f"{split}_{index:03d}")
        for index in range(count)
    ]


def normal_studies(data: DemoData) -> list[Any]:
    """Extra lesion-free held-out phantoms (another seed stream): false 3D boxes per normal study needs more
    than the two or three that a random draw of ``held_out_studies`` brings."""
    return [
        make_phantom(
            [data.seed + 1, 1000 + index],
            kinds=data.kinds,
            organs=data.organs,
            n_lesions=0,
            study_id=f"held_out_normal_{index:03d}",
        )
        for index in range(data.held_out_normal_studies)
    ]


def phantom_split(data: DemoData, options: Any, split: str, phantoms: list[Any] | None = None) -> list[Any]:
    """Training or held-out samples from in-memory phantoms (:func:`phantom_studies` unless given)."""
    samples = []
    min_area_fraction = data.train_min_area_fraction if split == "train" else CENTRAL_AREA_FRACTION
    for index, phantom in enumerate(phantoms if phantoms is not None else phantom_studies(data, split)):
        samples += phantom_samples(
            phantom.image,
            phantom.affine,
            phantom.ground_truth,
            options,
            normal_slices=data.normal_slices,
            min_area_fraction=min_area_fraction,
            seed=index,
        )
    if split == "train":
        samples += [s for s in samples if s.task == "grounding" and len(s.boxes) > 1] * (data.multi_box_repeat - 1)
    return samples


def smooth_number_embeddings(model: Any, tokenizer: Any, seed: int = 0) -> None:
    """Start the box-number tokens "0".."100" on a smooth sinusoidal curve instead of at random points.

    Why: a random-init model must otherwise discover from scratch that 41 is next to 42; with neighbouring numbers
    starting close together, a near miss of one unit already costs little and coordinates train far faster. The
    sinusoid (as transformer position encodings) is scaled to the other rows' norm and mixed with a little noise.
    """
    ids = tokenizer.convert_tokens_to_ids([str(n) for n in range(101)])
    embeddings = model.get_input_embeddings().weight
    dim = embeddings.shape[1]
    values = torch.arange(101, dtype=torch.float32)[:, None]
    frequencies = torch.exp(-torch.arange(0, dim, 2, dtype=torch.float32) * (torch.log(torch.tensor(200.0)) / dim))
    table = torch.zeros(101, dim)
    table[:, 0::2] = torch.sin(values * frequencies)
    table[:, 1::2] = torch.cos(values * frequencies)[:, : dim // 2]
    with torch.no_grad():
        scale = embeddings.norm(dim=1).mean() / table.norm(dim=1).mean()
        noise = torch.randn(101, dim, generator=torch.Generator().manual_seed(seed)) * 0.1
        embeddings[ids] = (table * scale + noise * scale).to(embeddings.dtype)


def _save_merged(backend: Any, out_dir: Path) -> None:
    """Merge LoRA (and the trained connector copies) into the model and save it as a plain checkpoint."""
    merged = backend.peft_model.merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    backend.processor.save_pretrained(out_dir)


def build_demo_model(
    out_dir: str | Path, config: DemoConfig, *, callback: ProgressCallback | None = None
) -> dict[str, float]:
    """Train the demo model into ``out_dir`` (must not exist or be empty); returns its held-out metrics."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")

    work = out.parent / f".{out.name}.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    model, processor = build_tiny_evlf(None, **{**config.model, "train_encoders": True})
    model.config.input_window = config.data.window  # the app renders slices the way the model learnt them
    smooth_number_embeddings(model, processor.tokenizer)
    model.save_pretrained(work / "init", safe_serialization=True)
    processor.save_pretrained(work / "init")
    # lora_seed None: LoRA A continues the stream the model seed started (build_tiny_evlf), as when the committed
    # model was built; the build is reproducible by its seeds either way
    backend = EVLFBackend.from_pretrained(str(work / "init"), **{"lora_seed": None, **config.backend})
    data = config.data
    options = sample_options(data, backend)
    held_out_studies = phantom_studies(data, "held_out")
    train, held_out = phantom_split(data, options, "train"), phantom_split(data, options, "held_out", held_out_studies)
    logger.info("demo model: %d training and %d held-out samples", len(train), len(held_out))

    timings["samples_s"] = time.perf_counter() - started
    if config.detector is not None:
        mark = time.perf_counter()
        train_detector(backend, train, config.detector, callback=callback)
        train = copy_proposal_targets(backend, train)
        timings["detector_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    # Stage 0(b) trains every other weight (module docstring); peft's unused copies of the originals stay frozen
    for name, parameter in backend.peft_model.named_parameters():
        parameter.requires_grad_("original_module" not in name)
    with detector_held(backend) if config.detector is not None else contextlib.nullcontext():
        train_sft(backend, train, config.pretrain, callback=callback)
    _save_merged(backend, work / "stage0")
    timings["stage0_s"] = time.perf_counter() - mark

    backend = EVLFBackend.from_pretrained(str(work / "stage0"), **config.backend)
    if config.sft is not None:
        mark = time.perf_counter()
        train_sft(backend, train, config.sft, callback=callback)
        timings["sft_s"] = time.perf_counter() - mark
    if config.grpo is not None:
        mark = time.perf_counter()
        grounding = [s for s in train if s.task == "grounding"]
        train_grpo(backend, grounding, default_rewards(), config.grpo, callback=callback)
        timings["grpo_s"] = time.perf_counter() - mark
    final = work / "final"
    _save_merged(backend, final)

    timings["total_s"] = time.perf_counter() - started  # the build; the evaluation below is not part of it
    metrics = evaluate_demo_model(final, config, held_out, held_out_studies, timings=timings, samples=len(train))
    if out.exists():
        out.rmdir()
    final.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def evaluate_demo_model(
    model_dir: str | Path,
    config: DemoConfig,
    held_out: list[Any] | None = None,
    held_out_studies: list[Any] | None = None,
    *,
    timings: dict[str, float] | None = None,
    samples: int | None = None,
) -> dict[str, float]:
    """Held-out evaluation of a built demo model: slice metrics, per-study metrics (with the extra lesion-free
    studies) and study questions; writes ``eval/``, ``training_summary.json`` and ``README.md`` in ``model_dir``.
    Re-runnable on a saved model (``evlf build-demo-model DIR --evaluate-only``), e.g. after a pipeline change;
    the build timings and sample count are then kept from the existing summary."""
    model_dir = Path(model_dir)
    summary = model_dir / "training_summary.json"
    previous = json.loads(summary.read_text()) if summary.is_file() else {}
    backend = EVLFBackend.from_pretrained(str(model_dir), **config.backend)
    data = config.data
    if held_out_studies is None:
        held_out_studies = phantom_studies(data, "held_out")
    if held_out is None:
        held_out = phantom_split(data, sample_options(data, backend), "held_out", held_out_studies)
    report = evaluate(backend, held_out, consistency_variants=CONSISTENCY_VARIANTS)
    metrics = report.flat()
    studies = evaluate_studies(
        backend, [(p.image, p.affine, p.ground_truth) for p in [*held_out_studies, *normal_studies(data)]]
    )
    studies.save(model_dir / "eval")
    card = {
        "recipe": _jsonable(asdict(config)),
        "training_samples": samples if samples is not None else previous.get("training_samples"),
        "held_out_samples": len(held_out),
        "held_out_metrics": metrics,
        "held_out_study_metrics": studies.metrics(),
        "timings": timings if timings is not None else previous.get("timings", {}),
    }
    summary.write_text(json.dumps(card, indent=2) + "\n")
    (model_dir / "README.md").write_text(_model_card(card))
    report.save(model_dir / "eval", title="evlf-demo on held-out phantoms")
    return metrics


def _model_card(card: dict[str, Any]) -> str:
    metrics = "\n".join(
        f"| {name} | {value:.3f} |"
        for name, value in {**card["held_out_metrics"], **card.get("held_out_study_metrics", {})}.items()
    )
    return f"""# evlf-demo: a tiny offline EVLF trained on synthetic CT phantoms

For demonstrations and tests of the annotation loop only; not a medical device, never trained on patient data.
Built with `evlf build-demo-model` (recipe in `training_summary.json`, docs/training.md). Training samples:
{card["training_samples"]}; held-out samples: {card["held_out_samples"]} (phantoms with other seeds).
Lesion kinds seen in training: {", ".join(card["recipe"]["data"]["kinds"] or ["all"])}.

| held-out metric | value |
|---|---:|
{metrics}
"""


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
