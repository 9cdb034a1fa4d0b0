"""GRPO maths against the hand-derived numbers of ALGORITHMS.md §1.7."""
import pytest
import torch

from rlpost.algorithms import grpo


def approx(values, tol=1e-6):
    """The spec's values have <= 6 decimals (rounding <= 5e-7); float32 adds ~1e-7. (1e-4 would let
    an eps-inside-the-sqrt variant pass: sqrt(1/3 + 1e-4) gives 0.865896 for 0.865875.)"""
    return pytest.approx(values, abs=tol)


def test_group_advantages_match_spec():
    a = grpo.group_advantages(torch.tensor([1.0, 0, 0, 1]), [4])
    assert a.tolist() == approx([0.865875, -0.865875, -0.865875, 0.865875])
    a = grpo.group_advantages(torch.tensor([1.0, 0, 0, 0]), [4])
    assert a.tolist() == approx([1.4997, -0.4999, -0.4999, -0.4999])
    assert grpo.group_advantages(torch.ones(4), [4]).tolist() == [0, 0, 0, 0]


def test_advantage_scales_and_ragged_groups():
    rewards = torch.tensor([1.0, 0, 0, 1, 1.0, 0, 0])
    ragged = grpo.group_advantages(rewards, [4, 3])
    assert ragged[:4].tolist() == approx(grpo.group_advantages(rewards[:4], [4]).tolist())
    assert ragged[4:].tolist() == approx(grpo.group_advantages(rewards[4:], [3]).tolist())
    none = grpo.group_advantages(rewards, [4, 3], "none")
    assert none.tolist() == approx([0.5, -0.5, -0.5, 0.5, 2 / 3, -1 / 3, -1 / 3])
    batch = grpo.group_advantages(rewards, [4, 3], "batch")
    # one std over all 7 rewards: mean 3/7, unbiased variance (12/7) / 6 = 2/7, std 0.534522;
    # per-group centred rewards / (0.534522 + 1e-4), by hand
    assert batch.tolist() == approx([0.935239, -0.935239, -0.935239, 0.935239, 1.246986, -0.623493, -0.623493])
    with pytest.raises(ValueError, match=">= 2"):
        grpo.group_advantages(torch.tensor([1.0, 0, 1]), [2, 1])


def test_informative_groups():
    assert grpo.informative_groups(torch.tensor([1.0, 1, 0, 1, 0, 0]), [2, 2, 2]) == [False, True, False]


@pytest.mark.parametrize("ratio,adv,eps_high,expected", [
    (1.3, 1.0, 0.2, -1.2), (1.3, 1.0, 0.28, -1.28), (0.7, -1.0, 0.28, 0.8), (0.7, -1.0, 0.2, 0.8),
    (0.7, 1.0, 0.28, -0.7), (1.3, -1.0, 0.28, 1.3)])
def test_clipped_surrogate(ratio, adv, eps_high, expected):
    loss = grpo.clipped_surrogate(torch.tensor([ratio]), torch.tensor([adv]), 0.2, eps_high)
    assert loss.item() == pytest.approx(expected)


def test_k3_value_and_gradient():
    logp = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    kl = grpo.k3_kl(logp, torch.tensor([-1.5], dtype=torch.float64))
    kl.sum().backward()
    assert kl.item() == pytest.approx(0.106531, abs=1e-6)
    assert logp.grad.item() == pytest.approx(0.393469, abs=1e-6)


def _losses():
    mb1 = torch.tensor([[1.0, 3, 0, 0], [1, 1, 1, 1]])
    m1 = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    mb2 = torch.tensor([[4.0, 4]])
    m2 = torch.ones(1, 2)
    return (mb1, m1), (mb2, m2)


def test_aggregation_one_micro_batch():
    (l1, m1), _ = _losses()
    assert grpo.aggregate(l1, m1, "grpo").item() == pytest.approx(1.5)
    assert grpo.aggregate(l1, m1, "bnpo").item() == pytest.approx(1.333333, abs=1e-6)
    assert grpo.aggregate(l1, m1, "dapo", global_tokens=6).item() == pytest.approx(1.333333, abs=1e-6)
    assert grpo.aggregate(l1, m1, "dr_grpo", max_completion_length=8).item() == pytest.approx(0.5)


