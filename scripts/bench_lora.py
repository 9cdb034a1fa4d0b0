"""Full fine-tuning vs LoRA (r 16, r 1) on the main job, side by side, one seed.

    .venv/bin/python scripts/bench_lora.py [--steps 20] [--seed 0] [--out runs/bench_lora] [--set KEY=VALUE ...]

Every arm runs `rlpost train configs/grpo_math.yaml` (SmolLM2-135M-Instruct, GRPO on one-digit
arithmetic, 100 held-out prompts) as its own process, with the same seed and data; only the model's
LoRA settings and the learning rate differ:

    full     model.lora=null, train.lr = the recipe's (2e-5)
    lora16   model.lora.r=16, alpha 32, every linear layer, lr = --lora-lr (default 10 x the recipe's)
    lora1    model.lora.r=1,  alpha 32, every linear layer, the same lr

Why 10 x and the same lr for both ranks: peft scales B A by alpha / r and starts B at 0, so after the
first Adam steps (each entry of B moves by about lr) the update of W is (alpha / r) sum_k b_k a_k^T over
r terms: its size is about alpha * lr * |a| whatever r is, so one lr serves every rank at fixed alpha.
Against full fine-tuning, where Adam moves every entry of W by about lr, the low-rank update is one
direction per rank and needs a larger lr to move the model as much in 20 steps; ~10 x is the ratio
reported as optimal for LoRA on RL and SFT ("LoRA Without Regret", Schulman et al., Thinking Machines,
2025) and is the default here (--lora-lr overrides it).

Per arm: held-out greedy accuracy after the last step (the trainer's final eval), peak RSS of the
training process (its own maximum resident set, from wait4), mean seconds per step, mean weight-sync
seconds per step (the trainer's `weight_sync_s`), and the size of the final checkpoint on disk
(LoRA: the adapters, their optimizer state and the trainer state; full: the model twice, HF and
DeepSpeed, plus Adam's two moments). Prints a markdown table (paste it into docs/lora.md) and writes
results.json in --out. A finished arm in --out is reused.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/grpo_math.yaml"
sys.path.insert(0, str(REPO))


def recipe_lr() -> float:
    from rlpost.config import load_config
    return load_config(REPO / CONFIG).train.lr


def arms(lora_lr: float) -> dict[str, list[str]]:
    lora = ["model.lora.alpha=32", f"train.lr={lora_lr}"]  # every linear layer: the default target
    return {"full": ["model.lora=null"], "lora16": ["model.lora.r=16", *lora], "lora1": ["model.lora.r=1", *lora]}


def run_arm(out: Path, name: str, overrides: list[str]) -> dict:
    """One `rlpost train` process; its peak RSS from the kernel's accounting of that process."""
    run_dir = out / name
    result_file = run_dir / "bench.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "rlpost.cli", "train", CONFIG, "--no-progress", "--set", f"run.output_dir={run_dir}",
           *(x for o in overrides for x in ("--set", o))]
    with open(run_dir / "bench.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed (exit {os.waitstatus_to_exitcode(status)}), see {run_dir / 'bench.log'}:\n"
                         + (run_dir / "bench.log").read_text()[-3000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_s" in r]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    checkpoint = (run_dir / "checkpoints" / "latest").resolve()
    result = {
        "arm": name, "overrides": overrides,
        "accuracy_before": evals[0] if len(evals) > 1 else None, "accuracy_after": evals[-1],
        "peak_rss_gib": usage.ru_maxrss / 2**20,  # ru_maxrss is in KiB on Linux
        "s_per_step": statistics.mean(r["step_s"] for r in steps),
        "sync_s_per_step": statistics.mean(r.get("weight_sync_s", 0.0) for r in steps),
        "checkpoint_mib": sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) / 2**20,
        "steps": len(steps),
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict]) -> str:
    lines = ["| arm | held-out accuracy (before -> after) | peak RSS | s / step | weight sync s / step | checkpoint |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        before = f"{r['accuracy_before']:.3f} -> " if r["accuracy_before"] is not None else ""
        lines.append(f"| {r['arm']} | {before}{r['accuracy_after']:.3f} | {r['peak_rss_gib']:.2f} GiB | "
                     f"{r['s_per_step']:.1f} | {r['sync_s_per_step']:.3f} | {r['checkpoint_mib']:.1f} MiB |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps per arm (train.max_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-lr", type=float, default=None, help="default: 10 x the recipe's train.lr")
    parser.add_argument("--arms", nargs="+", default=["full", "lora16", "lora1"], choices=["full", "lora16", "lora1"])
    parser.add_argument("--out", default="runs/bench_lora")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every arm (e.g. a smoke test: --set model.name=tiny-random)")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    if args.lora_lr is None:
        args.lora_lr = 10 * recipe_lr()
    common = [f"train.max_steps={args.steps}", f"run.seed={args.seed}", "checkpoint.every=0", *args.overrides]
    results = []
    for name in args.arms:
        print(f"{name} ...", flush=True)
        results.append(run_arm(out, name, [*common, *arms(args.lora_lr)[name]]))
        print(f"  {json.dumps(results[-1])}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{args.steps} steps of {CONFIG}, seed {args.seed}, LoRA lr {args.lora_lr:g} (full: the recipe's)\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
