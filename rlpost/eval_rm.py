"""Evaluate a reward model (ALGORITHMS.md §6.9) on three suites: `rlpost eval-rm ARGS`, or the same
as `scripts/eval_reward_model.py ARGS` (the design card's name for it).

    rlpost eval-rm --prm runs/prm_steps \
        [--pairwise pairs.jsonl] [--process steps.jsonl | --process-arithmetic 400] \
        [--best-of-n configs/prm_math.yaml --n 1 2 4 8 --prompts 100] [--out runs/eval_rm]

Scorers (one per run):
- `--prm CKPT`: an implicit reward beta (log pi - log pi_ref) per token, from an implicit-PRM
  checkpoint (its state names the reference and beta) or any policy trained against a reference, e.g.
  a DPO run (then `--reference MODEL`, and `--beta`, which only scales the scores). Step value: the
  cumulative q at each step's end; response scores min / sum over step rewards and over q. The
  process suite also reports the step-reward rule (r_k = q_k - q_(k-1) below a threshold) as an
  ablation of the q rule.
- `--likelihood MODEL`: the reference-free log-likelihood: step value the step's mean token
  log-prob, response scores its sum and mean.
- `--classifier MODEL`: an `AutoModelForSequenceClassification` reward model (logit 0 of the whole
  chat-templated conversation); whole responses only, so no process suite.

Suites:
- pairwise: any preference file the trainer reads (prompt / chosen / rejected, or Anthropic HH
  whole conversations). A pair is right only when chosen scores strictly higher; ties are wrong and
  reported; accuracy is split by whether chosen is the longer response.
- process: ProcessBench-format jsonl (`problem`, `steps`, `label`), e.g. from scripts/make_step_data.py.
  A solution is its steps joined by "\\n\\n" (a step's value includes its delimiter), encoded as the
  trainer encodes a response (its tokens and one EOS, where the last step's value is read); the predicted
  first wrong step is the first whose step value falls below a threshold (-1 if none), the threshold
  tuned on the first half of the items and reported on the second (the "oracle" threshold tuned on
  the reported half itself is printed as such). Beside the scorer, two baselines on the same items:
  "flag the last step" (an outcome oracle: every solution whose answer is wrong is flagged at its
  last step; in generated data an error always reaches the answer) and the untrained PRM (PRM =
  reference, q = 0 everywhere, exactly).
- best-of-N: N samples per held-out prompt of a training config (its model, prompts, sampling), each
  split into steps at "\\n\\n" and scored on the ids the engine generated (EOS included; re-encoded
  only for a scorer with another tokenizer); accuracy at each N for every response score of the scorer, against a
  random pick (the expected accuracy), majority vote on the final number and pass@N.

Output: tables on stdout, OUT/rm_eval.json, OUT/best_of_n.png. Bad input: one line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

class InputError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Pure metrics (tested in tests/test_implicit_prm.py)

def first_below(step_q: list[float], threshold: float) -> int:
    """Index of the first step whose value falls below `threshold`, -1 if none."""
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
    """The threshold (among the observed step values, and +inf) with the best F1 on these items."""
    candidates = sorted({q for qs in step_q for q in qs}) + [float("inf")]
    return max(candidates, key=lambda th: process_metrics(labels, [first_below(qs, th) for qs in step_q])["f1"])


def final_number(text: str) -> str:
    """The answer a majority vote counts: the last number in the response (its whole text if none)."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return numbers[-1] if numbers else text.strip()


def majority_pick(texts: list[str]) -> int:
    """Index of the first response whose final number is the most common one (ties: seen first)."""
    votes = Counter(final_number(t) for t in texts)
    top = max(votes.values())
    return next(j for j, t in enumerate(texts) if votes[final_number(t)] == top)


def step_rewards(step_q: list[float]) -> list[float]:
    """The implicit PRM's step rewards r_k = q_k - q_(k-1) (q_0 = 0: nothing said yet) from its step
    values: the step-reward rule flags the first step whose own reward falls below a threshold, where
    the q rule flags the first step after which the solution as a whole stands below one."""
    return [q - prev for prev, q in zip([0.0, *step_q], step_q)]


