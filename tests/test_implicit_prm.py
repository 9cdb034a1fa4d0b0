"""Implicit PRM maths (ALGORITHMS.md §6.8): token, cumulative and step rewards, the two training
losses, PRIME's RLOO returns in both forms."""
import pytest
import torch

from rewards import implicit_prm as prm


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_rewards_values_and_steps_of_the_spec():
    ratio, mask = t([[0.4, 0.2, -1.0, 0.2, 0.6, 0.0]]), torch.ones(1, 6, dtype=torch.float64)
    rho = prm.token_rewards(ratio, torch.zeros_like(ratio), mask, beta=0.05)
    assert rho[0].tolist() == pytest.approx([0.02, 0.01, -0.05, 0.01, 0.03, 0.0], abs=1e-12)
    q = prm.cumulative_values(rho, mask)
    assert q[0].tolist() == pytest.approx([0.02, 0.03, -0.02, -0.01, 0.02, 0.02], abs=1e-12)
    values, rewards, step_mask = prm.step_values(q, [[1, 3, 5]])  # steps end at tokens 2, 4, 6 (1-based)
    assert values[0].tolist() == pytest.approx([0.03, -0.01, 0.02], abs=1e-12)
    assert rewards[0].tolist() == pytest.approx([0.03, -0.04, 0.03], abs=1e-12)
    scores = prm.response_scores(values, rewards, step_mask)
    assert float(scores["min_step_reward"]) == pytest.approx(-0.04, abs=1e-12)
    assert float(scores["sum_step_reward"]) == pytest.approx(0.02, abs=1e-12) == pytest.approx(float(q[0, -1]))
    r = q[:, -1]
    assert float(prm.ce_loss(r, torch.tensor([1.0]))) == pytest.approx(0.683197, abs=1e-6)
    assert float(prm.ce_loss(r, torch.tensor([0.0]))) == pytest.approx(0.703197, abs=1e-6)
    assert float(prm.dpo_loss(r, t([-0.1]))) == pytest.approx(0.634946, abs=1e-6)


def test_padding_steps_never_win_the_min():
    q = t([[0.1, 0.2, 0.3], [0.5, -0.2, 0.4]])
    values, rewards, step_mask = prm.step_values(q, [[2], [0, 1, 2]])
    scores = prm.response_scores(values, rewards, step_mask)
    assert scores["min_step_reward"].tolist() == pytest.approx([0.3, -0.7])
    assert scores["min_step_value"].tolist() == pytest.approx([0.3, -0.2])


def _prime_batch():
    rows = [[0.2, 0.4], [-0.3, 0.0, 0.3], [0.6]]
    rho, mask = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    for i, r in enumerate(rows):
        rho[i, :len(r)], mask[i, :len(r)] = t(r), 1
    return rho, mask, t([1.0, 0.0, 1.0])


def test_prime_rloo_paper_form():
    rho, mask, outcomes = _prime_batch()
    dense, outcome = prm.rloo_returns(rho, mask, outcomes, [3], form="paper")
    assert dense[0, :2].tolist() == pytest.approx([0.0, 0.1], abs=1e-12)
    assert dense[1].tolist() == pytest.approx([-1.35, -0.6, -0.15], abs=1e-12)
    assert dense[2, :1].tolist() == pytest.approx([0.45], abs=1e-12)
    total = dense + outcome
    assert total[0, :2].tolist() == pytest.approx([0.5, 0.6], abs=1e-12)
    assert total[1].tolist() == pytest.approx([-2.35, -1.6, -1.15], abs=1e-12)
    assert total[2, :1].tolist() == pytest.approx([0.95], abs=1e-12)
    assert (total * (1 - mask)).abs().sum() == 0  # nothing off the responses


