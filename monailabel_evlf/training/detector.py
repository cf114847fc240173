"""The detection pixel connector's own training stage, and SFT targets that copy its proposals.

An EVLF with the detection connector (``num_proposals > 0``) sees lesions through its proposals: the LLM can only
write a box the detector proposes. So a model that must learn to see something new (a first build, or a
radiologist's corrections of a kind it misses) first fits the detector on the true boxes, then the answer loss
teaches the LLM to pick proposals. "Copy targets" make that second step easy and exact: where a proposal overlaps a
true box (IoU >= 0.5) the target answer writes that proposal's own numbers, so the LLM learns to copy rather than to
invent coordinates (measured in ../shared/notes/model-evidence.md: +0.1 Acc@0.5 over true-box targets).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch

from monailabel_evlf.imaging.geometry import Box2D, box_iou_2d
from monailabel_evlf.model.detection import DetectionTarget
from monailabel_evlf.tasks import prompts
from monailabel_evlf.tasks.parsing import split_answer
from monailabel_evlf.training.config import DetectorConfig, ProgressCallback
from monailabel_evlf.training.samples import TrainingSample

logger = logging.getLogger(__name__)


def unique_slices(samples: Sequence[TrainingSample]) -> list[TrainingSample]:
    """One sample per rendered slice (the one listing every box on it): the detector's training images. The
    samples of one slice share its rendered image array, so the array's identity is the slice's."""
    best: dict[int, TrainingSample] = {}
    for sample in samples:
        key = id(sample.image)
        if key not in best or len(sample.boxes) > len(best[key].boxes):
            best[key] = sample
    return list(best.values())


def detection_target(sample: TrainingSample, labels: Sequence[str], sites: Sequence[str]) -> DetectionTarget:
    """A slice's true boxes as fractions of the image, with label / site indices (-1 where not in the lists)."""
    width, height = sample.image_size
    box_sites = sample.source.get("box_sites") or [None] * len(sample.boxes)
    if not sample.boxes:
        return DetectionTarget.empty()
    boxes = torch.tensor([[b.x1 / width, b.y1 / height, b.x2 / width, b.y2 / height] for b in sample.boxes])
    label_ids = torch.tensor([labels.index(b.label) if b.label in labels else -1 for b in sample.boxes])
    site_ids = torch.tensor([sites.index(s) if s in sites else -1 for s in box_sites])
    return DetectionTarget(boxes.float(), label_ids, site_ids)


def _augment(
    image: np.ndarray, target: DetectionTarget, rng: np.random.Generator, config: DetectorConfig
) -> tuple[np.ndarray, DetectionTarget, bool]:
    """Intensity gain / offset, a translation that keeps every box inside (the empty border reads as air) and,
    for half the images, a left-right mirror (boxes mirrored with it)."""
    out = image.astype(np.float32) / 255.0
    if config.intensity_jitter:
        j = config.intensity_jitter
        out = out * rng.uniform(1 - j, 1 + j) + rng.uniform(-j, j)
    if config.max_shift:
        out, target = _translate(out, target, rng, config.max_shift)
    mirrored = bool(config.flip and rng.random() < 0.5)
    if mirrored:
        out = out[:, ::-1]
        boxes = target.boxes.clone()
        boxes[:, [0, 2]] = 1.0 - target.boxes[:, [2, 0]]
        target = DetectionTarget(boxes, target.labels, target.sites)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0)), target, mirrored


def _translate(
    image: np.ndarray, target: DetectionTarget, rng: np.random.Generator, max_shift: float
) -> tuple[np.ndarray, DetectionTarget]:
    height, width = image.shape[:2]
    lo = target.boxes[:, :2].min(0).values.numpy() if len(target.boxes) else np.ones(2)
    hi = target.boxes[:, 2:].max(0).values.numpy() if len(target.boxes) else np.zeros(2)
    # whole pixels, within +-max_shift and never pushing a box over the edge
    shift = [
        int(
            rng.integers(
                int(np.ceil(max(-max_shift, -lo[n]) * size)), int(np.floor(min(max_shift, 1 - hi[n]) * size)) + 1
            )
        )
        for n, size in enumerate((width, height))
    ]
    dx, dy = shift
    moved = np.zeros_like(image)
    src_x, dst_x = slice(max(0, -dx), min(width, width - dx)), slice(max(0, dx), min(width, width + dx))
    src_y, dst_y = slice(max(0, -dy), min(height, height - dy)), slice(max(0, dy), min(height, height + dy))
    moved[dst_y, dst_x] = image[src_y, src_x]
    boxes = target.boxes + torch.tensor([dx / width, dy / height, dx / width, dy / height])
    return moved, DetectionTarget(boxes.clamp(0.0, 1.0), target.labels, target.sites)


