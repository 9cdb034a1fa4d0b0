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


def test_hh_rows_as_chat_messages(tmp_path, tokenizer):
    """data.hh_format=messages: the HH prompt becomes user/assistant messages rendered by the chat
    template, the reply one assistant message whose ids are the reply's tokens and one EOS, as the
    engine generates them (not the template's "<|im_end|>\n" followed by another EOS)."""
    import json
    from rlpost.config import DataConfig
    from rlpost.data import load_response_groups

    row = {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you want to?\n\nHuman: "
                     "I am locked out.\n\nAssistant: Call a locksmith.",
           "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you want to?\n\nHuman: "
                       "I am locked out.\n\nAssistant: Use a hairpin and a tension wrench."}
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(row) + "\n")
    data = load_response_groups(DataConfig(source=str(path), hh_format="messages"), tokenizer)
    chosen, rejected = data.train[0].samples
    messages = [{"role": "user", "content": "How do I pick a lock?"},
                {"role": "assistant", "content": "Why do you want to?"},
                {"role": "user", "content": "I am locked out."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chosen.prompt_ids == rejected.prompt_ids == tokenizer(prompt, add_special_tokens=False).input_ids
    for sample, reply in ((chosen, "Call a locksmith."), (rejected, "Use a hairpin and a tension wrench.")):
        assert sample.response_ids[-1] == tokenizer.eos_token_id
        assert sample.response_ids.count(tokenizer.eos_token_id) == 1
        assert tokenizer.decode(sample.response_ids[:-1]) == reply


def test_conversational_responses_end_with_one_eos(tmp_path, tokenizer):
    """A conversational row (as scripts/sample_pairs.py writes them): the response's ids are its
    text's tokens and one EOS, nothing of the template's turn closing before it."""
    import json
    from rlpost.config import DataConfig
    from rlpost.data import load_response_groups

    row = {"prompt": [{"role": "user", "content": "What is 3 + 4?"}],
           "chosen": [{"role": "assistant", "content": "7"}], "rejected": [{"role": "assistant", "content": "8"}]}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    chosen, rejected = load_response_groups(DataConfig(source=str(path)), tokenizer).train[0].samples
    seven = tokenizer("7", add_special_tokens=False).input_ids
    assert chosen.response_ids == seven + [tokenizer.eos_token_id]


def test_sampled_pairs_read_back_as_the_engine_generated_them(tmp_path, tokenizer):
    """A sample generated by the engine, written by scripts/sample_pairs.py and read back by the
    dataset source, has the ids the engine produced: the prompt, the response's tokens, and its EOS
    only when it ended by itself (a response cut at max_new_tokens gets none)."""
    import importlib.util
    import json
    from rlpost.config import DataConfig
    from rlpost.data import load_prompt_sets, load_response_groups
    from rollout.engine import make_engine
    from rollout.source import generate_groups
    from rollout.types import FinishReason, SamplingParams

    spec = importlib.util.spec_from_file_location("sample_pairs", REPO / "scripts" / "sample_pairs.py")
    sample_pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_pairs)
    cfg = DataConfig(arithmetic={"train_size": 8, "test_size": 2, "num_operations": 2})
    train, _ = load_prompt_sets(cfg, tokenizer, seed=0)
    engine = make_engine("hf", "smollm2-135m-instruct", tokenizer)
    groups = generate_groups(engine, train, list(range(8)), [2] * 8,
                             SamplingParams(max_new_tokens=20, temperature=1.0, seed=3))
    for g in groups:  # which one is "correct" does not matter here: every group gives one pair
        g.samples[0].correct, g.samples[1].correct = True, False
    rows = sample_pairs.pair_rows(groups, train.problems, cfg)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    back = load_response_groups(DataConfig(source=str(path), max_response_tokens=10_000), tokenizer).train
    generated = [g for g in groups if g.samples[0].text != g.samples[1].text]
    assert len(back) == len(generated) >= 6
    kinds = set()
    for g, b in zip(generated, back):
        for s, t in zip(g.samples, b.samples):
            assert (t.prompt_ids, t.response_ids, t.finish_reason) == (s.prompt_ids, s.response_ids, s.finish_reason)
            kinds.add(s.finish_reason)
    assert len(kinds) == 2  # both ended and cut responses were checked
    # Without the ids (another tokenizer's file, or hand-written): the text's own encoding, and EOS
    # only after a response that ended.
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.endswith("_ids")}) + "\n" for r in rows))
    back = load_response_groups(DataConfig(source=str(path), max_response_tokens=10_000), tokenizer).train
    for g, b in zip(generated, back):
        for s, t in zip(g.samples, b.samples):
            eos = [tokenizer.eos_token_id] if s.finish_reason == FinishReason.STOP else []
            assert t.response_ids == tokenizer(s.text, add_special_tokens=False).input_ids + eos
            assert t.finish_reason == s.finish_reason