def test_prime_rloo_code_form_differs_after_the_first_token():
    rho, mask, outcomes = _prime_batch()
    dense, _ = prm.rloo_returns(rho, mask, outcomes, [3], form="code")
    paper, _ = prm.rloo_returns(rho, mask, outcomes, [3], form="paper")
    assert dense[0, :2].tolist() == pytest.approx([0.0, 0.15], abs=1e-12)
    assert dense[1].tolist() == pytest.approx([-1.35, -0.45, 0.0], abs=1e-12)
    assert dense[2, :1].tolist() == pytest.approx([0.45], abs=1e-12)
    assert torch.allclose(dense[:, 0], paper[:, 0])


def test_whitening_over_masked_tokens():
    rho, mask, _ = _prime_batch()
    w = prm.whiten(rho, mask)
    valid = w[mask.bool()]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-12) and float(valid.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    assert float(prm.max_abs_scale(rho, mask).abs().max()) == pytest.approx(1.0)


def test_prm_training_loss_is_the_ce_of_the_outcome_reward_and_the_run_trains(tmp_path, digit_model):
    """The objective's CE on a hand batch equals rewards.implicit_prm.ce_loss of r(y) = beta sum_t
    (log pi - log pi_ref); a 2-step run from outcome labels trains the PRM, leaves the sampler alone,
    and its checkpoint names the reference; the scorer's outcome score is sum of its step rewards."""
    from safetensors.torch import load_file
    from rlpost import checkpoint as ckpt
    from rlpost.batch import head_outputs
    from rlpost.config import load_config
    from rlpost.metrics import read_metrics
    from rlpost.objectives.implicit_prm import ImplicitPRM
    from rlpost.trainer import train
    from rollout.models import load_model
    from rollout.types import FinishReason, Group, Sample
    from conftest import REPO

    cfg = load_config(None, ["algorithm=implicit_prm", "train.micro_batch_size=8"])
    policy, reference = load_model(digit_model, torch.float64), load_model("tiny-random", torch.float64)
    objective = ImplicitPRM(cfg, {"reference": reference}, pad_id=2)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(3, 900, (4,), generator=g).tolist(), torch.randint(3, 900, (n,), generator=g).tolist(),
                      [0.0] * n, FinishReason.STOP, correct=bool(i % 2)) for i, n in enumerate((3, 5, 2, 6))]
    (mb,) = objective.micro_batches([Group(0, "", "", samples)], None, 0)
    loss, _ = objective.loss(mb, head_outputs(policy, mb.packed, objective.head(mb)))
    with torch.no_grad():
        from rlpost.batch import token_logprobs
        logp, logp_ref = token_logprobs(policy, mb.packed)[0], token_logprobs(reference, mb.packed)[0]
        r = prm.token_rewards(logp, logp_ref, mb.packed.response_mask.double(), 0.05).sum(-1)
    assert float(loss) == pytest.approx(float(prm.ce_loss(r, t([0, 1, 0, 1]))), rel=1e-10)

    run = tmp_path / "prm"
    train(load_config(REPO / "configs" / "prm_math.yaml", [
        f"model.name={digit_model}", f"run.output_dir={run}", "data.arithmetic.word_problems=false",
        "data.arithmetic.train_size=40", "data.arithmetic.test_size=8", "rollout.max_new_tokens=6",
        "rollout.prompts_per_step=4", "train.max_steps=2", "train.lr=1e-3", "checkpoint.every=1",
        "train.micro_batch_size=8", "eval.num_prompts=2"]), show_progress=False)
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert len(rows) == 2 and all("prm/accuracy" in r for r in rows) and rows[0]["grad_norm"] > 0
    latest = ckpt.resolve_checkpoint(run / "checkpoints" / "latest")
    assert ckpt.load_trainer_state(latest)["objective"] == {"reference": digit_model, "beta": 0.05}
    trained = load_file(latest / "hf" / "model.safetensors")
    base = load_model(digit_model).state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in trained)

    scorer = prm.ImplicitPRMScorer(load_model(str(latest / "hf")), load_model(digit_model), beta=0.05, chunk_size=2)
    p = mb.packed
    scores = scorer.score(p.input_ids, p.attention_mask, p.position_ids, p.response_mask, p.prompt_width,
                          step_ends=[[0, 2], [1, 4], [1], [2, 5]])
    assert torch.allclose(scores["sum_step_reward"], scores["outcome"], atol=1e-12)
    assert torch.allclose(scores["outcome"], scores["token_rewards"].sum(-1), atol=1e-12)


