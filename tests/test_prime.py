"""PRIME = GRPO + dense implicit-PRM token rewards, the PRM trained online (a second Learner)."""
import pytest
import torch

from conftest import REPO
from rlpost.config import load_config
from rollout.types import FinishReason, Group, Sample

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6", "eval.num_prompts=4",
         "eval.pass_k=1", "eval.at_start=false", "train.micro_batch_size=4", "checkpoint.every=1",
         "checkpoint.keep_last=5", "grpo.dynamic_sampling=false", "train.lr=1e-4", "reward.format_weight=0.5",
         "data.arithmetic.train_size=50", "data.arithmetic.test_size=10"]


def test_prime_advantages_are_the_whitened_rloo_returns_of_the_spec():
    """§6.8 with coef 1: totals y1 [0.5, 0.6], y2 [-2.35, -1.6, -1.15], y3 [0.95] before whitening; the
    objective returns them whitened over the six tokens (mean and std computed here by hand)."""
    from rlpost.objectives.grpo import GRPO
    objective = GRPO(load_config(None, ["prime.coef=1"]), {}, pad_id=2)
    rows = [([0.2, 0.4], 1.0), ([-0.3, 0.0, 0.3], 0.0), ([0.6], 1.0)]
    samples = [Sample([5], [7] * len(r), [0.0] * len(r), FinishReason.STOP, reward=o, correct=o > 0, token_rewards=r)
               for r, o in rows]
    adv = objective.advantages([Group(0, "", "", samples)])
    totals = [0.5, 0.6, -2.35, -1.6, -1.15, 0.95]
    mean = sum(totals) / 6
    std = (sum((x - mean) ** 2 for x in totals) / 6) ** 0.5
    expected = [[(x - mean) / std for x in totals[:2]] + [0.0], [(x - mean) / std for x in totals[2:5]],
                [(totals[5] - mean) / std, 0.0, 0.0]]
    assert adv.shape == (3, 3) and torch.allclose(adv.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_the_accuracy_filter_keeps_groups_between_the_bounds():
    from rlpost.objectives.grpo import GRPO
    objective = GRPO(load_config(None, ["grpo.accuracy_range=[0.2, 0.8]", "grpo.dynamic_sampling=false"]), {}, 2)

    def group(right):
        return Group(0, "", "", [Sample([1], [2], [0.0], FinishReason.STOP, correct=i < right) for i in range(5)])
    assert [objective.keep(group(k)) for k in range(6)] == [False, True, True, True, True, False]


def _run(tmp_path, name, config, model, steps, *extra, resume=None):
    from safetensors.torch import load_file
    from rlpost.trainer import train
    cfg = load_config(REPO / "configs" / config, [*SMALL, f"model.name={model}", f"run.output_dir={tmp_path / name}",
                                                  f"train.max_steps={steps}", *extra])
    train(cfg, resume=resume, show_progress=False)
    step = tmp_path / name / "checkpoints" / f"step_{steps}"
    prm = step / "prm" / "hf" / "model.safetensors"
    return load_file(step / "hf" / "model.safetensors"), (load_file(prm) if prm.exists() else None)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_coef_zero_is_plain_grpo(tmp_path, digit_model):
    grpo, _ = _run(tmp_path, "grpo", "grpo_math.yaml", digit_model, 2)
    prime, prm = _run(tmp_path, "prime", "prime_math.yaml", digit_model, 2, "prime.coef=0", "grpo.accuracy_range=null")
    assert _equal(grpo, prime) and prm is None  # no PRM is built at all


def test_prime_trains_both_models_and_resumes_both_exactly(tmp_path, digit_model):
    """3 steps straight vs 2 + resume + 1: the policy and the online PRM (its own optimizer state
    included) end bit-identical; the dense rewards changed the policy's update (vs coef 0)."""
    from rlpost.metrics import read_metrics
    extra = ["grpo.accuracy_range=null", "prime.train.lr=1e-3"]
    straight = _run(tmp_path, "a", "prime_math.yaml", digit_model, 3, *extra)
    _run(tmp_path, "b", "prime_math.yaml", digit_model, 2, *extra)
    resumed = _run(tmp_path, "b", "prime_math.yaml", digit_model, 3, *extra,
                   resume=str(tmp_path / "b" / "checkpoints" / "step_2"))
    assert _equal(straight[0], resumed[0]) and _equal(straight[1], resumed[1])
    rows = [r for r in read_metrics(tmp_path / "a") if "reward" in r]
    assert all("prm/loss" in r and "prm/accuracy" in r for r in rows)
    base = load_config(None, [f"model.name={digit_model}"])
    from rollout.models import load_model
    initial = load_model(base.model.name).state_dict()
    assert any(not torch.equal(straight[1][k], initial[k]) for k in straight[1])  # the PRM was trained
    plain = _run(tmp_path, "c", "prime_math.yaml", digit_model, 3, "prime.coef=0", "grpo.accuracy_range=null")
    assert not _equal(straight[0], plain[0])
