"""MONAI Label train task ``evlf_train``: corrected labels in the datastore -> a new, gated adapter version.

MONAI Label runs training in a child process (``monailabel.interfaces.utils.app -m train``) whose stdout lines it
shows in ``/train/`` status, so progress is logged one line per step. The child fine-tunes its own copy of the
model starting from the promoted adapter, saves the result as the next version in the adapter registry and moves
the ``promoted`` pointer only if the held-out check is not worse; the server process picks the new adapter up on
its next request (see :mod:`monailabel_evlf.app.serving`) and serves the old one until then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from monailabel_evlf import paths
from monailabel_evlf.app.config import AppConfig
from monailabel_evlf.app.labels import read_label_boxes
from monailabel_evlf.app.security import TRAIN_PARAMS, check_train_params, parse_bool, refuse
from monailabel_evlf.imaging.volume import load_volume
from monailabel_evlf.training import finetune
from monailabel_evlf.training.config import DetectorConfig, GRPOConfig, SFTConfig, config_from_dict
from monailabel_evlf.training.learning_loop import load_learning_loop_config
from monailabel_evlf.training.samples import SampleOptions, correction_samples

if TYPE_CHECKING:
    from monailabel_evlf.app.serving import ServedModel

logger = logging.getLogger(__name__)

GATE_METRIC = "acc@0.5"  # grounding Acc@0.5 on the held-out samples (training.evaluate keys)
RECIPE = Path("training") / "learning-loop.yaml"  # under the configs folder


def few_shot_recipe() -> dict[str, Any]:
    """The detector / SFT / GRPO stage configs of configs/training/learning-loop.yaml: the app trains on corrections
    with exactly the settings whose lift the learning-loop benchmark measures."""
    loop = load_learning_loop_config(paths.configs_dir() / RECIPE)
    return {
        "detector": config_from_dict(DetectorConfig, loop.detector or {}),
        "sft": config_from_dict(SFTConfig, loop.sft),
        "grpo": config_from_dict(GRPOConfig, loop.grpo),
    }


def split_held_out(
    items: Sequence[Any], fraction: float = 0.25, key: Callable[[Any], Any] = lambda item: getattr(item, "task", None)
) -> tuple[list[Any], list[Any]]:
    """Every ``round(1 / fraction)``-th item of each ``key`` group (e.g. task) is held out, so the gate sees every
    task; a group of one stays for training, a group of two or more keeps at least one for the check.
    Deterministic and order-preserving."""
    step = max(2, round(1 / fraction))
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    held_at: set[int] = set()
    for members in groups.values():
        if len(members) > 1:
            held_at |= {i for n, i in enumerate(members) if n % step == step - 1} or {members[-1]}
    train = [item for i, item in enumerate(items) if i not in held_at]
    return train, [items[i] for i in sorted(held_at)]


class EVLFTrainTask(TrainTask):
    """Few-shot GRPO (or SFT) of the LoRA adapter on the datastore's corrected studies."""

    def __init__(self, served: ServedModel, config: AppConfig) -> None:
        super().__init__("EVLF few-shot fine-tuning (LoRA) on corrected boxes; promotes only if held-out not worse")
        self.served = served
        self.app_config = config

    def check_can_train(self) -> None:
        """409 before MONAI Label starts the training child when the served backend cannot be fine-tuned here (a
        remote inference server only generates); otherwise the child fails after the client got 200 SUBMITTED."""
        reason = getattr(self.served.backend, "cannot_train", None)
        if reason:
            raise refuse(409, f"training needs a local backend: {reason}")

    def config(self) -> dict[str, Any]:
        return {"method": self.app_config.train_method, "steps": self.app_config.train_steps, "label_tag": "final"}

    def stats(self) -> dict[str, Any]:
        registry = self.served.registry
        promoted = registry.promoted()
        return {
            "adapter_versions": [v.name for v in registry.versions()],
            "promoted": promoted.name if promoted else None,
            "metrics": promoted.metrics if promoted else {},
        }

    def sample_options(self):
        backend = self.served.backend
        size = (self.app_config.image_size, self.app_config.image_size)
        return SampleOptions(
            box_codec=backend.box_codec,
            size=size,
            window=self.app_config.window_for(backend),
            labels=self.app_config.targets,
            modality=self.app_config.modality,
        )

    def collect_samples(self, datastore, label_tag: str) -> list:
        """Training samples from every image with a saved label under ``label_tag``, one study after another."""
        options = self.sample_options()
        samples = []
        for index, image_id in enumerate(sorted(datastore.get_labeled_images(label_tag))):
            volume = load_volume(datastore.get_image_uri(image_id))
            volume.meta.setdefault("modality", self.app_config.modality)
            boxes = read_label_boxes(datastore.get_label_uri(image_id, label_tag), volume)
            samples += correction_samples(volume, boxes, options, seed=index, source={"image": image_id})
            logger.info("evlf_train: %s -> %d boxes", image_id, len(boxes))
        return samples

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any]:
        started = time.perf_counter()
        self.check_can_train()
        # the server's route checked these before answering; checked again because this child trusts no one
        client = {k: request[k] for k in TRAIN_PARAMS if k in request}
        check_train_params(client, self.app_config, self.app_config.limits)
        method = request.get("method", self.app_config.train_method)
        steps = int(request.get("steps", self.app_config.train_steps))
        label_tag = request.get("label_tag", DefaultLabelTag.FINAL.value)
        gate = parse_bool(request.get("gate", True), "gate")
        samples = self.collect_samples(datastore, label_tag)
        train, held = split_held_out(samples)
        if not held:
            raise ValueError(
                f"{len(samples)} sample(s) under label tag {label_tag!r}: need 2+ for training and the gate"
            )
        logger.info("evlf_train: %d training samples, %d held out, method %s", len(train), len(held), method)

        def progress(step: int, total: int, logs: dict[str, float]) -> None:
            shown = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if isinstance(v, float))
            logger.info("evlf_train step %d/%d %s", step, total, shown)

        # the few-shot recipe measured by `evlf bench learning-loop` (its YAML's stages); "steps" sets the SFT
        # epochs for "sft", the GRPO steps otherwise. The compact loops: a few CPU steps in this process
        recipe = few_shot_recipe()
        served = self.served
        detector = None
        if self.app_config.detector_steps and getattr(served.backend, "has_proposals", False):
            # the model sees lesions only through its proposals: LoRA alone cannot reach what the detector misses
            detector = replace(recipe["detector"], steps=self.app_config.detector_steps)
        stages = finetune.method_stages(
            method,
            sft=replace(recipe["sft"], epochs=steps) if method == "sft" else recipe["sft"],
            grpo=replace(recipe["grpo"], steps=steps),
            detector=detector,
        )
        # trains this process's own model copy: the server process keeps serving until the pointer moves
        result = finetune.finetune_adapter(
            served.backend,
            train,
            held,
            served.registry,
            stages,
            gate_metric=GATE_METRIC,
            tolerance=0.0 if gate else float("inf"),
            callback=progress,
            config_extra={"label_tag": label_tag, "samples": len(samples)},
            max_new_tokens=self.app_config.max_new_tokens,
        )
        logger.info("evlf_train: saved %s %s, promoted=%s", result.version.name, result.metrics, result.promoted)
        return {
            "version": result.version.name,
            "parent": result.version.meta.get("parent"),
            "promoted": result.promoted,
            "metrics": result.metrics,
            "baseline_metrics": result.baseline_metrics,
            "seconds": round(time.perf_counter() - started, 2),
        }
