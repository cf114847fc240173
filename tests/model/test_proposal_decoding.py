"""Constrained box decoding: every box an answer writes is one of the proposals the LLM was shown."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from monailabel_evlf.model.proposal_decoding import ProposalBoxConstraint
from monailabel_evlf.model.tiny import NUMBER_TOKENS, build_tokenizer
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention

PROPOSALS = torch.tensor([[[10, 20, 13, 23], [10, 40, 30, 50]], [[5, 5, 9, 9], [60, 61, 70, 71]]])


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(())


def _constraint(tokenizer, rows_per_image: int = 1) -> tuple[ProposalBoxConstraint, list[int]]:
    numbers = tokenizer.convert_tokens_to_ids(list(NUMBER_TOKENS))
    return ProposalBoxConstraint(tokenizer, numbers, PROPOSALS, prompt_length=0, rows_per_image=rows_per_image), numbers


def _allowed_after(constraint, tokenizer, text: str, row: int = 0) -> set[int] | None:
    """The numbers left unmasked after ``text`` was generated in ``row`` (None: nothing masked)."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]] * (row + 1))
    scores = torch.zeros(row + 1, len(tokenizer))
    out = constraint(ids, scores.clone())[row]
    if torch.isfinite(out).all():
        return None
    return {n for n, token in enumerate(constraint.number_token_ids) if torch.isfinite(out[token])}


def test_each_number_of_a_box_is_chosen_among_the_proposals_consistent_with_the_numbers_written(tokenizer):
    constraint, _ = _constraint(tokenizer)
    start = '<think>round</think><answer>{"label": "cyst", "bbox_2d": ['
    assert _allowed_after(constraint, tokenizer, start) == {10}
    assert _allowed_after(constraint, tokenizer, start + "10, ") == {20, 40}
    assert _allowed_after(constraint, tokenizer, start + "10, 40, ") == {30}
    assert _allowed_after(constraint, tokenizer, start + "10, 40, 30, ") == {50}
    # outside a box (the reasoning, the label, after the fourth number, before the space) nothing is masked
    assert _allowed_after(constraint, tokenizer, "<think>a lesion of 10, ") is None
    assert _allowed_after(constraint, tokenizer, start + "10, 40, 30, 50") is None
    assert _allowed_after(constraint, tokenizer, start + "10,") is None
    second = start + '10, 20, 13, 23]}, {"label": "cyst", "bbox_2d": ['
    assert _allowed_after(constraint, tokenizer, second) == {10}  # every box of a list is constrained alike


def test_rows_map_to_their_image_with_several_samples_per_prompt(tokenizer):
    constraint, _ = _constraint(tokenizer, rows_per_image=2)
    start = '<answer>{"label": "cyst", "bbox_2d": ['
    assert _allowed_after(constraint, tokenizer, start, row=1) == {10}  # rows 0 and 1: image 0
    assert _allowed_after(constraint, tokenizer, start, row=3) == {5, 60}  # rows 2 and 3: image 1


class _BoxSkeleton:
    """Makes a random model write ``prefix`` then four numbers (any number tokens) separated by ``", "``, so that
    the box numbers are the only free choice left."""

    def __init__(self, prefix: list[int], separator: list[int], numbers: list[int], prompt_length: int) -> None:
        slots: list[list[int]] = [[i] for i in prefix]
        for n in range(4):
            slots += [numbers] + ([[i] for i in separator] if n < 3 else [])
        self.slots, self.prompt_length = slots, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.slots):
            keep = scores[:, self.slots[step]].clone()
            scores[:] = float("-inf")
            scores[:, self.slots[step]] = keep
        return scores


def test_a_proposal_model_only_writes_boxes_it_proposed(tmp_path):
    """A random tiny proposal model, made to write a box, samples its numbers: each box is exactly one of its
    proposals; with ``boxes_from_proposals`` off the same model writes other numbers too."""
    from transformers import LogitsProcessorList

    from monailabel_evlf.model.backends.evlf import EVLFBackend
    from monailabel_evlf.model.tiny import build_tiny_evlf

    build_tiny_evlf(tmp_path, image_size=32, hidden_size=32, num_layers=1, num_proposals=2, box_grid=48,
                    dense_channels=(4, 8, 8), dense_hidden_size=8, train_encoders=True)  # fmt: skip
    backend = EVLFBackend.from_pretrained(str(tmp_path))
    codec = backend.box_codec.for_image((48, 48))
    image = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    proposed = {(b.x1, b.y1, b.x2, b.y2) for b in backend.propose([image])[0]}
    inputs = backend.model_inputs([image], ["Where is the lesion?"])
    length = inputs["input_ids"].shape[1]
    encode = backend.tokenizer
    prefix = encode('<answer>{"label": "cyst", "bbox_2d": [', add_special_tokens=False)["input_ids"]
    separator = encode("1, 2", add_special_tokens=False)["input_ids"][1:-1]  # the tokens between two numbers
    skeleton = _BoxSkeleton(prefix, separator, backend.model.config.number_token_ids, length)

    def boxes(n: int = 16) -> list[tuple[float, ...]]:
        constraints = backend.decoding_constraints(inputs, n)
        torch.manual_seed(0)
        out = backend.model.generate(
            **inputs,
            logits_processor=LogitsProcessorList([skeleton, *constraints]),
            max_new_tokens=len(skeleton.slots),
            do_sample=True,
            top_k=0,
            num_return_sequences=n,
            pad_token_id=backend.tokenizer.pad_token_id,
        )
        texts = backend.tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
        numbers = [[int(v) for v in re.findall(r"\d+", t.split("[", 1)[1])[:4]] for t in texts]
        return [codec.to_pixels(row) for row in numbers if len(row) == 4]

    constrained = boxes()
    assert len(constrained) == 16 and set(constrained) <= proposed
    backend.model.config.boxes_from_proposals = False
    free = boxes()
    assert free and not set(free) <= proposed


def test_models_without_proposals_decode_freely(tmp_path):
    from monailabel_evlf.model.backends.evlf import EVLFBackend
    from monailabel_evlf.model.tiny import build_tiny_evlf

    build_tiny_evlf(tmp_path, image_size=32, hidden_size=32, num_layers=1)
    backend = EVLFBackend.from_pretrained(str(tmp_path))
    inputs = backend.model_inputs([np.zeros((32, 32, 3), np.uint8)], ["Where is the lesion?"])
    assert backend.decoding_constraints(inputs, 1) == []
    assert BoxCodec(BoxConvention.NORMALIZED_100) == backend.box_codec
