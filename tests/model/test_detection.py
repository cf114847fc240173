"""The detection pixel connector: proposal maps, decoding, the mirror, its loss and the proposal tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.model.detection import (
    DetectionTarget,
    box_numbers,
    decode_proposals,
    detection_loss,
    mirror_maps,
    split_maps,
)

SIDE, LABELS, SITES = 16, 3, 4
CHANNELS = 1 + 4 + LABELS + SITES + 1


def _maps_with_box(cx: float, cy: float, w: float, h: float, label: int = 1) -> torch.Tensor:
    """Head output (logits) whose single peak is at the cell holding (cx, cy) and whose every cell inside the
    box regresses the box centred at (cx, cy) cells, w x h cells."""
    maps = torch.full((1, CHANNELS, SIDE, SIDE), -8.0)
    ix, iy = int(cx), int(cy)
    maps[0, 0, iy, ix] = 8.0
    ys, xs = torch.meshgrid(torch.arange(SIDE) + 0.5, torch.arange(SIDE) + 0.5, indexing="ij")
    edges = torch.stack([xs - (cx - w / 2), ys - (cy - h / 2), (cx + w / 2) - xs, (cy + h / 2) - ys])
    maps[0, 1:5] = torch.log(edges.clamp(min=1e-3))
    maps[0, 5 + label, iy, ix] = 5.0
    return maps


def test_decode_recovers_the_encoded_box_and_label():
    maps = _maps_with_box(5.25, 9.5, 4.0, 2.0, label=2)
    proposals = decode_proposals(maps, torch.zeros(1, 8, SIDE, SIDE), 2, LABELS, SITES)
    expected = torch.tensor([3.25, 8.5, 7.25, 10.5]) / SIDE
    assert torch.allclose(proposals.boxes[0, 0], expected, atol=1e-4)
    assert int(proposals.label_probs[0, 0].argmax()) == 2
    assert proposals.scores[0, 0] > 0.99 and proposals.scores[0, 1] < 0.01


def test_mirror_maps_of_the_mirrored_image_decode_to_the_same_box():
    maps = _maps_with_box(5.25, 9.5, 4.0, 2.0)
    # the same box seen in the mirrored image: centre x -> SIDE - x
    seen_mirrored = _maps_with_box(SIDE - 5.25, 9.5, 4.0, 2.0)
    back = decode_proposals(mirror_maps(seen_mirrored), torch.zeros(1, 8, SIDE, SIDE), 1, LABELS, SITES)
    direct = decode_proposals(maps, torch.zeros(1, 8, SIDE, SIDE), 1, LABELS, SITES)
    assert torch.allclose(back.boxes, direct.boxes, atol=1e-4)


def test_box_numbers_round_and_keep_a_unit_width():
    numbers = box_numbers(torch.tensor([[0.101, 0.2, 0.104, 0.2], [0.0, 0.995, 1.0, 1.0]]))
    assert numbers.tolist() == [[10, 20, 11, 21], [0, 99, 100, 100]]
    on_pixels = box_numbers(torch.tensor([[10 / 96, 20.4 / 96, 13 / 96, 20.45 / 96], [0.0, 0.0, 1.0, 1.0]]), grid=96)
    assert on_pixels.tolist() == [[10, 20, 13, 21], [0, 0, 96, 96]]


def test_detection_loss_is_small_for_the_right_maps_and_large_for_wrong_ones():
    target = DetectionTarget(
        boxes=torch.tensor([[3.25, 8.5, 7.25, 10.5]]) / SIDE, labels=torch.tensor([2]), sites=torch.tensor([1])
    )
    right = _maps_with_box(5.25, 9.5, 4.0, 2.0, label=2)
    right[0, 5 + LABELS + 1, 9, 5] = 5.0  # site 1
    wrong = _maps_with_box(12.5, 2.5, 2.0, 2.0, label=0)
    good = detection_loss(right, [target], LABELS, SITES)
    bad = detection_loss(wrong, [target], LABELS, SITES)
    assert good["box"] < 0.05 and good["label"] < 0.05 and good["site"] < 0.05
    assert bad["centre"] > 10 * good["centre"] and bad["label"] > 1.0
    nothing = detection_loss(right, [DetectionTarget.empty()], LABELS, SITES)  # a lesion-free slice
    assert float(nothing["box"]) == 0.0 and nothing["centre"] > good["centre"]
    assert set(split_maps(right, LABELS, SITES)) == {"centre", "log_edges", "label", "site", "quality"}


@pytest.fixture(scope="module")
def proposal_backend(tmp_path_factory):
    from monailabel_evlf.model.backends.evlf import EVLFBackend
    from monailabel_evlf.model.tiny import build_tiny_evlf

    path = tmp_path_factory.mktemp("proposal-evlf")
    build_tiny_evlf(
        path,
        image_size=32,
        hidden_size=32,
        num_layers=1,
        num_proposals=2,
        dense_channels=(4, 8, 8),
        dense_hidden_size=8,
        train_encoders=True,
    )
    return EVLFBackend.from_pretrained(str(path))


def test_prompt_carries_region_and_number_tokens_and_numbers_are_the_proposals(proposal_backend):
    backend = proposal_backend
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:20, 30:40] = 200
    inputs = backend.model_inputs([image], ["Locate every abnormality."])
    config = backend.model.config
    ids = inputs["input_ids"][0]
    assert int((ids == config.region_token_id).sum()) == 2 and int((ids == config.coordinate_token_id).sum()) == 8
    proposals, _ = backend.model.model.propose(inputs["dense_pixel_values"])
    tokens = backend.model.model.pixel_tokens(inputs["dense_pixel_values"])  # (1, 10, D)
    embed = backend.model.get_input_embeddings().weight
    first_numbers = box_numbers(proposals.boxes)[0, 0]
    for slot, number in zip(range(1, 5), first_numbers.tolist(), strict=True):
        assert torch.equal(tokens[0, slot], embed[config.number_token_ids[number]])
    boxes = backend.propose([image])[0]
    assert len(boxes) == 2 and all(isinstance(b, Box2D) for b in boxes)
    assert boxes[0].x1 == pytest.approx(first_numbers[0].item() * 60 / 100)
    assert boxes[0].y2 == pytest.approx(first_numbers[3].item() * 40 / 100)
    assert boxes[0].label in config.finding_labels and 0.0 <= boxes[0].score <= 1.0


def test_a_pixel_grid_model_reads_and_writes_the_slices_own_pixel_edges(tmp_path):
    """``box_grid`` = the slice size: proposals and answers are whole pixels, so a 3-pixel lesion on pixel edges
    is written exactly (on the 0..100 grid the same box comes back as [9.6, 19.2, 13.44, 23.04])."""
    from monailabel_evlf.model.backends.evlf import EVLFBackend
    from monailabel_evlf.model.tiny import build_tiny_evlf
    from monailabel_evlf.tasks.box_codec import BoxConvention
    from monailabel_evlf.tasks.parsing import parse_answer
    from monailabel_evlf.tasks.prompts import grounding_target

    build_tiny_evlf(tmp_path, image_size=32, hidden_size=32, num_layers=1, num_proposals=2, box_grid=48,
                    dense_channels=(4, 8, 8), dense_hidden_size=8, train_encoders=True)  # fmt: skip
    backend = EVLFBackend.from_pretrained(str(tmp_path))
    assert backend.box_codec.convention is BoxConvention.ABSOLUTE_MODEL_INPUT
    codec = backend.box_codec.for_image((48, 48))
    truth = Box2D(10.0, 20.0, 13.0, 23.0, "cyst")
    written = parse_answer(grounding_target("round, in the liver", [truth], codec), codec).boxes[0]
    assert (written.x1, written.y1, written.x2, written.y2) == (10.0, 20.0, 13.0, 23.0)
    image = np.zeros((48, 48, 3), np.uint8)
    for box in backend.propose([image])[0]:
        assert all(float(v).is_integer() for v in (box.x1, box.y1, box.x2, box.y2))
    with pytest.raises(ValueError, match="box_grid"):
        build_tiny_evlf(None, image_size=32, hidden_size=32, num_layers=1, num_proposals=2, box_grid=101)


def test_generation_never_writes_placeholders(proposal_backend):
    config = proposal_backend.model.config
    assert {config.region_token_id, config.coordinate_token_id} <= set(proposal_backend.suppressed_token_ids())


def test_proposal_model_round_trips_through_save_pretrained(proposal_backend, tmp_path):
    from monailabel_evlf.model.modeling_evlf import EVLFForConditionalGeneration

    merged = proposal_backend.peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    loaded = EVLFForConditionalGeneration.from_pretrained(tmp_path).eval()
    dense = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a, _ = merged.model.propose(dense)
        b, _ = loaded.model.propose(dense)
    assert torch.allclose(a.boxes, b.boxes) and loaded.config.num_proposals == 2


def test_frozen_detector_cache_gives_the_same_tokens_and_refuses_a_trainable_detector(proposal_backend):
    model = proposal_backend.model.model
    dense = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        direct = model.pixel_tokens(dense)
    with pytest.raises(ValueError, match="trainable"), model.frozen_detector():
        pass
    trainable = [p for p in proposal_backend.detector_parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.no_grad(), model.frozen_detector():
            first = model.pixel_tokens(dense[:2])
            cached = model.pixel_tokens(dense)  # two rows from the cache, one new
        assert torch.allclose(cached, direct, atol=1e-6) and torch.allclose(first, direct[:2], atol=1e-6)
    finally:
        for p in trainable:
            p.requires_grad_(True)


def test_every_cell_inside_a_box_regresses_it_and_each_box_counts_once():
    big = torch.tensor([[2.0, 2.0, 12.0, 12.0]]) / SIDE  # 10 x 10 cells
    target = DetectionTarget(boxes=big, labels=torch.tensor([0]), sites=torch.tensor([0]))
    right = _maps_with_box(7.0, 7.0, 10.0, 10.0, label=0)
    centre_only = right.clone()
    inside = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    inside[2:12, 2:12] = True
    inside[7, 7] = False  # the centre cell stays right
    centre_only[0, 1:5][:, inside] = 0.0  # every other cell inside predicts a 2 x 2 cell box around itself
    right_loss = detection_loss(right, [target], LABELS, SITES)["box"]
    wrong_loss = detection_loss(centre_only, [target], LABELS, SITES)["box"]
    assert right_loss < 0.05 < 0.5 < wrong_loss
    # a second, identical image doubles neither term: the box loss is a mean over boxes
    pair = detection_loss(torch.cat([right, right]), [target, target], LABELS, SITES)["box"]
    assert float(pair) == pytest.approx(float(right_loss), abs=1e-5)


def _squares(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` 32 px noisy images, each with one bright square 2-6 px a side at a random place, and its box."""
    images = torch.rand(count, 3, 32, 32, generator=generator) * 0.3
    boxes = torch.zeros(count, 4)
    for n in range(count):
        side = int(torch.randint(2, 7, (1,), generator=generator))
        x, y = (int(v) for v in torch.randint(4, 32 - side - 4, (2,), generator=generator))
        images[n, :, y : y + side, x : x + side] += 0.7
        boxes[n] = torch.tensor([x, y, x + side, y + side]) / 32
    return images, boxes