def threshold_report(labels: list[int], values: list[list[float]]) -> dict:
    half = len(labels) // 2
    threshold = tune_threshold(labels[:half], values[:half])
    oracle_th = tune_threshold(labels[half:], values[half:])
    return {"threshold": threshold, **process_metrics(labels[half:], [first_below(v, threshold) for v in values[half:]]),
            "oracle": {"threshold": oracle_th,
                       **process_metrics(labels[half:], [first_below(v, oracle_th) for v in values[half:]])}}


# ---------------------------------------------------------------------------------------------
# Scorers: per item, step values (for the process suite) and named response scores

class Implicit:
    """rewards.implicit_prm.ImplicitPRMScorer (the PRM's own scorer) as an eval scorer."""
    rules = ["min_step_reward", "sum_step_reward", "min_step_value", "sum_step_value"]
    pairwise_rule = "sum_step_reward"  # = r(y) = q_T

    def __init__(self, model, reference, beta: float):
        from rewards.implicit_prm import ImplicitPRMScorer
        self.scorer = ImplicitPRMScorer(model, reference, beta)

    def __call__(self, packed, step_ends):
        scores = self.scorer.score(packed.input_ids, packed.attention_mask, packed.position_ids, packed.response_mask,
                                   packed.prompt_width, step_ends=step_ends)
        return [(scores["step_values"][i, :len(e)].tolist(), {k: float(scores[k][i]) for k in self.rules})
                for i, e in enumerate(step_ends)]


class Likelihood:
    rules = ["sum_logp", "mean_logp"]
    pairwise_rule = "sum_logp"

    def __init__(self, model):
        self.model = model

    def __call__(self, packed, step_ends):
        from rlpost.batch import token_logprobs
        logp = token_logprobs(self.model, packed)[0].double()
        out = []
        for i, ends in enumerate(step_ends):
            n = int(packed.response_mask[i].sum())
            starts = [0] + [e + 1 for e in ends[:-1]]
            steps = [float(logp[i, s:e + 1].mean()) for s, e in zip(starts, ends)]
            out.append((steps, {"sum_logp": float(logp[i, :n].sum()), "mean_logp": float(logp[i, :n].mean())}))
        return out


class Classifier:
    rules = ["score"]
    pairwise_rule = "score"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, packed, step_ends):
        ids = packed.input_ids
        logits = self.model(input_ids=ids, attention_mask=packed.attention_mask).logits
        return [(None, {"score": float(logits[i, 0])}) for i in range(len(ids))]


def load_scorer(args):
    """-> (scorer, tokenizer, description)."""
    from rlpost.checkpoint import load_trainer_state, resolve_checkpoint
    from rollout.models import SPECS, load_classifier, load_model, load_tokenizer

    def model_path(spec: str) -> str:
        path = Path(spec)
        if path.exists() and not (path / "config.json").is_file():
            return str(resolve_checkpoint(path) / "hf")
        return spec

    def load(spec: str, what: str, cls=None):
        try:
            return load_model(spec) if cls is None else load_classifier(spec)[0]
        except Exception as e:  # noqa: BLE001 - any load failure is the user's path or model
            raise InputError(f"{what} {spec!r} does not load: {str(e).splitlines()[0][:200]}") from None

    for flag in ("prm", "likelihood", "classifier", "reference"):
        spec = getattr(args, flag)
        looks_like_path = spec and (spec.startswith((".", "/", "~")) or spec.count("/") != 1)
        if looks_like_path and spec not in SPECS and not Path(spec).expanduser().exists():
            raise InputError(f"--{flag} {spec}: no such checkpoint or model folder")
    if args.prm:
        path = model_path(args.prm)
        state = {}
        if Path(args.prm).exists() and not (Path(args.prm) / "config.json").is_file():
            state = load_trainer_state(resolve_checkpoint(Path(args.prm))).get("objective", {})
        reference = args.reference or state.get("reference")
        if reference is None:
            raise InputError(f"--prm {args.prm}: its checkpoint names no reference; pass --reference MODEL")
        tokenizer, ref_tokenizer = load_tokenizer(path), load_tokenizer(reference)
        if tokenizer.get_vocab() != ref_tokenizer.get_vocab():
            raise InputError(f"--reference {reference}: its tokenizer differs from the PRM's ({path}); "
                             f"an implicit reward needs the PRM's own reference")
        beta = args.beta if args.beta is not None else state.get("beta", 1.0)
        scorer = Implicit(load(path, "--prm").eval(), load(reference, "--reference").eval(), beta)
        return scorer, tokenizer, f"implicit reward of {path} against {reference} (beta {beta})"
    if args.likelihood:
        path = model_path(args.likelihood)
        return Likelihood(load(path, "--likelihood").eval()), load_tokenizer(path), f"log-likelihood under {path}"
    from transformers import AutoModelForSequenceClassification
    path = model_path(args.classifier)
    model = load(path, "--classifier", AutoModelForSequenceClassification).eval()
    return Classifier(model, load_tokenizer(path)), load_tokenizer(path), f"sequence classifier {path}"


