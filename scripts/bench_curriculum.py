"""Uniform GRPO vs CurES on a pool of mixed difficulty, same model, same rollout budget.

    .venv/bin/python scripts/bench_curriculum.py --out runs/bench_curriculum [--seeds 0 1] [--steps 10]

The pool (40 train prompts, so each is seen more than once) mixes trivially easy problems (1-digit +),
learnable ones (1-digit *, 2-digit +) and far too
hard ones (3-digit x 2-digit). Every run trains SmolLM2-135M-Instruct with the same prompts per step
and samples per step; CurES also pays for its difficulty pass (counted in its rollouts). Prints a
table (held-out accuracy after each eval, rollouts used, zero-advantage fraction) and writes
curriculum.png and results.json into --out.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlpost.config import ArithmeticConfig, load_config  # noqa: E402
from rlpost.data import arithmetic_splits  # noqa: E402
from rlpost.metrics import read_metrics  # noqa: E402

LEVELS = {  # name: (generator settings, prompts in the train pool, in the test set)
    "easy": (ArithmeticConfig(digits=1, operations=["+"]), 10, 15),
    "medium": (ArithmeticConfig(digits=1, operations=["*"]), 10, 15),
    "medium2": (ArithmeticConfig(digits=2, operations=["+"]), 10, 15),
    "hard": (ArithmeticConfig(digits=3, num_operations=2, operations=["*"]), 10, 15),
}


def write_pool(out: Path, seed: int = 0) -> tuple[Path, Path]:
    train_rows, test_rows = [], []
    for name, (cfg, n_train, n_test) in LEVELS.items():
        train, test = arithmetic_splits(cfg.model_copy(update={"train_size": n_train, "test_size": n_test}), seed)
        train_rows += [{"question": p.question, "answer": p.answer, "level": name} for p in train]
        test_rows += [{"question": p.question, "answer": p.answer, "level": name} for p in test]
    random.Random(seed).shuffle(train_rows)
    paths = out / "pool_train.jsonl", out / "pool_test.jsonl"
    for path, rows in zip(paths, (train_rows, test_rows)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def summarise(run_dir: Path, sampler: str, seed: int, per_step_rollouts: int) -> dict:
    """Everything the table needs, read back from the run's metrics.jsonl."""
    rows = read_metrics(run_dir)
    init = next((r for r in rows if "init/rollouts" in r), {})
    init_rollouts = init.get("init/rollouts", 0.0)
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    train_rows = [r for r in rows if "reward" in r]
    zero_adv = [1 - r["curriculum/effective_samples"] / per_step_rollouts for r in train_rows]
    return {"sampler": sampler, "seed": seed, "init_rollouts": init_rollouts,
            "curve": [(step, init_rollouts + step * per_step_rollouts, acc) for step, acc in evals],
            "zero_advantage_fraction": sum(zero_adv) / len(zero_adv),
            "init_seconds": init.get("init/seconds", 0.0),
            "wall_s": rows[-1]["time"] - rows[0]["time"]}


def run(out: Path, sampler: str, seed: int, steps: int, eval_every: int, train_path: Path, test_path: Path,
        model: str, init_rollouts: int, reuse: bool) -> dict:
    from rlpost.trainer import train

    run_dir = out / f"{sampler}_seed{seed}"
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "grpo_math.yaml", [
        f"run.output_dir={run_dir}", f"run.seed={seed}", f"data.source={train_path}", f"data.test_source={test_path}",
        f"train.max_steps={steps}", f"eval.every={eval_every}", "checkpoint.every=0", "checkpoint.keep_last=1",
        f"curriculum.sampler={sampler}", f"model.name={model}", f"curriculum.init_rollouts={init_rollouts}"])
    per_step_rollouts = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if reuse and (run_dir / "metrics.jsonl").exists():
        rows = read_metrics(run_dir)
        if any(r.get("step") == steps and "eval/accuracy" in r for r in rows):
            print(f"reusing finished run {run_dir}")
            return summarise(run_dir, sampler, seed, per_step_rollouts)
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: a stale run would mix in
    train(cfg, show_progress=False)
    return summarise(run_dir, sampler, seed, per_step_rollouts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_curriculum")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--init-rollouts", type=int, default=2, help="CurES difficulty pass, per prompt")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="tiny-random for a smoke test")
    parser.add_argument("--fresh", action="store_true", help="rerun runs that already finished in --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_path, test_path = write_pool(out)
    results = [run(out, sampler, seed, args.steps, args.eval_every, train_path, test_path, args.model,
                   args.init_rollouts, reuse=not args.fresh)
               for seed in args.seeds for sampler in ("uniform", "cures")]
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\n{'sampler':8} {'seed':>4} {'init rollouts':>13} {'acc@0':>6} " +
          " ".join(f"{'acc@' + str(s):>7}" for s, _, _ in results[0]["curve"][1:]) +
          f" {'rollouts':>8} {'zero-adv':>8} {'wall s':>7}")
    for r in results:
        accs = " ".join(f"{acc:7.3f}" for _, _, acc in r["curve"][1:])
        print(f"{r['sampler']:8} {r['seed']:>4} {r['init_rollouts']:>13.0f} {r['curve'][0][2]:6.3f} {accs} "
              f"{r['curve'][-1][1]:>8.0f} {r['zero_advantage_fraction']:>8.3f} {r['wall_s']:>7.0f}")
    for sampler in ("uniform", "cures"):
        finals = [r["curve"][-1][2] for r in results if r["sampler"] == sampler]
        print(f"{sampler}: final held-out accuracy mean {sum(finals) / len(finals):.3f} over seeds {args.seeds} "
              f"(min {min(finals):.3f}, max {max(finals):.3f})")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        xs, ys = [c[1] for c in r["curve"]], [c[2] for c in r["curve"]]
        ax.plot(xs, ys, marker="o", linestyle="-" if r["sampler"] == "cures" else "--",
                label=f"{r['sampler']} seed {r['seed']}")
    ax.set_xlabel("rollouts used (CurES includes its difficulty pass)")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curriculum.png", dpi=100)
    print(f"plot: {out / 'curriculum.png'}")


if __name__ == "__main__":
    main()
