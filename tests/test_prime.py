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


# ALGORITHMS.md §6.8, K = 3, gamma = 1: dense returns per form, and the outcome advantages [0.5, -1, 0.5]
SPEC_DENSE = {"paper": [[0.0, 0.1], [-1.35, -0.6, -0.15], [0.45]], "code": [[0.0, 0.15], [-1.35, -0.45, 0.0], [0.45]]}


@pytest.mark.parametrize("rloo,norm", [("paper", "none"), ("code", "none"), ("paper", "max_abs")])
def test_prime_advantages_are_the_whitened_rloo_returns_of_the_spec(rloo, norm):
    """§6.8 with coef 1: the dense returns of the chosen RLOO form (divided by the batch's largest
    |dense return|, 1.35, under dense_norm=max_abs, the released code's batch_norm), plus the outcome
    advantages, whitened over the six tokens (mean and std computed here by hand)."""
    from rlpost.objectives.grpo import GRPO
    objective = GRPO(load_config(None, ["prime.coef=1", f"prime.rloo={rloo}", f"prime.dense_norm={norm}"]), {}, pad_id=2)
    rows = [([0.2, 0.4], 1.0), ([-0.3, 0.0, 0.3], 0.0), ([0.6], 1.0)]
    samples = [Sample([5], [7] * len(r), [0.0] * len(r), FinishReason.STOP, reward=o, correct=o > 0, token_rewards=r)
               for r, o in rows]
    adv = objective.advantages([Group(0, "", "", samples)])
    scale = 1.35 if norm == "max_abs" else 1.0
    totals = [d / scale + o for dense, o in zip(SPEC_DENSE[rloo], [0.5, -1.0, 0.5]) for d in dense]
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


def test_the_prm_scores_and_trains_on_the_kept_groups_once_per_step(tmp_path, digit_model):
    """The released trainer's order (issue 23, item 3): verdicts, then the accuracy filter, then the PRM
    scores and takes its one update of the step, on the kept groups only. Under APRIL the source scores
    every group as it finishes; the PRM must still step once per training step (two steps: two
    optimizer steps in its DeepSpeed state, not one per finished group)."""
    from rlpost.trainer import train
    extra = ["grpo.accuracy_range=null", "rollout.scheduler=april", "rollout.april_submit_groups=4"]
    cfg = load_config(REPO / "configs" / "prime_math.yaml", [*SMALL, f"model.name={digit_model}", "train.max_steps=2",
                                                            f"run.output_dir={tmp_path / 'run'}", *extra])
    train(cfg, show_progress=False)
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_2" / "prm" / "deepspeed" / "state" /
                       "mp_rank_00_model_states.pt", weights_only=False)
    assert state["global_steps"] == 2


def test_the_prm_sees_only_what_it_is_given():
    """PrimeDense on a list of groups: token rewards on exactly those samples (a group the filter
    dropped is never scored), one PRM update per call."""
    from rlpost.build import make_dense_rewards
    cfg = load_config(REPO / "configs" / "prime_math.yaml", ["model.name=tiny-random", "train.micro_batch_size=4"])
    dense = make_dense_rewards(cfg, pad_id=2)

    def group(right):
        return Group(0, "", "", [Sample([5, 6], [7, 8, 9], [0.0] * 3, FinishReason.STOP, reward=float(i < right),
                                        correct=i < right) for i in range(4)])
    kept, dropped = group(2), group(4)
    dense([kept])
    metrics = dense.metrics()
    assert dense.prm.version == 1 and "prm/loss" in metrics
    assert all(len(s.token_rewards) == 3 for s in kept.samples)
    scale = sum(abs(r) for s in kept.samples for r in s.token_rewards) / 12  # 4 samples x 3 response tokens
    assert metrics["prime/token_reward_abs"] == pytest.approx(scale, rel=1e-12)
    assert all(s.token_rewards is None for s in dropped.samples)