def _step_ends(starts: list[int], steps: list[str]) -> list[int]:
    """The token index where each step (with its "\n\n" delimiter) ends, from each token's first
    character offset in the joined text."""
    ends, position = [], 0
    for k, step in enumerate(steps):
        position += len(step) + (2 if k < len(steps) - 1 else 0)
        ends.append(max([i for i, start in enumerate(starts) if start < position] or [0]))
    return ends


def encode(tokenizer, prompt_ids: list[int], steps: list[str], ended: bool = True):
    """A sample whose response is the steps joined by "\n\n", encoded as the trainer encodes a
    response (rlpost.data.response_ids: the text's tokens and, if it ended, one EOS), and the token
    index where each step ends; the last step ends at the EOS, where training put the outcome."""
    from rlpost.data import response_ids
    from rollout.types import FinishReason, Sample
    text = "\n\n".join(steps)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = response_ids(tokenizer, text, ended) or [tokenizer.eos_token_id]
    ends = _step_ends([start for start, _ in enc["offset_mapping"]], steps)
    if ended:
        ends[-1] = len(ids) - 1
    return Sample(list(prompt_ids), ids, [0.0] * len(ids), FinishReason.STOP if ended else FinishReason.LENGTH), ends


def encode_generated(tokenizer, prompt_ids: list[int], sample):
    """A generated sample scored on the very ids the engine produced (when the scorer shares the
    policy's tokenizer): generated ids need not be the tokenizer's encoding of their text, and
    re-encoding would also drop the EOS. Steps split at "\n\n" in the decoded text."""
    from rollout.types import Sample
    ids = list(sample.response_ids)
    ended = sample.finish_reason.value == "stop" and ids[-1:] == [tokenizer.eos_token_id]
    content = ids[:-1] if ended else ids
    text = tokenizer.decode(content, skip_special_tokens=True)
    steps = [x for x in text.split("\n\n") if x.strip()] or [text]
    if "\n\n".join(steps) != text:  # blank steps or edge whitespace: step offsets would not line up
        return encode(tokenizer, prompt_ids, steps, ended)
    starts = [len(tokenizer.decode(content[:i], skip_special_tokens=True)) for i in range(len(content))]
    ends = _step_ends(starts, steps)
    if ended:
        ends[-1] = len(ids) - 1
    return Sample(list(prompt_ids), ids, [0.0] * len(ids), sample.finish_reason), ends


