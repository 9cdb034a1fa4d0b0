"""CurES against ALGORITHMS.md §3.8, and the sampler's behaviour."""
import pytest
import torch

from rlpost.curriculum import (CuresSampler, allocate, gradient_sigma, learning_signal, posterior_mean,
                               sampling_probs)

A = torch.tensor([0.0, 1, 2, 4])
N = torch.tensor([4.0, 4, 4, 4])


def approx(x, tol=1e-6):
    return pytest.approx(x, abs=tol)


def test_posterior_and_scores():
    p = posterior_mean(A, N)
    assert p.tolist() == approx([0.166667, 0.333333, 0.5, 0.833333])
    assert learning_signal(p).tolist() == approx([0.372678, 0.471405, 0.5, 0.372678])
    assert posterior_mean(torch.tensor(3.0), torch.tensor(8.0)).item() == pytest.approx(0.4)  # 3 right, 5 wrong


@pytest.mark.parametrize("mode,tau,expected", [
    ("code", None, [0.250401, 0.250058, 0.249886, 0.249655]),
    ("fixed", 1.0, [0.235874, 0.260350, 0.267902, 0.235874]),
    ("fixed", 0.1, [0.121121, 0.325074, 0.432684, 0.121121]),
    ("fixed", 0.05, [0.045527, 0.327944, 0.581001, 0.045527])])
def test_sampling_distributions(mode, tau, expected):
    assert sampling_probs(A, N, mode, tau or 0.1).tolist() == approx(expected)


def test_allocation_and_sigma():
    assert allocate(learning_signal(posterior_mean(A, N)).tolist(), 32) == [7, 9, 9, 7]
    assert gradient_sigma(0.5, [2, 2], [1, 1]) == pytest.approx(0.75)
    assert gradient_sigma(0.5, [1, 1], [1, 1]) == pytest.approx(0.5)


def test_allocation_keeps_k_min_and_the_budget():
    assert allocate([1, 0, 0, 10], 16) == [2, 2, 2, 10]
    assert sum(allocate([0.3, 0.01, 0.5, 0.2, 0.0], 23)) == 23
    with pytest.raises(ValueError, match="cannot give"):
        allocate([1, 1, 1], 5)


def test_sampler_prefers_informative_prompts_and_round_trips():
    sampler = CuresSampler(6, seed=0, rollouts_per_prompt=4)
    for prompt, right in enumerate([0, 4, 2, 2, 8, 0]):
        sampler.update(prompt, [True] * right + [False] * (8 - right))
    counts = torch.zeros(6)
    for _ in range(200):
        ids, ks = sampler.next_batch(2)
        assert len(set(ids)) == 2 and sum(ks) == 8 and min(ks) >= 2
        counts[ids] += 1
    assert counts[[1, 2, 3]].min() > counts[[0, 4, 5]].max()  # p ~ 0.5 beats always/never solved
    restored = CuresSampler(6, seed=99, rollouts_per_prompt=4)
    restored.load_state_dict(sampler.state_dict())
    assert restored.next_batch(3) == sampler.next_batch(3)


def test_grad_norm_allocation_uses_measured_norms():
    sampler = CuresSampler(2, seed=0, rollouts_per_prompt=8, allocation="grad_norm")
    sampler.update(0, [True, False, True, False], [4.0, 1.0, 4.0, 1.0])  # big correct-answer gradients
    sampler.update(1, [True, False, True, False], [1.0, 1.0, 1.0, 1.0])
    ids, ks = sampler.next_batch(2)
    allocation = dict(zip(ids, ks))
    assert allocation[0] > allocation[1] and sum(ks) == 16


def test_head_gradient_norms_match_autograd():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlpost.batch import head_gradient_norms, pack, token_logprobs
    from rollout.types import FinishReason, Sample

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).double()
    samples = [Sample([5, 6, 7], [8, 9, 10, 11], [], FinishReason.STOP), Sample([5], [12, 13], [], FinishReason.STOP)]
    batch = pack(samples, pad_id=0)
    fast = head_gradient_norms(model, batch, temperature=0.8)
    for row in range(2):
        model.zero_grad()
        logp, _ = token_logprobs(model, batch, temperature=0.8)
        (logp[row] * batch.response_mask[row]).sum().backward()
        assert fast[row] == pytest.approx(model.lm_head.weight.grad.norm().item(), rel=1e-6)


def test_shard_sampler_speaks_global_ids_and_learns_only_its_share():
    """APRIL on N ranks: rank 1 of 2 owns prompts 1, 3, 5, ...; its CurES posterior counts only those."""
    from rlpost.curriculum import CuresSampler, ShardSampler
    shard = ShardSampler(CuresSampler(5, seed=0, rollouts_per_prompt=4), ids=[1, 3, 5, 7, 9])
    ids, sizes = shard.next_batch(3)
    assert set(ids) <= {1, 3, 5, 7, 9} and len(set(ids)) == 3 and sum(sizes) == 12
    shard.update(3, [True, True, False])   # its own prompt 3 = local index 1
    shard.update(4, [True] * 8)            # rank 0's prompt: ignored
    assert shard.inner.total.tolist() == [0, 3, 0, 0, 0] and shard.inner.correct.tolist() == [0, 2, 0, 0, 0]
    state = shard.state_dict()
    other = ShardSampler(CuresSampler(5, seed=0, rollouts_per_prompt=4), ids=[0, 2, 4, 6, 8])
    with pytest.raises(ValueError, match="another share"):
        other.load_state_dict(state)


def test_grad_norm_allocation_runs_through_the_trainer(tmp_path, digit_model):
    """The source asks the learner for per-response gradient norms only when the sampler wants them
    (rlpost/build.py make_source): CurES with allocation=grad_norm trains two steps end to end."""
    from conftest import REPO
    from rlpost.config import load_config
    from rlpost.metrics import read_metrics
    from rlpost.trainer import train
    cfg = load_config(REPO / "configs" / "cures_math.yaml", [
        f"model.name={digit_model}", f"run.output_dir={tmp_path / 'run'}", "curriculum.allocation=grad_norm",
        "data.arithmetic.train_size=12", "data.arithmetic.test_size=4", "rollout.prompts_per_step=2",
        "rollout.group_size=4", "rollout.max_new_tokens=6", "curriculum.init_rollouts=2", "eval.num_prompts=2",
        "eval.at_start=false", "train.max_steps=2", "train.micro_batch_size=8", "eval.pass_k=1"])
    train(cfg, show_progress=False)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert len(rows) == 2 and all(r["curriculum/mean_k"] >= 2 for r in rows)