def test_an_untrained_refiner_keeps_the_boxes_and_a_trained_one_finds_the_edges():
    """Zero-initialised last layer: the refiner starts as the identity. Trained on jittered true boxes of bright
    squares 2-6 px wide, it moves held-out jittered starts onto the squares' edges (mean IoU well above the start's)."""
    from torchvision.ops import box_iou

    from monailabel_evlf.model.detection import BoxRefiner, refinement_loss, refinement_pairs

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    refiner = BoxRefiner(3)
    torch.nn.init.zeros_(refiner.out[-1].weight)  # what the model's weight init does (zero_init)
    torch.nn.init.zeros_(refiner.out[-1].bias)
    images, truth = _squares(64, generator)
    starts = truth + torch.randn(64, 4, generator=generator) * 0.02
    starts = torch.cat([torch.minimum(starts[:, :2], starts[:, 2:]), torch.maximum(starts[:, :2], starts[:, 2:])], 1)
    with torch.no_grad():
        assert torch.allclose(refiner(images, starts.unsqueeze(1)).squeeze(1), starts.clamp(0, 1))
    optimizer = torch.optim.AdamW(refiner.parameters(), lr=2e-3)
    for _ in range(300):
        batch, boxes = _squares(32, generator)
        targets = [DetectionTarget(b.unsqueeze(0), torch.tensor([0]), torch.tensor([0])) for b in boxes]
        pair_starts, pair_truth = refinement_pairs(boxes.unsqueeze(1), targets)
        loss = refinement_loss(refiner(batch, pair_starts), pair_truth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        refined = refiner(images, starts.unsqueeze(1)).squeeze(1)
    before, after = box_iou(starts, truth).diagonal().mean(), box_iou(refined, truth).diagonal().mean()
    assert after > before + 0.1, (float(before), float(after))


def test_refinement_pairs_take_overlapping_proposals_and_jittered_truth_and_pad_lesion_free_images():
    from monailabel_evlf.model.detection import refinement_loss, refinement_pairs

    truth = torch.tensor([[0.2, 0.2, 0.4, 0.4]])
    proposals = torch.tensor(
        [[[0.21, 0.2, 0.4, 0.41], [0.7, 0.7, 0.8, 0.8]], [[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.6, 0.6]]]
    )
    targets = [DetectionTarget(truth, torch.tensor([0]), torch.tensor([0])), DetectionTarget.empty()]
    starts, ends = refinement_pairs(proposals, targets, jitter=(0.0, 0.0))
    assert starts.shape == (2, 2, 4)  # image 0: the overlapping proposal and the true box; image 1: padding
    assert torch.allclose(starts[0], torch.stack([proposals[0, 0], truth[0]]))
    assert torch.allclose(ends[0], truth.repeat(2, 1)) and not ends[1].any()
    assert float(refinement_loss(ends, ends)) == pytest.approx(0.0, abs=1e-5)  # padding rows are left out
    real = refinement_loss(starts[:1], ends[:1])
    assert float(real) > 0.0 and torch.allclose(refinement_loss(starts, ends), real)


def test_a_model_with_a_box_refiner_trains_it_with_the_detector_and_serves_its_boxes(tmp_path):
    from monailabel_evlf.model.backends.evlf import EVLFBackend
    from monailabel_evlf.model.modeling_evlf import EVLFForConditionalGeneration
    from monailabel_evlf.model.tiny import build_tiny_evlf

    tiny = {"image_size": 32, "hidden_size": 32, "num_layers": 1, "dense_channels": (4, 8, 8), "dense_hidden_size": 8}
    build_tiny_evlf(tmp_path / "m", num_proposals=2, refine_proposals=True, train_encoders=True, **tiny)
    backend = EVLFBackend.from_pretrained(str(tmp_path / "m"))
    model = backend.model.model
    refiner_params = {id(p) for p in model.box_refiner.parameters()}
    assert refiner_params & {id(p) for p in backend.detector_parameters()}
    image = np.zeros((32, 32, 3), np.uint8)
    image[10:14, 20:23] = 220
    target = DetectionTarget(torch.tensor([[20, 10, 23, 14]]) / 32.0, torch.tensor([0]), torch.tensor([0]))
    losses = backend.detection_loss([image], [target])
    assert "refine" in losses and float(losses["refine"]) > 0
    losses["refine"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.box_refiner.parameters())
    dense = backend._dense([image])
    with torch.no_grad():
        refiner = model.box_refiner
        model.box_refiner = None
        plain = model._proposals(dense)
        model.box_refiner = refiner
        assert torch.allclose(model._proposals(dense).boxes, plain.boxes)  # zero-initialised: the identity
        for p in refiner.parameters():  # a refiner that moves the boxes: the proposals the LLM sees move with it
            p.add_(torch.randn_like(p) * 0.05)
        refined, _ = model.propose(dense)
    assert not torch.allclose(refined.boxes, plain.boxes)
    assert torch.allclose(refined.boxes, refiner(dense, plain.boxes), atol=1e-6)
    merged = backend.peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "saved")
    loaded = EVLFForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        again, _ = loaded.model.propose(dense)
    assert loaded.config.refine_proposals and torch.allclose(again.boxes, refined.boxes, atol=1e-6)