def _eval_script():
    from rlpost import eval_rm
    return eval_rm


def test_processbench_metrics_by_hand():
    ev = _eval_script()
    assert ev.first_below([0.1, -0.2, -0.5], 0.0) == 1 and ev.first_below([0.1, 0.2], 0.0) == -1
    # labels: two erroneous items (first wrong step 1 and 0), two correct ones
    m = ev.process_metrics([1, 0, -1, -1], [1, 2, -1, 0])
    assert (m["acc_erroneous"], m["acc_correct"]) == (0.5, 0.5) and m["f1"] == pytest.approx(0.5)
    assert ev.process_metrics([1, -1], [1, 0])["f1"] == 0.0  # harmonic mean: one side at 0 gives 0
    # q at step ends: the wrong steps dip below 0, the right ones stay above
    qs = [[0.2, -0.1, -0.3], [-0.2, -0.4], [0.1, 0.3], [0.05]]
    threshold = ev.tune_threshold([1, 0, -1, -1], qs)
    assert ev.process_metrics([1, 0, -1, -1], [ev.first_below(q, threshold) for q in qs])["f1"] == 1.0
    assert ev.final_number("So 3 + 4 = 7 apples.") == "7" and ev.final_number("no idea") == "no idea"
    # the step-reward rule reads each step's own reward: q = 0.5, 0.25, 0.75 -> r = 0.5, -0.25, 0.5
    assert ev.step_rewards([0.5, 0.25, 0.75]) == [0.5, -0.25, 0.5] and ev.step_rewards([]) == []
    assert ev.first_below(ev.step_rewards([0.5, 0.25, 0.75]), 0.0) == 1  # the q rule at 0 flags nothing
    assert ev.first_below([0.5, 0.25, 0.75], 0.0) == -1