def train_detector(
    backend, samples: Sequence[TrainingSample], config: DetectorConfig, *, callback: ProgressCallback | None = None
) -> list[dict[str, float]]:
    """Fit the pixel encoder + proposal head on the slices' true boxes (lesion-free slices teach "nothing here").

    Only :meth:`EVLFBackend.detector_parameters` change (the others' ``requires_grad`` is restored afterwards);
    one-cycle AdamW, seeded sample order and augmentation.
    """
    if not getattr(backend, "has_proposals", False):
        raise ValueError(f"{backend.model_id}: the detector stage needs an EVLF model with the detection connector")
    slices = unique_slices(samples)
    if not slices:
        raise ValueError("the detector stage needs at least one training slice")
    config_model = backend.model.config
    labels, sites = list(config_model.finding_labels), list(config_model.finding_sites or ())
    targets = [detection_target(s, labels, sites) for s in slices]
    params = backend.detector_parameters()
    trainable_before = [p for p in backend.peft_model.parameters() if p.requires_grad]
    for p in trainable_before:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        return _fit(backend, slices, targets, params, config, callback)
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in trainable_before:
            p.requires_grad_(True)
        backend.eval()


@contextlib.contextmanager
def detector_held(backend) -> Iterator[None]:
    """The later stages of a round (SFT, GRPO) with the detector that the detector stage just fitted held fixed.

    Why: the detector (pixel encoder, proposal head, box refiner) learns the corrected boxes from its own loss; the
    answer loss, and GRPO's sampled-reward gradient above all, would otherwise move the proposals' boxes and scores
    through the region tokens and undo it (measured: docs/training.md, learning loop). The demo build's stage 0b uses
    it too. Its proposals are cached meanwhile, being a pure function of the image.
    """
    params = backend.detector_parameters()
    trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with backend.model.model.frozen_detector():
            yield
    finally:
        for p, flag in zip(params, trainable, strict=True):
            p.requires_grad_(flag)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively; emulated bf16 (older CPUs) is slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch's own CPU capability checks (private, hence guarded)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def _fit(backend, slices, targets, params, config: DetectorConfig, callback) -> list[dict[str, float]]:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.steps, pct_start=0.15
    )
    history = []
    # the box refiner's gradients are clipped on their own: in one norm with the proposal head's they would scale
    # the head's steps down and change what it learns (tests/training/test_detector.py checks it does not)
    refiner = {id(p) for p in backend.refiner_parameters()}
    clip_groups = [
        g for g in ([p for p in params if id(p) not in refiner], [p for p in params if id(p) in refiner]) if g
    ]
    device = backend.model.device
    bf16 = config.bf16 and native_bf16(device)
    if config.bf16 and not bf16:
        logger.info("detector stage: no native bfloat16 on %s, training in float32", device)
    backend.train()
    order: list[int] = []
    for step in range(1, config.steps + 1):
        started = time.perf_counter()
        while len(order) < config.batch_size:
            order += rng.permutation(len(slices)).tolist()
        batch, order = order[: config.batch_size], order[config.batch_size :]
        augmented = [_augment(slices[i].image, targets[i], rng, config) for i in batch]
        site_mask = torch.tensor([not mirrored for _, _, mirrored in augmented])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = backend.detection_loss([a[0] for a in augmented], [a[1] for a in augmented], site_mask)
        loss = losses["centre"] + losses["box"] + 0.5 * (losses["label"] + losses["site"]) + 0.5 * losses["quality"]
        loss = loss + losses.get("refine", 0.0)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"detector loss became {float(loss)} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in clip_groups:
            torch.nn.utils.clip_grad_norm_(group, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        log = {"step": step, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}
        log["seconds"] = time.perf_counter() - started
        history.append(log)
        if callback is not None:
            callback(step, config.steps, log)
    return history


def copy_proposal_targets(backend, samples: Sequence[TrainingSample], *, min_iou: float = 0.5, batch_size: int = 32):
    """Grounding samples whose targets write the matching proposals' numbers, boxes in proposal order.

    A true box matched by a proposal with IoU >= ``min_iou`` is written as that proposal; an unmatched one keeps its
    own box. Other samples are returned unchanged; ``sample.boxes`` (the truth the metrics use) never changes.
    """
    grounding = [i for i, s in enumerate(samples) if s.task == "grounding" and s.boxes]
    out = list(samples)
    for start in range(0, len(grounding), batch_size):
        chunk = grounding[start : start + batch_size]
        proposed = backend.propose([samples[i].image for i in chunk])
        for i, proposals in zip(chunk, proposed, strict=True):
            sample = samples[i]
            written = _matched_boxes(sample.boxes, proposals, min_iou)
            reasoning, _, _ = split_answer(sample.target)
            target = prompts.grounding_target(reasoning, written, backend.box_codec.for_image(sample.image_size))
            out[i] = replace(sample, target=target)
    return out


def _matched_boxes(truth: Sequence[Box2D], proposals: Sequence[Box2D], min_iou: float) -> list[Box2D]:
    if not proposals:
        return list(truth)
    iou = np.atleast_2d(box_iou_2d(list(truth), list(proposals)))
    ranked: list[tuple[float, Box2D]] = []
    taken: set[int] = set()
    for t in np.argsort(-iou.max(axis=1)):  # best-matched true boxes choose first
        candidates = [(iou[t, p], p) for p in range(len(proposals)) if p not in taken and iou[t, p] >= min_iou]
        if candidates:
            _, p = max(candidates)
            taken.add(p)
            chosen = proposals[p]
            ranked.append((p, Box2D(chosen.x1, chosen.y1, chosen.x2, chosen.y2, label=truth[t].label)))
        else:
            ranked.append((math.inf, truth[t]))
    return [box for _, box in sorted(ranked, key=lambda pair: pair[0])]


__all__ = ["copy_proposal_targets", "detection_target", "train_detector", "unique_slices"]