def chat_prompt(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


@torch.no_grad()
def score(scorer, tokenizer, samples, step_ends, batch: int = 8) -> list[tuple[list[float] | None, dict]]:
    from rlpost.batch import pack
    out = []
    for i in range(0, len(samples), batch):
        out += scorer(pack(samples[i:i + batch], tokenizer.pad_token_id), step_ends[i:i + batch])
    return out


def read_jsonl(path: str, flag: str) -> list:
    if not Path(path).is_file():
        raise InputError(f"{flag} {path}: no such file")
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise InputError(f"{flag} {path}: not JSON lines ({e})") from None
    return rows


def process_row_problem(row) -> str | None:
    """Why a ProcessBench row cannot be scored, or None: `problem` a string, `steps` a non-empty list of
    strings, `label` an integer from -1 (no wrong step) to len(steps) - 1 (the first wrong step)."""
    if not isinstance(row, dict) or not all(k in row for k in ("problem", "steps", "label")):
        return "it lacks problem, steps or label"
    steps, label = row["steps"], row["label"]
    if not isinstance(row["problem"], str):
        return "problem is not a string"
    if not isinstance(steps, list) or not steps or not all(isinstance(x, str) and x.strip() for x in steps):
        return "steps is not a list of non-empty strings"
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
        return f"label {label!r} is not an integer from -1 to {len(steps) - 1} (its number of steps - 1)"
    return None


def process_rows(rows: list, flag: str) -> tuple[list[dict], int]:
    """The rows that can be scored and how many were skipped (the first reason printed on stderr), as
    the trainer's data loader skips and counts bad rows; none usable: one line, exit 2."""
    problems = [process_row_problem(r) for r in rows]
    good = [r for r, why in zip(rows, problems) if why is None]
    first = next(((i, why) for i, why in enumerate(problems) if why is not None), None)
    if not good:
        why = f" (row {first[0]}: {first[1]})" if first else ""
        raise InputError(f"{flag}: no usable ProcessBench rows (problem, steps, label){why}")
    if first:
        print(f"rlpost eval-rm: {flag}: skipped {len(rows) - len(good)} of {len(rows)} rows "
              f"(first: row {first[0]}, {first[1]})", file=sys.stderr)
    return good, len(rows) - len(good)


# ---------------------------------------------------------------------------------------------
# Suites

def pairwise_suite(scorer, tokenizer, path: str) -> dict:
    from rlpost.config import DataConfig
    from rlpost.data import DataError, load_response_groups
    try:
        groups = load_response_groups(DataConfig(source=path), tokenizer).train
    except (DataError, OSError, ValueError) as e:
        raise InputError(f"--pairwise {path}: {e}") from None
    pairs = [g for g in groups if len(g.samples) == 2]
    if not pairs:
        raise InputError(f"--pairwise {path}: no preference pairs (prompt / chosen / rejected)")
    samples = [s for g in pairs for s in g.samples]
    scored = score(scorer, tokenizer, samples, [[len(s.response_ids) - 1] for s in samples])
    rule = scorer.pairwise_rule
    result, split = {"pairs": len(pairs), "right": 0, "ties": 0}, {True: [0, 0], False: [0, 0]}
    for k, g in enumerate(pairs):
        c, r = scored[2 * k][1][rule], scored[2 * k + 1][1][rule]
        longer = len(g.samples[0].text or "") > len(g.samples[1].text or "")
        result["right"] += c > r
        result["ties"] += c == r
        split[longer][0] += c > r
        split[longer][1] += 1
    result["accuracy"] = result["right"] / len(pairs)
    result["accuracy_chosen_longer"] = split[True][0] / split[True][1] if split[True][1] else None
    result["accuracy_chosen_shorter"] = split[False][0] / split[False][1] if split[False][1] else None
    return result


def process_suite(scorer, tokenizer, rows: list[dict]) -> dict:
    if isinstance(scorer, Classifier):
        raise InputError("--classifier scores whole responses: it has no step values for --process")
    encoded = [encode(tokenizer, chat_prompt(tokenizer, r["problem"]), r["steps"]) for r in rows]
    scored = score(scorer, tokenizer, [e[0] for e in encoded], [e[1] for e in encoded])
    labels = [int(r["label"]) for r in rows]
    half = len(rows) // 2
    last_step = process_metrics(labels[half:], [len(r["steps"]) - 1 if r["label"] >= 0 else -1 for r in rows[half:]])
    untrained = threshold_report(labels, [[0.0] * len(r["steps"]) for r in rows])
    report = {"items": len(rows), "reported_on": len(rows) - half, "scorer": threshold_report(labels, [s[0] for s in scored]),
              "flag_last_step": last_step, "untrained_prm": untrained}
    if isinstance(scorer, Implicit):  # the ablation: the step-reward rule beside the q rule
        report["scorer_step_reward"] = threshold_report(labels, [step_rewards(s[0]) for s in scored])
    return report


def best_of_n_suite(scorer, tokenizer, config: str, overrides: list[str], ns: list[int], prompts: int) -> dict:
    from rewards.math import MathReward
    from rlpost.config import ConfigError, load_config
    from rlpost.data import load_prompt_sets, render_prompt
    from rollout.engine import make_engine
    from rollout.types import SamplingParams
    try:
        cfg = load_config(config, overrides)
    except (ConfigError, OSError) as e:
        raise InputError(f"--best-of-n {config}: {e}") from None
    from rollout.models import load_tokenizer
    policy_tokenizer = load_tokenizer(cfg.model.name)
    _, test = load_prompt_sets(cfg.data, policy_tokenizer, cfg.run.seed)
    n_max, count = max(ns), min(prompts, len(test))
    engine = make_engine(cfg.rollout.engine, cfg.model.name, policy_tokenizer, max_batch_size=cfg.rollout.max_batch_size,
                         **cfg.vllm_options(test.longest()))
    samples = engine.generate([ids for ids in test.prompt_ids[:count] for _ in range(n_max)],
                              SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, seed=cfg.run.seed))
    verifier = MathReward(timeout_s=cfg.reward.timeout_s)
    correct = verifier.correctness([s.text for s in samples], [p.answer for p in test.problems[:count] for _ in range(n_max)])
    verifier.close()
    # the scorer reads the same prompt rendered with its own tokenizer (it may not be the policy's)
    prompt_of = [render_prompt(tokenizer, test.problems[i], cfg.data) for i in range(count) for _ in range(n_max)]
    if tokenizer.get_vocab() == policy_tokenizer.get_vocab():  # the ids the engine generated, EOS included
        encoded = [encode_generated(tokenizer, p, s) for p, s in zip(prompt_of, samples)]
    else:  # another tokenizer: the text, re-encoded as the trainer encodes a response
        encoded = [encode(tokenizer, p, [x for x in s.text.split("\n\n") if x.strip()] or [s.text], not s.truncated)
                   for p, s in zip(prompt_of, samples)]
    scored = score(scorer, tokenizer, [e[0] for e in encoded], [e[1] for e in encoded])
    table = {}
    for n in ns:
        row = {}
        groups = [range(i * n_max, i * n_max + n) for i in range(count)]
        for rule in scorer.rules:
            row[rule] = statistics.mean(correct[max(g, key=lambda j: scored[j][1][rule])] for g in groups)
        row["random"] = statistics.mean(statistics.mean(correct[j] for j in g) for g in groups)
        row["majority_vote"] = statistics.mean(correct[g[majority_pick([samples[j].text for j in g])]] for g in groups)
        row["pass@n"] = statistics.mean(any(correct[j] for j in g) for g in groups)
        table[n] = row
    return {"config": config, "prompts": count, "accuracy": table}


