"""The detector stage learns where bright squares are, and copy targets write the proposals' own numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monailabel_evlf.imaging.geometry import Box2D, box_iou_2d
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention
from monailabel_evlf.tasks.parsing import parse_answer
from monailabel_evlf.tasks.prompts import grounding_prompt, grounding_target
from monailabel_evlf.training.config import DetectorConfig
from monailabel_evlf.training.detector import (
    copy_proposal_targets,
    detection_target,
    native_bf16,
    train_detector,
    unique_slices,
)
from monailabel_evlf.training.samples import TrainingSample

NATIVE = BoxCodec(BoxConvention.NORMALIZED_100)


def _square_samples(n: int, seed: int) -> list[TrainingSample]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        image = np.full((32, 32, 3), 30, np.uint8)
        x, y = (int(v) for v in rng.integers(2, 22, size=2))
        image[y : y + 8, x : x + 8] = 220
        box = Box2D(x, y, x + 8, y + 8, label="cyst")
        target = grounding_target("Cyst.", [box], NATIVE.for_image((32, 32)))
        samples.append(
            TrainingSample(
                image=image,
                prompt=grounding_prompt("CT", None, NATIVE),
                target=target,
                task="grounding",
                boxes=[box],
                source={"study_id": f"s{i}", "axis": 2, "index": 0, "box_sites": ["liver"]},
            )
        )
    return samples


@pytest.fixture()
def backend(tmp_path):
    from monailabel_evlf.model.backends.evlf import EVLFBackend
    from monailabel_evlf.model.tiny import build_tiny_evlf

    build_tiny_evlf(
        tmp_path,
        image_size=32,
        hidden_size=32,
        num_layers=1,
        num_proposals=2,
        dense_channels=(8, 16, 16),
        dense_hidden_size=16,
        train_encoders=True,
    )
    return EVLFBackend.from_pretrained(str(tmp_path))


def _top_iou(backend, samples) -> float:
    proposals = backend.propose([s.image for s in samples])
    return float(np.mean([box_iou_2d(p[0], s.boxes[0]) for p, s in zip(proposals, samples, strict=True)]))


def test_detector_stage_learns_to_propose_the_square(backend):
    train = _square_samples(24, seed=0)
    held_out = _square_samples(8, seed=1)
    before = _top_iou(backend, held_out)
    lm_weights = [p.detach().clone() for n, p in backend.peft_model.named_parameters() if "language_model" in n]
    history = train_detector(backend, train, DetectorConfig(steps=80, batch_size=8, learning_rate=5e-3, seed=0))
    after = _top_iou(backend, held_out)
    assert history[-1]["loss"] < history[0]["loss"] / 3
    assert after > 0.5 and after > before + 0.3
    lm_after = [p for n, p in backend.peft_model.named_parameters() if "language_model" in n]
    assert all(np.array_equal(a.numpy(), b.detach().numpy()) for a, b in zip(lm_weights, lm_after, strict=True))


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="this CPU has no native bfloat16")
def test_bf16_detector_loss_matches_float32_and_still_learns(backend):
    samples = _square_samples(8, seed=3)
    targets = [detection_target(s, ["cyst"], ["liver"]) for s in samples]
    images = [s.image for s in samples]
    full = backend.detection_loss(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = backend.detection_loss(images, targets)
    for name, value in full.items():  # bf16 keeps about 3 significant digits through a small conv net
        assert half[name].dtype == torch.float32
        assert float(half[name]) == pytest.approx(float(value), rel=0.05, abs=1e-3), name
    held_out = _square_samples(8, seed=1)
    train_detector(
        backend, _square_samples(24, seed=0), DetectorConfig(steps=80, batch_size=8, learning_rate=5e-3, bf16=True)
    )
    assert _top_iou(backend, held_out) > 0.5


def test_copy_targets_write_the_matching_proposal(backend):
    samples = _square_samples(4, seed=2)
    train_detector(backend, samples * 6, DetectorConfig(steps=60, batch_size=8, learning_rate=5e-3, seed=0))
    copied = copy_proposal_targets(backend, samples, min_iou=0.3)
    proposals = backend.propose([s.image for s in samples])
    for before, after, props in zip(samples, copied, proposals, strict=True):
        assert after.boxes == before.boxes  # the truth the metrics use is unchanged
        written = parse_answer(after.target, backend.box_codec.for_image((32, 32))).boxes[0]
        best = max(props, key=lambda p: box_iou_2d(p, before.boxes[0]))
        if box_iou_2d(best, before.boxes[0]) >= 0.3:
            assert np.allclose(written.as_array(), best.as_array(), atol=1e-6)
        else:
            assert np.allclose(written.as_array(), before.boxes[0].as_array(), atol=0.33)
        assert json.loads(after.target.split("<answer>")[1].split("</answer>")[0])["label"] == "cyst"


def test_unique_slices_keeps_one_sample_per_slice_with_every_box():
    samples = _square_samples(3, seed=3)
    twin = TrainingSample(
        image=samples[0].image, prompt="p", target="t", task="diagnosis", boxes=[], source=dict(samples[0].source)
    )
    kept = unique_slices([twin, *samples])
    assert len(kept) == 3 and all(s.boxes for s in kept)


def test_detector_stage_refuses_a_grid_model(tmp_path):
    from monailabel_evlf.model.backends.evlf import EVLFBackend
    from monailabel_evlf.model.tiny import build_tiny_evlf

    build_tiny_evlf(tmp_path, image_size=32, hidden_size=32, num_layers=1, pixel_pool=1)
    with pytest.raises(ValueError, match="detection connector"):
        train_detector(EVLFBackend.from_pretrained(str(tmp_path)), _square_samples(2, 0), DetectorConfig(steps=1))


def test_translation_moves_boxes_with_the_image_and_keeps_them_inside():
    import torch

    from monailabel_evlf.model.detection import DetectionTarget
    from monailabel_evlf.training.detector import _translate

    image = np.zeros((20, 20, 3), np.float32)
    image[5:8, 10:14] = 1.0
    target = DetectionTarget(torch.tensor([[10 / 20, 5 / 20, 14 / 20, 8 / 20]]), torch.tensor([0]), torch.tensor([0]))
    shifts = set()
    for seed in range(40):
        moved, shifted = _translate(image, target, np.random.default_rng(seed), 0.3)
        ys, xs = np.nonzero(moved[..., 0])
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == (shifted.boxes[0] * 20).round().int().tolist()
        shifts.add((int(xs.min()), int(ys.min())))
    assert len(shifts) > 10  # it really moves


def test_a_box_refiner_trains_beside_the_detector_without_changing_what_the_detector_learns(tmp_path):
    """Same seed, same samples: the pixel encoder and proposal head come out the same with and without a refiner
    (its gradients are clipped on their own), and the refiner itself moved."""
    from monailabel_evlf.model.backends.evlf import EVLFBackend
    from monailabel_evlf.model.tiny import build_tiny_evlf

    trained = {}
    for refine in (False, True):
        folder = tmp_path / str(refine)
        build_tiny_evlf(folder, image_size=32, hidden_size=32, num_layers=1, num_proposals=2, refine_proposals=refine,
                        dense_channels=(8, 16, 16), dense_hidden_size=16, train_encoders=True)  # fmt: skip
        backend = EVLFBackend.from_pretrained(str(folder))
        refiner_before = [p.detach().clone() for p in backend.refiner_parameters()]
        config = DetectorConfig(steps=6, batch_size=8, learning_rate=5e-3, max_grad_norm=0.5, seed=0)
        train_detector(backend, _square_samples(16, seed=0), config)
        refiner_ids = {id(p) for p in backend.refiner_parameters()}
        trained[refine] = [p.detach().clone() for p in backend.detector_parameters() if id(p) not in refiner_ids]
        assert bool(refiner_before) == refine
        assert all(not torch.equal(a, b) for a, b in zip(refiner_before, backend.refiner_parameters(), strict=True))
    assert len(trained[False]) == len(trained[True])
    for plain, beside in zip(trained[False], trained[True], strict=True):
        torch.testing.assert_close(plain, beside, rtol=1e-4, atol=1e-5)


def test_the_stages_after_the_detector_train_on_its_proposals_without_moving_it(tmp_path):
    """finetune_adapter: SFT after the detector stage leaves the detector (encoder, head, refiner) as that stage made
    it and trains the rest; afterwards the detector's weights are trainable again."""
    from monailabel_evlf.model.backends.evlf import EVLFBackend
    from monailabel_evlf.model.tiny import build_tiny_evlf
    from monailabel_evlf.training.adapters import AdapterRegistry
    from monailabel_evlf.training.config import SFTConfig
    from monailabel_evlf.training.finetune import DetectorStage, SFTStage, finetune_adapter

    build_tiny_evlf(tmp_path / "model", image_size=32, hidden_size=32, num_layers=1, num_proposals=2,
                    refine_proposals=True, dense_channels=(8, 16, 16), dense_hidden_size=16,
                    train_encoders=True)  # fmt: skip
    backend = EVLFBackend.from_pretrained(str(tmp_path / "model"))
    seen = {}

    class RecordingDetectorStage(DetectorStage):
        def run(self, backend, samples, callback):
            result = super().run(backend, samples, callback)
            detector = {id(p) for p in backend.detector_parameters()}
            seen["detector"] = [p.detach().clone() for p in backend.detector_parameters()]
            others = [p for p in backend.trainable_parameters() if id(p) not in detector]
            seen["others"] = {id(p): p.detach().clone() for p in others}
            return result

    class RecordingSFTStage(SFTStage):
        def run(self, backend, samples, callback):
            seen["detector trainable during SFT"] = any(p.requires_grad for p in backend.detector_parameters())
            return super().run(backend, samples, callback)

    stages = [
        RecordingDetectorStage(DetectorConfig(steps=10, batch_size=8, learning_rate=5e-3, seed=0)),
        RecordingSFTStage(SFTConfig(epochs=1, batch_size=8, learning_rate=1e-3, seed=0)),
    ]
    samples = _square_samples(16, seed=0)
    finetune_adapter(backend, samples, _square_samples(4, seed=1), AdapterRegistry(tmp_path / "adapters", "m"), stages)

    assert seen["detector trainable during SFT"] is False
    detector = backend.detector_parameters()
    assert backend.refiner_parameters() and all(p.requires_grad for p in detector)
    for before, after in zip(seen["detector"], detector, strict=True):
        assert torch.equal(before, after)
    others = [p for p in backend.peft_model.parameters() if id(p) in seen["others"]]
    assert others and any(not torch.equal(seen["others"][id(p)], p) for p in others)  # the rest did train
