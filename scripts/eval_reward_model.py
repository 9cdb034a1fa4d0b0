"""Evaluate an implicit PRM (ALGORITHMS.md §6.9): pairwise (RewardBench style), process (ProcessBench
style error localisation) and best-of-N.

    .venv/bin/python scripts/eval_reward_model.py --prm runs/prm_math/checkpoints/latest \
        [--pairwise pairs.jsonl] [--process steps.jsonl | --process-arithmetic 200] \
        [--best-of-n configs/prm_math.yaml --n 1 2 4 8]

- pairwise: a pair is right only when r(chosen) > r(rejected) strictly; ties are wrong and reported.
- process: each solution is its steps joined by "\\n\\n" (a step's value includes its delimiter); the
  predicted first wrong step is the first whose cumulative value q at its end falls below a
  threshold (-1 if none). The threshold is tuned on the first half of the items and reported on the
  second (the tuned-on-itself "oracle" threshold is printed separately); accuracy on erroneous and on
  correct items and their harmonic mean (F1).
- best-of-N: N samples per held-out prompt from the config's model, the highest min-step-reward
  wins; accuracy at each N against a random pick, majority vote and pass@N.
The PRM's reference and beta come from its checkpoint (the objective state names them).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------
# Pure metrics (tested in tests/test_implicit_prm.py)

def first_below(step_q: list[float], threshold: float) -> int:
    """Index of the first step whose cumulative value falls below `threshold`, -1 if none."""
    return next((k for k, q in enumerate(step_q) if q < threshold), -1)


def process_metrics(labels: list[int], predictions: list[int]) -> dict[str, float]:
    """ProcessBench: accuracy on erroneous items (exact first-wrong-step), on correct items (-1), F1."""
    err = [p == l for l, p in zip(labels, predictions) if l >= 0]
    ok = [p == -1 for l, p in zip(labels, predictions) if l < 0]
    acc_err = sum(err) / len(err) if err else 0.0
    acc_ok = sum(ok) / len(ok) if ok else 0.0
    f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err + acc_ok else 0.0
    return {"acc_erroneous": acc_err, "acc_correct": acc_ok, "f1": f1}


def tune_threshold(labels: list[int], step_q: list[list[float]]) -> float:
    """The threshold (among the observed step values, and +inf / -inf) with the best F1 on these items."""
    candidates = sorted({q for qs in step_q for q in qs}) + [float("inf")]
    return max(candidates, key=lambda th: process_metrics(labels, [first_below(qs, th) for qs in step_q])["f1"])


def final_number(text: str) -> str:
    """The answer a majority vote counts: the last number in the response (its whole text if none)."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return numbers[-1] if numbers else text.strip()


# ---------------------------------------------------------------------------------------------

def load_prm(path: str):
    from rlpost.checkpoint import load_trainer_state, resolve_checkpoint
    from rewards.implicit_prm import ImplicitPRMScorer
    from rollout.models import load_model, load_tokenizer
    step = resolve_checkpoint(path)
    state = load_trainer_state(step)["objective"]
    if "reference" not in state:
        raise SystemExit(f"{step} is not an implicit-PRM checkpoint (its objective state names no reference)")
    tokenizer = load_tokenizer(str(step / "hf"))
    return ImplicitPRMScorer(load_model(str(step / "hf")), load_model(state["reference"]), beta=state["beta"]), tokenizer


def encode(tokenizer, prompt: str, steps: list[str]):
    """Chat-templated prompt + the steps joined by "\\n\\n"; the token index where each step (with its
    delimiter) ends, from the fast tokenizer's character offsets."""
    from rollout.types import FinishReason, Sample
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
    text = "\n\n".join(steps)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends, position = [], 0
    for k, step in enumerate(steps):
        position += len(step) + (2 if k < len(steps) - 1 else 0)
        ends.append(max(i for i, (start, _) in enumerate(enc["offset_mapping"]) if start < position))
    sample = Sample(list(prompt_ids), list(enc["input_ids"]), [0.0] * len(enc["input_ids"]), FinishReason.STOP)
    return sample, ends


