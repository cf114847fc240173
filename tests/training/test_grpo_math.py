"""GRPO terms against hand-computed values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monailabel_evlf.training.grpo_math import group_advantages, grpo_loss, kl_k3, masked_mean


def test_group_advantages_hand_computed():
    # group 1: [1, 0, 0, 1] mean 0.5, unbiased std sqrt(1/3); group 2: constant -> all zero
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3]), group_size=4)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert adv[:4].tolist() == pytest.approx([expected, -expected, -expected, expected], abs=1e-6)
    assert adv[4:].tolist() == pytest.approx([0.0] * 4, abs=1e-7)


def test_group_advantages_unscaled_is_centered():
    adv = group_advantages(torch.tensor([0.9, 0.1, 0.5]), group_size=3, scale=False)
    assert adv.tolist() == pytest.approx([0.4, -0.4, 0.0], abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=8, max_size=8))
def test_group_advantages_zero_mean_per_group(values):
    adv = group_advantages(torch.tensor(values, dtype=torch.float64), group_size=4)
    assert abs(float(adv[:4].sum())) < 1e-6 and abs(float(adv[4:].sum())) < 1e-6


@pytest.mark.parametrize("group_size", [1, 3])
def test_group_advantages_rejects_bad_groups(group_size):
    with pytest.raises(ValueError, match="groups"):
        group_advantages(torch.zeros(8), group_size=group_size)


def test_kl_k3_hand_computed():
    logp = torch.tensor([math.log(0.5), math.log(0.25)])
    ref = torch.tensor([math.log(0.5), math.log(0.5)])
    # delta = log(2): exp(delta) - delta - 1 = 2 - ln 2 - 1
    assert kl_k3(logp, ref).tolist() == pytest.approx([0.0, 1 - math.log(2)], abs=1e-6)


def test_masked_mean_ignores_padding_and_empty_rows():
    values = torch.tensor([[1.0, 3.0, 100.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(values, mask, dim=1).tolist() == [2.0, 0.0]
    assert float(masked_mean(values, mask)) == 2.0


def test_clipped_ratio_hand_computed():
    # one token per sequence; ratio = 1.5 with positive advantage is clipped at 1.2;
    # ratio 0.5 with negative advantage: min(0.5*-1, 0.8*-1) = -0.8 -> loss 0.8 (clipped)
    old = torch.zeros(2, 1)
    new = torch.log(torch.tensor([[1.5], [0.5]]))
    out = grpo_loss(new, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), epsilon=0.2)
    assert float(out.loss) == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    assert out.clip_fraction == pytest.approx(1.0)


def test_unclipped_gradient_is_advantage_weighted():
    logp = torch.zeros(1, 2, requires_grad=True)
    out = grpo_loss(logp, logp.detach(), torch.tensor([2.0]), torch.tensor([[1, 0]]), epsilon=0.2)
    out.loss.backward()
    # d/dlogp of -(exp(logp - old) * A) at ratio 1 = -A on the unmasked token, 0 on padding
    assert logp.grad.tolist() == [[-2.0, 0.0]]


def test_kl_term_added_with_beta():
    logp = torch.tensor([[math.log(0.25)]])
    ref = torch.tensor([[math.log(0.5)]])
    out = grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), beta=0.1, ref_logprobs=ref)
    assert float(out.loss) == pytest.approx(0.1 * (1 - math.log(2)), abs=1e-6)
    assert out.kl == pytest.approx(1 - math.log(2), abs=1e-6)


def test_loss_types_differ_on_ragged_masks():
    logp = torch.zeros(2, 3)
    per_seq_adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    grpo = grpo_loss(logp, logp, per_seq_adv, mask, loss_type="grpo").loss
    bnpo = grpo_loss(logp, logp, per_seq_adv, mask, loss_type="bnpo").loss
    assert float(grpo) == pytest.approx(0.0)  # (-1 + 1) / 2
    assert float(bnpo) == pytest.approx((-1 + 3) / 4)


def test_grpo_loss_validates_inputs():
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), loss_type="x")