def test_the_evaluation_script_runs_on_a_trained_prm(tmp_path, digit_model):
    import json
    import subprocess
    import sys
    from conftest import REPO, subprocess_env
    from rlpost.config import load_config
    from rlpost.trainer import train
    run = tmp_path / "prm"
    train(load_config(REPO / "configs" / "prm_math.yaml", [
        f"model.name={digit_model}", f"run.output_dir={run}", "data.arithmetic.word_problems=false",
        "data.arithmetic.train_size=40", "data.arithmetic.test_size=8", "rollout.max_new_tokens=6",
        "rollout.prompts_per_step=4", "train.max_steps=1", "train.micro_batch_size=8", "eval.num_prompts=2"]),
        show_progress=False)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"What is {a} + 1?", "chosen": str(a + 1), "rejected": str(a + 2)})
                               for a in range(5)))  # an odd count: a flipped comparison cannot give the same count
    out = tmp_path / "eval"
    base = [sys.executable, "scripts/eval_reward_model.py", "--out", str(out)]
    proc = subprocess.run(base + ["--prm", str(run), "--pairwise", str(pairs), "--process-arithmetic", "20",
                                  "--best-of-n", str(REPO / "configs" / "prm_math.yaml"), "--set", f"model.name={digit_model}",
                                  "--set", "data.arithmetic.word_problems=false", "--set", "rollout.max_new_tokens=6",
                                  "--n", "1", "2", "--prompts", "3"],
                          cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "rm_eval.json").read_text())
    # pairwise: r(y) = beta sum_t (log pi_prm - log pi_ref)(y_t) over the response and its EOS, computed
    # here with plain transformers, one unpadded sequence at a time
    from transformers import AutoModelForCausalLM
    from rlpost.checkpoint import resolve_checkpoint
    from rollout.models import load_tokenizer as _tok
    tok = _tok(digit_model)
    trained_prm = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(run) / "hf").eval()
    reference = AutoModelForCausalLM.from_pretrained(digit_model).eval()

    def implicit_reward(prompt, response):
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        r_ids = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logp = [torch.log_softmax(m(ids).logits[0, len(p_ids) - 1:-1].double(), -1)[range(len(r_ids)), r_ids].sum()
                    for m in (trained_prm, reference)]
        return 0.05 * float(logp[0] - logp[1])

    margins = [implicit_reward(f"What is {a} + 1?", str(a + 1)) - implicit_reward(f"What is {a} + 1?", str(a + 2))
               for a in range(5)]
    # padded-batch and unpadded float32 log-probs differ by rounding (~1e-6 per token, x beta): margins
    # above 1e-6 are decided the same way by both
    assert min(abs(m) for m in margins) > 1e-6, margins
    p = report["pairwise"]
    assert (p["pairs"], p["right"], p["ties"]) == (5, sum(m > 0 for m in margins), 0)
    # process suite on arithmetic_chains(20, seed=0); reported on items 10-19, whose first wrong steps
    # are [0, -1, -1, -1, -1, -1, 3, 2, 3, -1]: 4 erroneous items, 6 correct ones (4 steps each)
    proc_suite = report["process"]
    assert proc_suite["items"] == 20 and proc_suite["reported_on"] == 10
    # flag the last step (3): right on the two items wrong at step 3 and on all 6 correct ones
    last = proc_suite["flag_last_step"]
    assert (last["acc_erroneous"], last["acc_correct"]) == (0.5, 1.0) and last["f1"] == pytest.approx(2 / 3)
    # q = 0 everywhere: thresholds 0 (flags nothing) and +inf (flags step 0) both give F1 0 on the first
    # half; the first, 0, is kept, and flags nothing on the second: accuracies 0 and 1
    untrained = proc_suite["untrained_prm"]
    assert (untrained["threshold"], untrained["acc_erroneous"], untrained["acc_correct"], untrained["f1"]) == (0.0, 0.0, 1.0, 0.0)
    # the scorer: accuracies count items (quarters and sixths), F1 is their harmonic mean, and the
    # oracle threshold, tuned on the reported items themselves, is at least as good
    scored = proc_suite["scorer"]
    a, b = scored["acc_erroneous"], scored["acc_correct"]
    assert (4 * a) == round(4 * a) and (6 * b) == pytest.approx(round(6 * b))
    assert scored["f1"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0)
    assert scored["oracle"]["f1"] >= scored["f1"]
    by_reward = proc_suite["scorer_step_reward"]  # the ablation, on the same items
    assert by_reward["oracle"]["f1"] >= by_reward["f1"] and (4 * by_reward["acc_erroneous"]) == round(4 * by_reward["acc_erroneous"])
    table = report["best_of_n"]["accuracy"]
    assert set(table) == {"1", "2"} and (out / "best_of_n.png").is_file()
    for row in table.values():  # best-of-N picks one of the N: never above pass@N, never below 0
        assert all(0 <= row[k] <= row["pass@n"] + 1e-12 for k in row)
    assert table["1"]["min_step_reward"] == table["1"]["random"] == table["1"]["pass@n"]  # N = 1: no choice

    # the same scorer reference-free, and bad input: one line, exit 2
    lik = subprocess.run(base + ["--likelihood", str(run), "--process-arithmetic", "8"], cwd=REPO, capture_output=True,
                         text=True, env=subprocess_env(), timeout=600)
    assert lik.returncode == 0, lik.stderr[-2000:]
    from rollout.models import load_model, load_tokenizer
    other = tmp_path / "other-tokenizer"  # a model whose tokenizer has one extra token
    load_model("tiny-random").save_pretrained(other)
    tokenizer = load_tokenizer("tiny-random")
    tokenizer.add_tokens(["<not-in-the-prm>"])
    tokenizer.save_pretrained(other)
    # rows the process suite cannot score (issue 23, item 6): steps a string (it would be scored as
    # characters), a label beyond the last step (5 on a one-step solution), a float label, no steps
    bad_rows = tmp_path / "bad_rows.jsonl"
    bad_rows.write_text("".join(json.dumps(r) + "\n" for r in [
        {"problem": "1 + 1?", "steps": "1 + 1 = 2", "label": -1}, {"problem": "2 + 2?", "steps": ["2 + 2 = 4"], "label": 5},
        {"problem": "3 + 3?", "steps": ["3 + 3 = 6"], "label": 0.5}, {"problem": "4?", "steps": [], "label": -1}]))
    mixed = tmp_path / "mixed_rows.jsonl"
    good = [{"problem": f"{a} + 1?", "steps": [f"{a} + 1 = {a + 1}", f"so {a + 1}"], "label": a % 3 - 1} for a in range(6)]
    mixed.write_text(bad_rows.read_text() + "".join(json.dumps(r) + "\n" for r in good))
    m = subprocess.run(base + ["--prm", str(run), "--process", str(mixed), "--out", str(tmp_path / "mixed")], cwd=REPO,
                       capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert m.returncode == 0 and "skipped 4 of 10 rows (first: row 0, steps is not a list" in m.stderr, m.stderr[-1500:]
    mixed_report = json.loads((tmp_path / "mixed" / "rm_eval.json").read_text())["process"]
    assert (mixed_report["items"], mixed_report["skipped"]) == (6, 4)
    for bad, needle in [(["--prm", str(run), "--process", str(tmp_path / "missing.jsonl")], "no such file"),
                        (["--prm", str(run), "--process", str(pairs)], "no usable ProcessBench rows"),
                        (["--prm", str(run), "--process", str(bad_rows)], "no usable ProcessBench rows (problem, steps, label) (row 0: steps is not"),
                        (["--prm", str(tmp_path / "no-such-run"), "--process-arithmetic", "4"], "no such checkpoint"),
                        (["--prm", str(run), "--reference", str(other), "--process-arithmetic", "4"], "tokenizer differs"),
                        (["--likelihood", str(tmp_path), "--process-arithmetic", "4"], "not an rlpost checkpoint"),
                        (["--likelihood", str(tmp_path / "missing"), "--process-arithmetic", "4"], "no such checkpoint")]:
        r = subprocess.run([sys.executable, "-m", "rlpost.cli", "eval-rm", "--out", str(out)] + bad, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=600)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr[-1500:])