def test_aggregation_two_micro_batches():
    (l1, m1), (l2, m2) = _losses()

    def total(mode, **kw):
        return sum(grpo.aggregate(l, m, mode, grad_accum_steps=2, **kw).item() for l, m in ((l1, m1), (l2, m2)))

    assert total("grpo") == pytest.approx(2.75)
    assert total("bnpo") == pytest.approx(2.666667, abs=1e-6)
    assert total("dr_grpo", max_completion_length=8) == pytest.approx(0.75)
    assert total("dapo", global_tokens=8) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="global_tokens"):
        grpo.aggregate(l1, m1, "dapo")


def test_gspo_sequence_ratio():
    log_ratio = torch.tensor([[0.1, -0.3, 0.5]])
    rho = grpo.importance_ratio(log_ratio, torch.zeros(1, 3), torch.ones(1, 3), "sequence")
    assert rho[0].tolist() == approx([1.105171] * 3, 1e-6)


def test_overlong_penalty():
    from rewards.outcome import overlong_penalty
    lengths = torch.tensor([16384, 18000, 20480, 20481])
    assert overlong_penalty(lengths, 20480, 4096).tolist() == approx([0.0, -0.394531, -1.0, -1.0], 1e-6)


def test_ratio_of_one_still_has_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = grpo.grpo_token_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    assert loss.detach().tolist() == [[-1.0, -1.0]]
    assert logp.grad.tolist() == [[-1.0, -1.0]]


def test_dapo_invariant_to_micro_batch_split():
    """Same batch, 1, 2 or 3 micro-batches: identical dapo loss and gradient (N_glob known up front)."""
    torch.manual_seed(0)
    logp0 = torch.randn(6, 5, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).double()
    adv = torch.randn(6, dtype=torch.float64)
    ref = logp0 - 0.1 * torch.rand(6, 5, dtype=torch.float64)
    n_glob = mask.sum().item()
    results = []
    for splits in ([6], [3, 3], [1, 2, 3]):
        logp = logp0.clone().requires_grad_(True)
        total = 0.0
        for rows in torch.split(torch.arange(6), splits):
            lp = logp[rows] * 1.0
            tok, _ = grpo.grpo_token_loss(lp, lp.detach() - 0.05, adv[rows], mask[rows], eps_low=0.2,
                                          eps_high=0.28, beta=0.04, logp_ref=ref[rows])
            loss = grpo.aggregate(tok, mask[rows], "dapo", global_tokens=n_glob)
            loss.backward()
            total += loss.item()
        results.append((total, logp.grad.clone()))
    for total, grad in results[1:]:
        assert total == pytest.approx(results[0][0], rel=1e-12)
        assert torch.allclose(grad, results[0][1], rtol=1e-12, atol=1e-15)


def test_truncated_importance_weight_scales_the_policy_gradient_only():
    """off_policy=tis (§2.4, as slime applies it): w * surrogate + beta * k3, the KL keeps weight 1.
    Hand computation, ratio 1, A = 1, beta = 0.1, d = ref - logp = (-0.5, 1.0), w = (2, 0.5):
    loss = -w + 0.1 (e^d - d - 1) = (-1.989347, -0.428172);
    d loss / d logp = -w + 0.1 (1 - e^d) = (-1.960653, -0.671828)."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = grpo.grpo_token_loss(logp, logp.detach(), torch.tensor([1.0], dtype=torch.float64),
                                   torch.ones(1, 2, dtype=torch.float64), eps_low=0.2, eps_high=0.28, beta=0.1,
                                   logp_ref=torch.tensor([[-1.5, -1.0]], dtype=torch.float64),
                                   pg_weight=torch.tensor([[2.0, 0.5]], dtype=torch.float64))
    loss.sum().backward()
    assert loss.detach()[0].tolist() == pytest.approx([-1.989347, -0.428172], abs=1e-6)
    assert logp.grad[0].tolist() == pytest.approx([-1.960653, -0.671828], abs=1e-6)


def test_per_token_advantages_broadcast_like_per_sequence_ones():
    """Advantages may be [N] (one per sequence) or [N, T] (per token, e.g. dense PRIME returns): the
    same values spread over the tokens give the same loss and gradient."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    grads = []
    for a in (adv, adv.unsqueeze(-1).expand(2, 3)):
        loss, _ = grpo.grpo_token_loss(logp, logp.detach() + 0.1, a, mask, eps_low=0.2, eps_high=0.28)
        total = grpo.aggregate(loss, mask, "bnpo")
        grads.append((float(total), torch.autograd.grad(total, logp)[0]))
    assert grads[0][0] == grads[1][0] and torch.equal(grads[0][1], grads[1][1])
