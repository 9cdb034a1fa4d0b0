"""Uniform GRPO vs CurES on a pool whose difficulty varies continuously, at equal rollouts (docs/cures.md).

    .venv/bin/python scripts/bench_curriculum.py [--out runs/bench_curriculum] [--seeds 0 1 2]

Stages, each skipped when done (finished runs are kept in docs/results/bench_curriculum/, see
scripts/studies.py, so the study goes on in a fresh checkout):
  warm   the starting policy: the main job (configs/grpo_math.yaml, seed 0, 20 steps of one-digit
         arithmetic). The base SmolLM2-135M-Instruct samples at temperature 1 solve almost nothing
         (measured: 9-15 % of one-digit problems, 0-4 % of the rest), so its accuracies bunch at 0;
         after the main job they spread over 0..1 across the levels below.
  pool   8 levels (one-digit + to two-digit two-operation chains), 32 training prompts and 40 held-out
         prompts each (256 and up to 320, a held-out question that is also a training one is dropped).
         Every training prompt's accuracy under the starting policy is measured with 8 samples at the
         rollout temperature and written to pool_accuracy.json (the histogram in the table).
  runs   per seed: uniform GRPO for --steps steps; CurES with the released temperature
         (tau_mode=code) and with tau=0.1 (fixed), each paying its difficulty pass (2 rollouts of each
         of the 256 prompts = 512 rollouts = 8 steps) out of the same budget, so it trains
         --steps - 8 steps. 64 rollouts per step in every arm, no dynamic sampling (no regenerated
         groups: the budget is exact). Greedy held-out accuracy every 4 steps.
Prints the table (OUT/table.md) and writes OUT/curriculum.png. Goals: CurES reaches uniform's final
accuracy in <= 0.7x the rollouts, or is >= 2 points higher at equal budget.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEPT = REPO / "docs" / "results" / "bench_curriculum"  # finished runs' metrics and the pool's accuracies
sys.path.insert(0, str(REPO))

from scripts.studies import run, spread  # noqa: E402

LEVELS = {  # name: ArithmeticConfig settings; chosen from a probe of the warm policy (docs/cures.md)
    "1d+": {"digits": 1, "operations": ["+"]},
    "1d*": {"digits": 1, "operations": ["*"]},
    "2d+": {"digits": 2, "operations": ["+"]},
    "2d-": {"digits": 2, "operations": ["-"]},
    "2d*": {"digits": 2, "operations": ["*"]},
    "3d+": {"digits": 3, "operations": ["+"]},
    "1d2op": {"digits": 1, "num_operations": 2, "operations": ["+", "-", "*"]},
    "2d2op": {"digits": 2, "num_operations": 2, "operations": ["+", "-"]},
}
TRAIN_PER_LEVEL, TEST_PER_LEVEL, PROBE_SAMPLES, INIT_ROLLOUTS, EVAL_EVERY = 32, 40, 8, 2, 4
WARM_KEY = ["configs/grpo_math.yaml", "run.seed=0", "train.max_steps=20"]  # names the starting policy


def warm_policy(out: Path) -> Path:
    """The main job's final weights (a Hugging Face folder), trained here unless already there."""
    hf = out / "warm" / "checkpoints" / "step_20" / "hf"
    if not (hf / "config.json").is_file():
        import shutil
        import subprocess
        shutil.rmtree(out / "warm", ignore_errors=True)
        cmd = [sys.executable, "-c", "import sys; from rlpost.cli import main; sys.exit(main())", "train",
               "configs/grpo_math.yaml", "--no-progress", "--set", f"run.output_dir={out / 'warm'}",
               "--set", "run.seed=0", "--set", "train.max_steps=20", "--set", "checkpoint.every=20"]
        print("$", " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    return hf


def write_pool(out: Path) -> tuple[Path, Path, list[dict]]:
    from rlpost.config import ArithmeticConfig
    from rlpost.data import arithmetic_splits
    train_rows, test_rows = [], []
    for name, settings in LEVELS.items():
        cfg = ArithmeticConfig(**settings, train_size=TRAIN_PER_LEVEL, test_size=TEST_PER_LEVEL)
        train, test = arithmetic_splits(cfg, seed=0)
        train_rows += [{"question": p.question, "answer": p.answer, "level": name} for p in train]
        test_rows += [{"question": p.question, "answer": p.answer, "level": name} for p in test]
    seen = {r["question"] for r in train_rows}  # levels overlap (a 2-digit sum may have 1-digit operands)
    test_rows = [r for r in test_rows if r["question"] not in seen]
    random.Random(0).shuffle(train_rows)
    paths = out / "pool_train.jsonl", out / "pool_test.jsonl"
    for path, rows in zip(paths, (train_rows, test_rows)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return *paths, train_rows


def measure_pool(policy: Path, rows: list[dict], out: Path) -> list[float]:
    """Each training prompt's accuracy under `policy`: PROBE_SAMPLES samples at the rollout temperature."""
    path = KEPT / "pool_accuracy.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept["questions"] == [r["question"] for r in rows]:
            return kept["accuracy"]
    import torch

    from rlpost.config import load_config
    from rlpost.data import Problem, render_prompt
    from rewards.math import MathReward
    from rollout.hf_engine import HFEngine
    from rollout.models import load_model, load_tokenizer
    from rollout.types import SamplingParams
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", [])
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.model.name)
    engine = HFEngine(load_model(str(policy)), tokenizer, max_batch_size=128)
    verifier = MathReward(timeout_s=cfg.reward.timeout_s)
    problems = [Problem(r["question"], r["answer"]) for r in rows]
    accuracy = []
    for start in range(0, len(problems), 16):
        chunk = problems[start:start + 16]
        ids = [render_prompt(tokenizer, p, cfg.data) for p in chunk for _ in range(PROBE_SAMPLES)]
        samples = engine.generate(ids, SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens,
                                                      temperature=cfg.rollout.temperature, seed=start))
        right = verifier.verdicts([p for p in chunk for _ in range(PROBE_SAMPLES)], samples)
        accuracy += [sum(right[i * PROBE_SAMPLES:(i + 1) * PROBE_SAMPLES]) / PROBE_SAMPLES for i in range(len(chunk))]
    KEPT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"policy": WARM_KEY, "samples": PROBE_SAMPLES,
                                "questions": [r["question"] for r in rows], "accuracy": accuracy}))
    return accuracy


