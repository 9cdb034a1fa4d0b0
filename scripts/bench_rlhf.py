"""The RLHF recipe, measured: a proxy and a gold reward model trained on two disjoint halves of the HH
harmless pairs, GRPO against the proxy, and what the gold one says of it (the proxy/gold
over-optimisation setup of Gao et al. 2022, at small scale).

    .venv/bin/python scripts/bench_rlhf.py [--out runs/bench_rlhf] [--seeds 0 1] [--prompts 200]

Stages, each skipped when its result exists (a stopped run continues where it stopped):
  1. the proxy RM: `rlpost train configs/rm_hh.yaml` (rows 0-799 of the HH file)
  2. the gold RM: the same recipe on rows 800-1599
  3. both RMs' pairwise accuracy on the pairs no model trains on (rows 2000-2311)
  4. per seed: `rlpost train configs/grpo_hh.yaml` rewarded by the proxy (prompts rows 1600-1999),
     a checkpoint every 10 steps
  5. per seed and checkpoint (step 0: the initial policy), on the first --prompts held-out prompts
     (rows 2000-2311): the greedy answer's proxy and gold reward and length; its gold win rate over
     the initial policy's greedy answer to the same prompt (a tie counts half); and KL(pi || pi_0),
     estimated on one answer per prompt sampled at temperature 1 as the mean of
     sum_t [log pi(y_t) - log pi_0(y_t)] (an unbiased estimate of the sequence KL).
  6. the table (markdown, printed and written to OUT/table.md) and the plot (OUT/rlhf.png).
Every stage runs in its own process, one after the other (two torch jobs at once share 2 cores badly).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOLD_ROWS = "data.rows=[800,1600]"
RESERVED_ROWS = (2000, 2312)


def rlpost_train(config: str, overrides: list[str]) -> None:
    cmd = [sys.executable, "-c", "import sys; from rlpost.cli import main; sys.exit(main())", "train", config,
           "--no-progress", *[x for o in overrides for x in ("--set", o)]]
    print("$", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def finished(run: Path, steps: int) -> bool:
    return (run / "checkpoints" / f"step_{steps}" / "hf").is_dir()


def rm_accuracy(rm_dir: str) -> dict:
    """Pairwise accuracy of a reward model on the reserved HH pairs, encoded as the RM trainer
    encodes its training pairs (configs/rm_hh.yaml's data settings)."""
    import torch
    from rlpost.build import load_data
    from rlpost.config import load_config
    from rollout.models import load_classifier
    cfg = load_config(REPO / "configs" / "rm_hh.yaml", [f"data.rows=[{RESERVED_ROWS[0]},{RESERVED_ROWS[1]}]",
                                                       "data.held_out=0"])
    model, tokenizer = load_classifier(rm_dir)
    model.eval()
    pairs = [(g.samples[0], g.samples[1]) for g in load_data(cfg, tokenizer).responses.train]
    right = ties = 0
    with torch.no_grad():
        for chosen, rejected in pairs:
            r = [model(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).logits[0, 0].item()
                 for s in (chosen, rejected)]
            right, ties = right + (r[0] > r[1]), ties + (r[0] == r[1])
    n = len(pairs)
    return {"accuracy": right / n, "ties": ties / n, "pairs": n, "se": math.sqrt(0.25 / n)}


def evaluate_policy(policy: str, base: str, proxy: str, gold: str, prompts: int, overrides: list[str]) -> dict:
    """Stage 5 for one policy checkpoint (see the module docstring)."""
    import torch
    from rlpost.batch import pack, token_logprobs
    from rlpost.config import load_config
    from rlpost.data import load_prompt_sets, prompt_messages
    from rewards.reward_model import ModelReward
    from rollout.hf_engine import HFEngine
    from rollout.models import load_model, load_tokenizer
    from rollout.types import SamplingParams

    cfg = load_config(REPO / "configs" / "grpo_hh.yaml", overrides)
    tokenizer = load_tokenizer(cfg.model.name)
    _, test = load_prompt_sets(cfg.data, tokenizer, cfg.run.seed)
    ids, problems = test.prompt_ids[:prompts], test.problems[:prompts]
    model = load_model(policy).eval()
    engine = HFEngine(model, tokenizer, max_batch_size=64)
    length = cfg.rollout.max_new_tokens
    greedy = engine.generate(ids, SamplingParams(max_new_tokens=length, temperature=0.0))
    sampled = engine.generate(ids, SamplingParams(max_new_tokens=length, temperature=1.0, seed=1234))
    kwargs = {"prompts": [prompt_messages(p, cfg.data) for p in problems],
              "completions": [[{"role": "assistant", "content": s.text}] for s in greedy]}
    scores = {name: ModelReward(name, spec, batch_size=16)(kwargs, None, greedy) for name, spec in
              (("proxy", proxy), ("gold", gold))}
    kl = []
    reference = model if policy == base else load_model(base).eval()
    with torch.no_grad():
        for start in range(0, len(sampled), 16):
            batch = pack(sampled[start:start + 16], tokenizer.pad_token_id)
            logp, _ = token_logprobs(model, batch)
            logp_0, _ = token_logprobs(reference, batch)
            kl += ((logp - logp_0) * batch.response_mask).sum(-1).tolist()
    return {"proxy": scores["proxy"], "gold": scores["gold"], "kl": kl,
            "length": [len(s.response_ids) for s in greedy], "truncated": [s.truncated for s in greedy],
            "answers": [s.text for s in greedy]}


def mean(xs):
    return sum(xs) / len(xs)


def summarise(result: dict, initial: dict) -> dict:
    wins = [1.0 if g > g0 else 0.5 if g == g0 else 0.0 for g, g0 in zip(result["gold"], initial["gold"])]
    n = len(wins)
    return {"proxy": mean(result["proxy"]), "gold": mean(result["gold"]), "kl": mean(result["kl"]),
            "length": mean(result["length"]), "win": mean(wins),
            "win_se": math.sqrt(max(mean(wins) * (1 - mean(wins)), 1e-12) / n),
            "gold_se": math.sqrt(sum((g - mean(result["gold"])) ** 2 for g in result["gold"]) / (n - 1) / n)}


def plot(rows: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for seed, points in rows.items():
        steps = sorted(points)
        kl = [points[s]["kl"] for s in steps]
        axes[0].plot(steps, [points[s]["proxy"] for s in steps], "o-", label=f"proxy, seed {seed}")
        axes[0].plot(steps, [points[s]["gold"] for s in steps], "s--", label=f"gold, seed {seed}")
        axes[1].errorbar(steps, [points[s]["win"] for s in steps], yerr=[points[s]["win_se"] for s in steps],
                         marker="o", capsize=3, label=f"seed {seed}")
        axes[2].plot([math.sqrt(max(k, 0.0)) for k in kl], [points[s]["gold"] - points[0]["gold"] for s in steps],
                     "s--", label=f"gold, seed {seed}")
        axes[2].plot([math.sqrt(max(k, 0.0)) for k in kl], [points[s]["proxy"] - points[0]["proxy"] for s in steps],
                     "o-", label=f"proxy, seed {seed}")
    axes[0].set(xlabel="GRPO step", ylabel="mean reward (greedy, held-out)", title="proxy and gold reward")
    axes[1].axhline(0.5, color="grey", lw=0.8)
    axes[1].set(xlabel="GRPO step", ylabel="gold win rate over step 0", title="gold win rate (+- 1 s.e.)")
    axes[2].set(xlabel="sqrt KL(pi || pi_0)  (nats^0.5)", ylabel="reward gain over step 0", title="gain against KL")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_rlhf")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts evaluated per checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra overrides for grpo_hh.yaml")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    if args.child:  # one evaluation in this process: kind, output file, arguments
        kind, target, *rest = args.child
        result = rm_accuracy(*rest) if kind == "rm" else evaluate_policy(*rest[:4], int(rest[4]), args.overrides)
        Path(target).write_text(json.dumps(result))
        return 0

    def child(kind: str, target: Path, *rest) -> dict:
        if not target.is_file():
            print(f"evaluating {kind} -> {target.relative_to(out)}", flush=True)
            subprocess.run([sys.executable, __file__, "--out", str(out), *[x for o in args.overrides for x in ("--set", o)],
                            "--child", kind, str(target), *map(str, rest)], cwd=REPO, check=True)
        return json.loads(target.read_text())

    from rlpost.config import load_config
    rm_cfg = load_config(REPO / "configs" / "rm_hh.yaml")
    grpo_cfg = load_config(REPO / "configs" / "grpo_hh.yaml", args.overrides)
    rm_steps, steps, every = rm_cfg.train.max_steps, grpo_cfg.train.max_steps, grpo_cfg.checkpoint.every
    proxy, gold = out / "rm_proxy", out / "rm_gold"
    for run, extra in ((proxy, []), (gold, [GOLD_ROWS])):
        if not finished(run, rm_steps):
            rlpost_train("configs/rm_hh.yaml", [f"run.output_dir={run}", *extra])
    proxy_hf, gold_hf = (str(r / "checkpoints" / f"step_{rm_steps}" / "hf") for r in (proxy, gold))
    rm_acc = {name: child("rm", out / f"rm_{name}_accuracy.json", hf) for name, hf in (("proxy", proxy_hf), ("gold", gold_hf))}

    base = grpo_cfg.model.name
    evals = {0: child("policy", out / "eval_step0.json", base, base, proxy_hf, gold_hf, args.prompts)}
    rows: dict = {}
    for seed in args.seeds:
        run = out / f"grpo_seed{seed}"
        if not finished(run, steps):
            rlpost_train("configs/grpo_hh.yaml", [*args.overrides, f"run.output_dir={run}", f"run.seed={seed}",
                                                  f"reward.models=[{{model: {proxy_hf}, name: proxy, batch_size: 16}}]",
                                                  f"checkpoint.every={every}", f"checkpoint.keep_last={steps // every + 1}"])
        rows[seed] = {0: summarise(evals[0], evals[0])}
        for step in range(every, steps + 1, every):
            hf = run / "checkpoints" / f"step_{step}" / "hf"
            result = child("policy", out / f"eval_seed{seed}_step{step}.json", hf, base, proxy_hf, gold_hf, args.prompts)
            rows[seed][step] = summarise(result, evals[0])

    lines = [f"Reward models (pairwise accuracy on the {rm_acc['proxy']['pairs']} reserved HH pairs, rows "
             f"{RESERVED_ROWS[0]}-{RESERVED_ROWS[1] - 1}; s.e. {rm_acc['proxy']['se']:.3f}): proxy "
             f"{rm_acc['proxy']['accuracy']:.3f}, gold {rm_acc['gold']['accuracy']:.3f}", "",
             f"GRPO against the proxy; {args.prompts} held-out prompts, greedy answers (KL on one sampled answer each)", "",
             "| seed | step | proxy reward | gold reward (s.e.) | gold win rate over step 0 (s.e.) | KL(pi \\|\\| pi_0) nats | length |",
             "|---|---|---|---|---|---|---|"]
    for seed, points in rows.items():
        for step, r in sorted(points.items()):
            lines.append(f"| {seed} | {step} | {r['proxy']:.3f} | {r['gold']:.3f} ({r['gold_se']:.3f}) | "
                         f"{r['win']:.3f} ({r['win_se']:.3f}) | {r['kl']:.3f} | {r['length']:.1f} |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps({"rm": rm_acc, "policy": rows}, indent=2))
    plot(rows, out / "rlhf.png")
    print(f"plot: {out / 'rlhf.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