def test_best_of_n_helpers_by_hand():
    ev = _eval_script()
    assert ev.majority_pick(["1", "so 8", "it is 8", "7"]) == 1  # 8 has two votes: its first response
    assert ev.majority_pick(["= 7", "so 8", "it is 8", "7"]) == 0  # 7 and 8 tie: the one seen first wins
    # a tuned threshold is reported on the other half: here the halves disagree, so the oracle is better
    labels, values = [0, -1, 0, -1], [[-1.0], [1.0], [1.5], [3.0]]
    report = ev.threshold_report(labels, values)
    assert report["threshold"] == 1.0  # on the first half: flag below 1.0 -> item 0 flagged, item 1 not: F1 1
    assert report["f1"] == 0.0 and report["oracle"]["f1"] == 1.0 and report["oracle"]["threshold"] == 3.0


def test_a_prm_equal_to_its_reference_scores_everything_zero():
    from rlpost.batch import pack
    from rollout.models import load_model
    from rollout.types import FinishReason, Sample
    model = load_model("tiny-random")
    scorer = prm.ImplicitPRMScorer(model, model, beta=0.05, chunk_size=3)
    p = pack([Sample([5, 6, 7], [8, 9, 10, 11], [0.0] * 4, FinishReason.STOP),
              Sample([5], [12, 13], [0.0] * 2, FinishReason.STOP)], pad_id=2)
    scores = scorer.score(p.input_ids, p.attention_mask, p.position_ids, p.response_mask, p.prompt_width)
    assert scores["token_rewards"].abs().max() == 0 and scores["q"].abs().max() == 0
    assert scores["outcome"].tolist() == [0.0, 0.0] and scores["min_step_reward"].tolist() == [0.0, 0.0]


