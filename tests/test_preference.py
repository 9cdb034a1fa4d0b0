"""DPO, iterative DPO and APO (ALGORITHMS.md §4): the reference maths, pair construction, the loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from rlpost.algorithms import dpo
from conftest import REPO
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


# --- preference files -----------------------------------------------------------------------------

def _hh_rows(n):
    import gzip
    import json
    from conftest import shared_data_dir
    data = shared_data_dir()
    hh = None if data is None else data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if hh is None or not hh.is_file():
        pytest.skip("HH data not found (set RLPOST_DATA to the folder holding hh-rlhf/)")
    with gzip.open(hh, "rt") as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_hh_rows_split_into_prompt_and_final_assistant_turns(tmp_path, tokenizer):
    """Each HH row is two whole conversations; the prompt is the dialogue up to and including the last
    "\\n\\nAssistant:", the pair is the two final replies. Checked against a plain rsplit of the raw text."""
    import json
    from rlpost.config import DataConfig
    from rlpost.data import load_response_groups

    rows = _hh_rows(40)
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_response_groups(DataConfig(source=str(path), max_prompt_tokens=100_000, max_response_tokens=100_000),
                                tokenizer)
    marker = "\n\nAssistant:"
    checked = 0
    for row in rows:
        cut_c, cut_r = row["chosen"].rindex(marker) + len(marker), row["rejected"].rindex(marker) + len(marker)
        if row["chosen"][:cut_c] != row["rejected"][:cut_r] or row["chosen"][cut_c:] == row["rejected"][cut_r:]:
            continue  # the dialogues differ before the last turn, or the pair is no pair
        group = next(g for g in data.train if g.prompt == row["chosen"][:cut_c])
        chosen, rejected = group.samples
        assert (chosen.text, rejected.text) == (row["chosen"][cut_c:], row["rejected"][cut_r:])
        assert chosen.correct and not rejected.correct
        assert chosen.prompt_ids == tokenizer(group.prompt, add_special_tokens=False).input_ids
        checked += 1
    assert checked >= 30


def test_bad_and_long_preference_rows_are_skipped_or_cut_and_counted(tmp_path, tokenizer):
    import json
    from rlpost.config import DataConfig
    from rlpost.data import load_response_groups

    rows = [{"prompt": "Q1", "chosen": "good", "rejected": "bad"},
            {"prompt": "Q2", "chosen": "same", "rejected": "same"},        # no preference
            {"prompt": "Q3", "chosen": "", "rejected": "bad"},              # empty response
            {"prompt": "Q4", "chosen": "only one side"},                    # missing field
            {"prompt": "word " * 400, "chosen": "ok " * 300, "rejected": "no"}]  # long: cut
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_response_groups(DataConfig(source=str(path), max_prompt_tokens=64, max_response_tokens=32), tokenizer)
    assert len(data.train) == 2 and data.skipped == 3 and data.truncated == 1
    long = data.train[1]
    assert len(long.samples[0].prompt_ids) == 64 and len(long.samples[0].response_ids) == 32
    swapped = load_response_groups(DataConfig(source=str(path), swap_pairs=True), tokenizer)
    preferred, other = swapped.train[0].samples  # the preferred member comes first
    assert (preferred.text, preferred.correct, other.text, other.correct) == ("bad", True, "good", False)


# --- the objectives in real runs --------------------------------------------------------------------

def _preference_file(tmp_path):
    import json
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": str(a + b), "rejected": str(a + b + 1 + a % 3)}
            for a in range(1, 9) for b in range(1, 4)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _run(tmp_path, name, model, steps, *extra, resume=None):
    from rlpost.config import load_config
    from rlpost.trainer import train
    cfg = load_config(REPO / "configs" / "dpo_hh.yaml", [
        f"model.name={model}", f"run.output_dir={tmp_path / name}", f"data.source={_preference_file(tmp_path)}",
        "data.held_out=4", "rollout.prompts_per_step=4", "train.micro_batch_size=4", "train.lr=1e-3",
        f"train.max_steps={steps}", "checkpoint.every=1", "checkpoint.keep_last=10", *extra])
    train(cfg, resume=resume, show_progress=False)
    from safetensors.torch import load_file
    return load_file(tmp_path / name / "checkpoints" / f"step_{steps}" / "hf" / "model.safetensors")


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


APO = ["algorithm=apo", "apo.steps_per_round=2", "apo.pairs_per_group=1"]


def test_apo_round_one_is_iterative_dpo_and_alpha_acts_from_round_two(tmp_path, digit_model):
    """Round 1 has no previous policy: APO (alpha 0.3) and iterative DPO (alpha 0) take bit-identical
    steps. From round 2 the extrapolated reference differs, so the weights do."""
    apo_1 = _run(tmp_path, "apo1", digit_model, 2, *APO, "apo.alpha=0.3")
    dpo_1 = _run(tmp_path, "dpo1", digit_model, 2, *APO, "apo.alpha=0")
    assert _equal(apo_1, dpo_1)
    apo_2 = _run(tmp_path, "apo2", digit_model, 4, *APO, "apo.alpha=0.3")
    dpo_2 = _run(tmp_path, "dpo2", digit_model, 4, *APO, "apo.alpha=0")
    assert not _equal(apo_2, dpo_2)


def test_apo_resumes_inside_a_round_exactly(tmp_path, digit_model):
    """Rounds of 2 steps; stop after step 3 (inside round 2), resume, finish step 4: the same weights as
    4 uninterrupted steps (the round's pairs, reference log-probs and snapshot are in the checkpoint)."""
    from rlpost.metrics import read_metrics
    straight = _run(tmp_path, "a", digit_model, 4, *APO)
    _run(tmp_path, "b", digit_model, 3, *APO)
    resumed = _run(tmp_path, "b", digit_model, 4, *APO, resume=str(tmp_path / "b" / "checkpoints" / "step_3"))
    assert _equal(straight, resumed)
    rows = [r for r in read_metrics(tmp_path / "a") if "loss" in r]
    assert [r["round"] for r in rows] == [1, 1, 2, 2] and all("rewards/accuracies" in r for r in rows)
    assert rows[0]["round/start_margin"] == 0.0 and rows[2]["round/start_margin"] != 0.0  # alpha 0.3 from round 2


def test_apo_snapshots_roll_with_a_tied_output_head():
    """Round start: previous <- latest, latest <- the learner's current weights; tiny-random ties its
    output head to the embeddings (as SmolLM2 does), so the head is no parameter of its own."""
    import copy
    from rlpost.config import load_config
    from rlpost.objectives.apo import APO
    from rollout.models import load_model
    latest = load_model("tiny-random")
    assert latest.config.tie_word_embeddings
    policy = copy.deepcopy(latest)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    old = {k: v.clone() for k, v in latest.state_dict().items()}
    objective = APO(load_config(None, ["algorithm=apo"]), {"latest": latest, "previous": load_model("tiny-random")},
                    pad_id=2, policy_weights=lambda: ((n, p.detach()) for n, p in policy.named_parameters()))
    objective._roll_snapshots()
    assert all(torch.equal(objective.previous.state_dict()[k], v) for k, v in old.items())
    assert all(torch.equal(objective.latest.state_dict()[k], v) for k, v in policy.state_dict().items())