def score_items(scorer, tokenizer, items: list[tuple[str, list[str]]], batch: int = 8):
    from rlpost.batch import pack
    out = []
    for i in range(0, len(items), batch):
        encoded = [encode(tokenizer, p, s) for p, s in items[i:i + batch]]
        packed = pack([e[0] for e in encoded], tokenizer.pad_token_id)
        scores = scorer.score(packed.input_ids, packed.attention_mask, packed.position_ids, packed.response_mask,
                              packed.prompt_width, step_ends=[e[1] for e in encoded])
        for row in range(len(encoded)):
            k = int(scores["step_mask"][row].sum())
            out.append({"q": scores["step_values"][row, :k].tolist(), "outcome": float(scores["outcome"][row]),
                        "min_step_reward": float(scores["min_step_reward"][row])})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prm", required=True, help="an implicit-PRM checkpoint (step dir, latest or run dir)")
    parser.add_argument("--pairwise", help="jsonl of prompt / chosen / rejected strings")
    parser.add_argument("--process", help="jsonl in the ProcessBench format (problem, steps, label)")
    parser.add_argument("--process-arithmetic", type=int, default=0, help="generate this many arithmetic chains")
    parser.add_argument("--best-of-n", metavar="CONFIG", help="sample from this config's model and held-out prompts")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--prompts", type=int, default=50)
    args = parser.parse_args()
    scorer, tokenizer = load_prm(args.prm)

    if args.pairwise:
        rows = [json.loads(line) for line in Path(args.pairwise).read_text().splitlines() if line.strip()]
        chosen = score_items(scorer, tokenizer, [(r["prompt"], [r["chosen"]]) for r in rows])
        rejected = score_items(scorer, tokenizer, [(r["prompt"], [r["rejected"]]) for r in rows])
        right = sum(c["outcome"] > r["outcome"] for c, r in zip(chosen, rejected))
        ties = sum(c["outcome"] == r["outcome"] for c, r in zip(chosen, rejected))
        print(f"pairwise: {right}/{len(rows)} right ({right / len(rows):.3f}), ties {ties} (counted wrong)")

    if args.process or args.process_arithmetic:
        if args.process:
            rows = [json.loads(line) for line in Path(args.process).read_text().splitlines() if line.strip()]
            items = [(r["problem"], r["steps"], r["label"]) for r in rows]
        else:
            from rlpost.step_labels import arithmetic_chains
            items = [(c.problem, c.steps, c.label) for c in arithmetic_chains(args.process_arithmetic, seed=0)]
        scored = score_items(scorer, tokenizer, [(p, s) for p, s, _ in items])
        labels, qs = [l for _, _, l in items], [s["q"] for s in scored]
        half = len(items) // 2
        threshold = tune_threshold(labels[:half], qs[:half])
        test = process_metrics(labels[half:], [first_below(q, threshold) for q in qs[half:]])
        oracle_th = tune_threshold(labels[half:], qs[half:])
        oracle = process_metrics(labels[half:], [first_below(q, oracle_th) for q in qs[half:]])
        print(f"process ({len(items) - half} items, threshold {threshold:.4g} tuned on {half} others): "
              + ", ".join(f"{k} {v:.3f}" for k, v in test.items()))
        print(f"process, oracle threshold {oracle_th:.4g} tuned on the same items: "
              + ", ".join(f"{k} {v:.3f}" for k, v in oracle.items()))

    if args.best_of_n:
        from rewards.math import MathReward
        from rlpost.config import load_config
        from rlpost.data import load_prompt_sets
        from rollout.engine import make_engine
        from rollout.types import SamplingParams
        cfg = load_config(args.best_of_n)
        _, test = load_prompt_sets(cfg.data, tokenizer, cfg.run.seed)
        n_max, count = max(args.n), min(args.prompts, len(test))
        engine = make_engine(cfg.rollout.engine, cfg.model.name, tokenizer, max_batch_size=cfg.rollout.max_batch_size)
        samples = engine.generate([ids for ids in test.prompt_ids[:count] for _ in range(n_max)],
                                  SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, seed=cfg.run.seed))
        verifier = MathReward()
        rng = random.Random(0)
        print("| N | PRM best (min step reward) | random | majority vote | pass@N |\n|---|---|---|---|---|")
        per_prompt = []
        for i in range(count):
            group = samples[i * n_max:(i + 1) * n_max]
            scored = score_items(scorer, tokenizer, [(test.problems[i].question, [s.text]) for s in group])
            correct = verifier.correctness([s.text for s in group], [test.problems[i].answer] * n_max)
            per_prompt.append((group, scored, correct))
        for n in args.n:
            best = statistics.mean(c[max(range(n), key=lambda j: s[j]["min_step_reward"])] for _, s, c in per_prompt)
            rand = statistics.mean(c[rng.randrange(n)] for _, _, c in per_prompt)
            vote = statistics.mean(c[next(j for j in range(n) if final_number(g[j].text) ==
                                          Counter(final_number(x.text) for x in g[:n]).most_common(1)[0][0])]
                                   for g, _, c in per_prompt)
            pass_n = statistics.mean(any(c[:n]) for _, _, c in per_prompt)
            print(f"| {n} | {best:.3f} | {rand:.3f} | {vote:.3f} | {pass_n:.3f} |")
        verifier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
