"""DPO, iterative DPO and APO (ALGORITHMS.md §4): the reference maths, pair construction, the loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from rlpost.algorithms import dpo
from rlpost.objectives.dpo import build_pairs


def test_extrapolated_reference_and_round_start_loss_of_the_spec():
    """§4.8: beta 0.1, alpha 0.3, latest (-10, -12), previous (-11, -11.5)."""
    latest, previous = torch.tensor([-10.0, -12.0], dtype=torch.float64), torch.tensor([-11.0, -11.5], dtype=torch.float64)
    ref = dpo.extrapolated_reference(latest, previous, alpha=0.3)
    assert ref.tolist() == pytest.approx([-9.7, -12.15], abs=1e-12)
    z = 0.1 * dpo.preference_margin(latest[:1], latest[1:], ref[:1], ref[1:])
    assert float(z) == pytest.approx(-0.045, abs=1e-12)
    assert float(dpo.dpo_loss(latest[:1], latest[1:], ref[:1], ref[1:], beta=0.1)) == pytest.approx(0.715900, abs=1e-6)
    same = dpo.extrapolated_reference(latest, previous, alpha=0.0)  # iterative DPO: the latest policy itself
    assert float(dpo.dpo_loss(latest[:1], latest[1:], same[:1], same[1:], beta=0.1)) == pytest.approx(math.log(2), abs=1e-12)
    assert torch.equal(dpo.extrapolated_reference(latest, None, alpha=0.3), latest)  # round 1: pi_0


def test_extrapolating_logits_is_not_extrapolating_log_probs():
    """§4.8: one position, z_t = [2, 0], z_(t-1) = [1, 0], alpha 0.3."""
    z_t, z_prev = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    from_logits = torch.log_softmax(1.3 * z_t - 0.3 * z_prev, -1)
    from_logps = dpo.extrapolated_reference(torch.log_softmax(z_t, -1), torch.log_softmax(z_prev, -1), 0.3)
    assert from_logits.tolist() == pytest.approx([-0.095545, -2.395545], abs=1e-6)
    assert from_logps.tolist() == pytest.approx([-0.071028, -2.371028], abs=1e-6)
    assert (from_logits - from_logps).tolist() == pytest.approx([-0.024518, -0.024518], abs=1e-6)


def test_dpo_loss_against_the_softplus_form():
    """trl 1.16 computes DPO inside DPOTrainer._compute_loss (no standalone function to call), as
    -logsigmoid(beta * delta); check ours against the algebraically equal softplus(-beta * delta) on
    random sequence log-probs, value and gradient."""
    g = torch.Generator().manual_seed(0)
    x = [(-20 * torch.rand(64, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    ours = dpo.dpo_loss(*x, beta=0.1)
    theirs = F.softplus(-0.1 * ((x[0] - x[2]) - (x[1] - x[3]))).mean()
    assert float(ours) == pytest.approx(float(theirs), rel=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-12) for a, b in zip(torch.autograd.grad(ours, x), torch.autograd.grad(theirs, x)))


@pytest.mark.parametrize("correct,k,expected", [
    ([True, True, True], 2, []),                                   # all correct: a tie, no pair
    ([False, False], 2, []),                                       # all wrong
    ([True, False, False, True], 2, [(0, 1), (3, 2)]),             # distinct members first
    ([True, False, False, True], 9, [(0, 1), (3, 2), (0, 2), (3, 1)]),  # then the rest of the product, once each
    ([True, False, False], 5, [(0, 1), (0, 2)]),                   # ragged: at most #correct x #wrong
    ([False, True], 1, [(1, 0)]),
])
def test_pairs_inside_a_group(correct, k, expected):
    assert build_pairs(correct, k) == expected