def plot_best_of_n(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = result["accuracy"]
    ns = sorted(table)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for rule in table[ns[0]]:
        ax.plot(ns, [table[n][rule] for n in ns], marker="o", label=rule, linestyle="--" if rule in
                ("random", "majority_vote", "pass@n") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples per prompt)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"best-of-N on {result['prompts']} held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_report(report: dict) -> None:
    print(f"scorer: {report['scorer']}")
    if "pairwise" in report:
        p = report["pairwise"]
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"pairwise: {p['right']}/{p['pairs']} right ({p['accuracy']:.3f}), ties {p['ties']} (counted wrong); "
              f"chosen longer {fmt(p['accuracy_chosen_longer'])}, chosen shorter {fmt(p['accuracy_chosen_shorter'])}")
    if "process" in report:
        p = report["process"]
        print(f"\nprocess: {p['reported_on']} items reported, threshold tuned on the other {p['items'] - p['reported_on']}")
        print("| method | threshold | acc. erroneous | acc. correct | F1 |\n|---|---|---|---|---|")
        rows = [("scorer", p["scorer"]), ("scorer, oracle threshold", p["scorer"]["oracle"])]
        if "scorer_step_reward" in p:
            rows += [("scorer, step-reward rule (r_k)", p["scorer_step_reward"]),
                     ("scorer, step-reward rule, oracle threshold", p["scorer_step_reward"]["oracle"])]
        rows += [("untrained PRM (q = 0)", p["untrained_prm"]), ("flag the last step (outcome oracle)", p["flag_last_step"])]
        for name, m in rows:
            th = f"{m['threshold']:.4g}" if "threshold" in m else "-"
            print(f"| {name} | {th} | {m['acc_erroneous']:.3f} | {m['acc_correct']:.3f} | {m['f1']:.3f} |")
    if "best_of_n" in report:
        table = report["best_of_n"]["accuracy"]
        cols = list(next(iter(table.values())))
        print(f"\nbest-of-N ({report['best_of_n']['prompts']} prompts)")
        print("| N | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
        for n, row in table.items():
            print(f"| {n} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlpost eval-rm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--prm", help="implicit reward: a checkpoint (step dir, latest or run dir) or model")
    who.add_argument("--likelihood", help="reference-free log-likelihood under this model")
    who.add_argument("--classifier", help="an AutoModelForSequenceClassification reward model")
    parser.add_argument("--reference", help="--prm's reference model (default: named by its checkpoint)")
    parser.add_argument("--beta", type=float, help="--prm's beta (default: its checkpoint's, else 1)")
    parser.add_argument("--pairwise", help="preference jsonl (prompt / chosen / rejected, or HH conversations)")
    parser.add_argument("--process", help="jsonl in the ProcessBench format (problem, steps, label)")
    parser.add_argument("--process-arithmetic", type=int, default=0, help="generate this many arithmetic chains")
    parser.add_argument("--best-of-n", metavar="CONFIG", help="sample from this config's model and held-out prompts")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the --best-of-n config (repeatable)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--out", default="runs/eval_rm", help="folder for rm_eval.json and best_of_n.png")
    args = parser.parse_args(argv)
    from rollout.types import UserError
    try:
        if not (args.pairwise or args.process or args.process_arithmetic or args.best_of_n):
            raise InputError("nothing to evaluate: give --pairwise, --process, --process-arithmetic or --best-of-n")
        if any(n < 1 for n in args.n):
            raise InputError(f"--n must be positive, got {args.n}")
        scorer, tokenizer, description = load_scorer(args)
        report: dict = {"scorer": description}
        if args.pairwise:
            report["pairwise"] = pairwise_suite(scorer, tokenizer, args.pairwise)
        if args.process or args.process_arithmetic:
            if args.process:
                rows, skipped = process_rows(read_jsonl(args.process, "--process"), f"--process {args.process}")
            else:
                from rlpost.step_labels import arithmetic_chains
                rows, skipped = [c.as_row() for c in arithmetic_chains(args.process_arithmetic, seed=0)], 0
            report["process"] = {**process_suite(scorer, tokenizer, rows), "skipped": skipped}
        if args.best_of_n:
            report["best_of_n"] = best_of_n_suite(scorer, tokenizer, args.best_of_n, args.overrides, sorted(set(args.n)), args.prompts)
    except (InputError, UserError) as e:  # UserError: a bad checkpoint path, config, data file
        print(f"rlpost eval-rm: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rm_eval.json").write_text(json.dumps(report, indent=2))
    if "best_of_n" in report:
        plot_best_of_n(report["best_of_n"], out / "best_of_n.png")
    print_report(report)
    print(f"\nwrote {out / 'rm_eval.json'}" + (f" and {out / 'best_of_n.png'}" if "best_of_n" in report else ""))
    return 0

