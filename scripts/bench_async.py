"""The main job side by side: colocated sync, colocated APRIL, rollout workers, and workers with APRIL.

    .venv/bin/python scripts/bench_async.py [--out runs/bench_async] [--steps 10] [--engine vllm] [--set k=v ...]

Arms (each `rlpost train configs/grpo_math.yaml` in its own process, one after the other, the same
seed and steps; each skipped when its run finished, so a stopped benchmark continues):
  sync        rollout.placement=colocated, rollout.scheduler=sync: rollout, then train, then sync
  april       colocated, rollout.scheduler=april
  workers-k0  one rollout worker, max_staleness 0 (synchronous through the worker)
  workers-k1  one rollout worker, max_staleness 1: it generates the next step while the learner trains
  april-k1    one rollout worker, rollout.scheduler=april, max_staleness 1: APRIL's unfinished requests
              go on generating while the learner trains (rollout/april.py)
With workers the cores are split: the worker and the learner get half each (rollout.worker_threads /
learner_threads); colocated runs use them all, one phase at a time.

Table: seconds per step (mean over steps 2.., step 1 pays start-up), finished tokens per second of
step time, the rollout and train phases (rollout_s, and step_s - rollout_s), the share of trained
tokens sampled by an older policy, rollout/logprob_diff, held-out greedy accuracy after the last
step. With rollout and train phases R and T measured in the sync arm, the ideal of an overlapped run
on separate devices is max(R, T) per step instead of R + T: the table prints that prediction too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def arms(cores: int) -> dict[str, list[str]]:
    half = [f"rollout.worker_threads={max(1, cores // 2)}", f"rollout.learner_threads={max(1, cores - cores // 2)}"]
    return {"sync": [],
            "april": ["rollout.scheduler=april"],
            "workers-k0": ["rollout.placement=workers", "rollout.max_staleness=0", *half],
            "workers-k1": ["rollout.placement=workers", "rollout.max_staleness=1", *half],
            "april-k1": ["rollout.placement=workers", "rollout.scheduler=april", "rollout.max_staleness=1", *half]}


def run(name: str, out: Path, steps: int, overrides: list[str]) -> Path:
    from rlpost.metrics import read_metrics
    run_dir = out / name
    if (run_dir / "metrics.jsonl").is_file() and any(r.get("step") == steps and "eval/accuracy" in r
                                                     for r in read_metrics(run_dir)):
        return run_dir  # finished earlier
    cmd = [sys.executable, "-c", "import sys; from rlpost.cli import main; sys.exit(main())", "train",
           "configs/grpo_math.yaml", "--no-progress", "--set", f"run.output_dir={run_dir}",
           "--set", f"train.max_steps={steps}", "--set", "checkpoint.every=0", *[x for o in overrides for x in ("--set", o)]]
    print("$", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return run_dir


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(run_dir: Path) -> dict:
    from rlpost.metrics import read_metrics
    rows = [r for r in read_metrics(run_dir) if "reward" in r]
    later = rows[1:] or rows
    evals = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    step_s = mean(r["step_s"] for r in later)
    rollout_s = mean(r["rollout_s"] for r in later)
    # APRIL: share of trained tokens from an older policy; workers: mean versions behind per token
    stale = mean(r.get("april/stale_fraction", r.get("rollout/staleness_mean", 0.0)) for r in later)
    return {"step_s": step_s, "tokens_per_s": mean(r["tokens_per_s"] for r in later), "rollout_s": rollout_s,
            "train_s": step_s - rollout_s, "stale": stale,
            "logprob_diff": mean(r.get("rollout/logprob_diff", float("nan")) for r in later),
            "accuracy": evals[-1]["eval/accuracy"] if evals else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_async")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 2
    results = {}
    for name, extra in arms(cores).items():
        run_dir = run(name, out, args.steps, [f"rollout.engine={args.engine}", *extra, *args.overrides])
        results[name] = summarise(run_dir)
    sync = results["sync"]
    lines = [f"| arm | s / step | x sync | tokens / s | rollout s | train s | stale (APRIL: share; workers: versions) | "
             f"logprob diff | "
             f"held-out accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_s']:.2f} | {sync['step_s'] / r['step_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['rollout_s']:.2f} | {r['train_s']:.2f} | {r['stale']:.3f} | {r['logprob_diff']:.2e} | "
                     f"{r['accuracy']:.3f} |")
    ideal = max(sync["rollout_s"], sync["train_s"])
    lines.append(f"\nSync arm phases R = {sync['rollout_s']:.2f} s, T = {sync['train_s']:.2f} s: overlapped on separate "
                 f"devices a step would take max(R, T) = {ideal:.2f} s, {sync['step_s'] / ideal:.2f}x the sync step.")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