def test_pairwise_accuracy_counts_a_tie_as_wrong():
    """An untrained policy (= its reference) ties every pair: accuracy 0, ties 1."""
    from rlpost.evaluate import PairwiseEval
    from rollout.models import load_model
    from rollout.types import FinishReason, Group, Sample
    groups = [Group(i, "", "", [Sample([5, 6], [7 + i, 8], [0.0] * 2, FinishReason.STOP, correct=True),
                                Sample([5, 6], [9, 10 + i, 11], [0.0] * 3, FinishReason.STOP, correct=False)])
              for i in range(3)]
    result = PairwiseEval(load_model("tiny-random"), "tiny-random", groups, pad_id=2, micro_batch_size=4, device="cpu")()
    assert result["accuracy"] == 0.0 and result["ties"] == 1.0 and result["shorter_wins"] == 1.0


def test_eval_rm_scores_with_a_sequence_classifier(tmp_path):
    """--classifier: an AutoModelForSequenceClassification reward model on the pairwise suite; it has
    no step values, so --process is one clear error."""
    import json
    import subprocess
    import sys
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from conftest import REPO, subprocess_env
    from rollout.models import load_tokenizer
    tokenizer = load_tokenizer("tiny-random")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"What is {a} + 1?", "chosen": str(a + 1), "rejected": f"{a + 2}!"})
                               for a in range(5)))
    base = [sys.executable, "-m", "rlpost.cli", "eval-rm", "--classifier", str(tmp_path / "rm"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(base + ["--pairwise", str(pairs)], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "rm_eval.json").read_text())["pairwise"]
    # the classifier's own logits, one unpadded conversation at a time (prompt text, response, EOS:
    # the layout of rlpost's preference reader), straight from transformers
    rm = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()

    def logit(a, response):
        ids = (tokenizer(f"What is {a} + 1?", add_special_tokens=False).input_ids
               + tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
        with torch.no_grad():
            return float(rm(torch.tensor([ids])).logits[0, 0])

    margins = [logit(a, str(a + 1)) - logit(a, f"{a + 2}!") for a in range(5)]
    # batched (left-padded) and unpadded float32 logits differ by rounding, ~1e-6 for logits of size ~1:
    # a margin 100x that is decided the same way by both
    assert min(abs(m) for m in margins) > 1e-4, margins
    right = sum(m > 0 for m in margins)
    assert 0 < right < 5  # the random head gets some pairs right and some wrong: a flipped comparison shows
    assert (report["pairs"], report["right"], report["ties"]) == (5, right, 0)
    assert report["accuracy"] == right / 5
    # a classifier whose score head is zero scores every response 0: every pair a tie, counted wrong
    from rlpost.eval_rm import main
    with torch.no_grad():
        rm.score.weight.zero_()
    rm.save_pretrained(tmp_path / "flat")
    tokenizer.save_pretrained(tmp_path / "flat")
    assert main(["--classifier", str(tmp_path / "flat"), "--pairwise", str(pairs), "--out", str(tmp_path / "flat-out")]) == 0
    flat = json.loads((tmp_path / "flat-out" / "rm_eval.json").read_text())["pairwise"]
    assert (flat["right"], flat["ties"], flat["accuracy"]) == (0, 5, 0.0)
    proc = subprocess.run(base + ["--process-arithmetic", "4"], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)
    assert proc.returncode == 2 and "no step values" in proc.stderr