def curve(run_dir: Path, offset: int, per_step: int) -> dict:
    """{step: accuracy} at each evaluation, the rollouts used by then (the difficulty pass included)."""
    from rlpost.metrics import read_metrics
    rows = read_metrics(run_dir)
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    signal = [r["curriculum/effective_samples"] / per_step for r in rows if "curriculum/effective_samples" in r]
    return {"accuracy": evals, "rollouts": {s: offset + s * per_step for s in evals},
            "signal": statistics.mean(signal) if signal else None}


def at_budget(c: dict, budget: int) -> float:
    """Accuracy at `budget` rollouts, linear between the evaluations around it."""
    pts = sorted((c["rollouts"][s], c["accuracy"][s]) for s in c["accuracy"])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= budget <= x1:
            return y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
    raise ValueError(f"no evaluation around {budget} rollouts")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, seeds in results.items():
        first = next(iter(seeds.values()))
        steps = sorted(first["accuracy"])
        xs = [first["rollouts"][s] for s in steps]
        ax.plot(xs, [statistics.mean(c["accuracy"][s] for c in seeds.values()) for s in steps], "o-",
                label=f"{arm} (mean of {len(seeds)} seeds)")
        for c in seeds.values():
            ax.plot(xs, [c["accuracy"][s] for s in steps], alpha=0.25, color=ax.lines[-1].get_color())
    ax.set(xlabel="rollouts used (CurES: its difficulty pass included)", ylabel="held-out greedy accuracy",
           title="CurES vs uniform prompt sampling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_curriculum")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=36, help="uniform's steps; CurES trains 8 fewer")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_path, test_path, rows = write_pool(out)
    policy = None
    if not (KEPT / "pool_accuracy.json").is_file() or any(not (KEPT).glob(f"{a}_seed{s}-*.jsonl")
                                                          for a in ("uniform", "cures_code", "cures_fixed")
                                                          for s in args.seeds):
        policy = warm_policy(out)
    accuracy = measure_pool(policy, rows, out)

    from rlpost.config import load_config
    n_test = len(test_path.read_text().splitlines())
    common = [f"data.source={train_path}", f"data.test_source={test_path}", "grpo.dynamic_sampling=false",
              f"eval.every={EVAL_EVERY}", f"eval.num_prompts={n_test}", "eval.pass_k=1", "eval.at_start=true",
              "checkpoint.every=12", "checkpoint.keep_last=1"]
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", common)
    per_step = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    init_steps = INIT_ROLLOUTS * len(rows) // per_step
    arms = {"uniform": (["curriculum.sampler=uniform"], args.steps, 0),
            "cures_code": (["curriculum.sampler=cures", "curriculum.tau_mode=code", f"curriculum.init_rollouts={INIT_ROLLOUTS}"],
                           args.steps - init_steps, init_steps * per_step),
            "cures_fixed": (["curriculum.sampler=cures", "curriculum.tau_mode=fixed", "curriculum.tau=0.1",
                             f"curriculum.init_rollouts={INIT_ROLLOUTS}"], args.steps - init_steps, init_steps * per_step)}
    results: dict = {}
    for seed in args.seeds:
        for arm, (extra, steps, offset) in arms.items():
            settings = [*common[2:], *extra, f"train.max_steps={steps}", f"run.seed={seed}"]
            run_dir = run(f"{arm}_seed{seed}", out, "configs/grpo_math.yaml",
                          [f"model.name={policy}", *common, *extra, f"train.max_steps={steps}", f"run.seed={seed}",
                           f"run.output_dir={out / f'{arm}_seed{seed}'}"], steps, KEPT,
                          key=[*WARM_KEY, *settings])
            results.setdefault(arm, {})[seed] = curve(run_dir, offset, per_step)

    bins = [0, 0, 0, 0, 0]  # accuracy 0, (0, .5), .5, (.5, 1), 1
    for a in accuracy:
        bins[0 if a == 0 else 1 if a < 0.5 else 2 if a == 0.5 else 3 if a < 1 else 4] += 1
    budget = args.steps * per_step
    lines = [f"Pool: {len(rows)} training prompts in {len(LEVELS)} levels, {n_test} held-out; the starting policy's "
             f"accuracy per training prompt ({PROBE_SAMPLES} samples): 0: {bins[0]}, (0, 0.5): {bins[1]}, 0.5: {bins[2]}, "
             f"(0.5, 1): {bins[3]}, 1: {bins[4]} (mean {statistics.mean(accuracy):.3f}).",
             f"Budget: {budget} rollouts ({per_step} per step); CurES spends {init_steps * per_step} of them on its "
             f"difficulty pass. Seeds {args.seeds}, mean +- sd.", "",
             "| rollouts | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for x in sorted({x for seeds in results.values() for c in seeds.values() for x in c["rollouts"].values()}):
        cells = []
        for seeds in results.values():
            accs = [c["accuracy"][s] for c in seeds.values() for s, r in c["rollouts"].items() if r == x]
            cells.append(spread(accs) if len(accs) == len(seeds) else "")
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    lines.append("")
    final = statistics.mean(c["accuracy"][args.steps] for c in results["uniform"].values())
    for arm in ("cures_code", "cures_fixed"):
        seeds = results[arm]
        end = statistics.mean(at_budget(c, budget) for c in seeds.values())
        first = next(iter(seeds.values()))
        reach = next((first["rollouts"][s] for s in sorted(first["accuracy"])
                      if statistics.mean(c["accuracy"][s] for c in seeds.values()) >= final), None)
        signal = statistics.mean(c["signal"] for c in seeds.values())
        lines.append(f"{arm}: {end:.3f} at {budget} rollouts vs uniform's {final:.3f} ({end - final:+.3f}); reaches "
                     f"uniform's final mean " + (f"at {reach} rollouts ({reach / budget:.2f}x)" if reach else "at no evaluation")
                     + f"; samples with a learning signal {signal:.1%} (uniform "
                     f"{statistics.mean(c['signal'] for c in results['uniform'].values()):.1%}).")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "curriculum.png")
    print(f"plot: {out / 'curriculum.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