def test_row_ranges_select_file_rows(tmp_path, tokenizer):
    """data.rows / test_rows keep rows start..stop-1 of the file, in file order, before any row is
    skipped: the two halves of one file are disjoint and together the whole file."""
    import json
    from rlpost.config import ConfigError, DataConfig, load_config
    from rlpost.data import DataError, load_prompt_sets, load_response_groups

    rows = [{"prompt": f"Q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(10)]
    rows[3] = {"prompt": "Q3", "chosen": "same", "rejected": "same"}  # skipped, but still counted as a row
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    first = load_response_groups(DataConfig(source=str(path), rows=(0, 5)), tokenizer)
    second = load_response_groups(DataConfig(source=str(path), rows=(5, 10)), tokenizer)
    assert [g.prompt for g in first.train] == ["Q0", "Q1", "Q2", "Q4"] and first.skipped == 1
    assert [g.prompt for g in second.train] == [f"Q{i}" for i in range(5, 10)]
    cfg = DataConfig(source=str(path), prompts_from="pairs", rows=(0, 6), test_rows=(6, 9))
    train, test = load_prompt_sets(cfg, tokenizer, seed=0)
    assert [p.question for p in train.problems] == [f"Q{i}" for i in range(6)]  # a tie is still a prompt
    assert [p.question for p in test.problems] == ["Q6", "Q7", "Q8"]
    with pytest.raises(DataError, match="selects none"):
        load_response_groups(DataConfig(source=str(path), rows=(10, 12)), tokenizer)
    config = tmp_path / "c.yaml"
    config.write_text("data: {rows: [5, 5]}\n")
    with pytest.raises(ConfigError, match="data.rows"):
        load_config(config)


def test_hh_prompts_for_generation(tmp_path, tokenizer):
    """data.prompts_from=pairs on HH rows: the conversation up to the last human turn, as chat
    messages (what the policy is prompted with and what reward functions get as `prompts`)."""
    import json
    from rlpost.config import DataConfig
    from rlpost.data import load_prompt_sets, prompt_messages

    rows = _hh_rows(30)
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source=str(path), prompts_from="pairs", max_prompt_tokens=100_000)
    train, _ = load_prompt_sets(cfg, tokenizer, seed=0)
    assert len(train) == 30 and train.skipped == 0
    marker, checked = "\n\nAssistant:", 0
    for problem, ids, row in zip(train.problems, train.prompt_ids, rows):
        cut = row["chosen"].rindex(marker)
        if row["chosen"][:cut] != row["rejected"][:row["rejected"].rindex(marker)]:
            continue  # the dialogues differ before the last turn: the prompt is their common part
        checked += 1
        messages = prompt_messages(problem, cfg)
        last_human = row["chosen"][:cut].rsplit("\n\nHuman:", 1)[1].strip()
        assert messages[-1] == {"role": "user", "content": last_human} and problem.question == last_human
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"]
        assert ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False).input_ids
    assert checked >= 20


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
