"""The implicit PRM at a budget that can show it: a learning curve of ProcessBench F1 over at least
one epoch of outcome-labelled step solutions, the step-reward rule beside the q rule, and best-of-N
with a PRM trained the same way (docs/implicit_prm.md).

    .venv/bin/python scripts/bench_prm.py [--out runs/bench_prm] [--stages arith gsm8k bon]
                                          [--epochs 1] [--every 25] [--gsm8k-train 2000]

Stages, each skipped where its result exists (a stopped run continues where it stopped; runs/ does
not outlive a session, so run a stage whole in one session):
  data   scripts/make_step_data.py: 4,000 arithmetic chains (seed 1) to train on, 600 held out
         (seed 2); GSM8K-derived solutions from the shared train file (--gsm8k-train) and 600 from the
         test file. Training reads only each row's final-answer verdict, never its step labels.
  arith  `rlpost train configs/prm_steps.yaml` for --epochs epochs of the chains (32 per step), a
         checkpoint every --every steps; `rlpost eval-rm --prm CKPT --process` on the 600 held-out
         chains at each checkpoint (threshold tuned on 300, F1 on the other 300; the q rule and the
         step-reward rule), the training loss per stretch of steps between checkpoints
  gsm8k  the same on the GSM8K-derived set (goal: above the outcome oracle "flag the last step")
  bon    best-of-N with the GSM8K PRM on configs/grpo_gsm8k.yaml's held-out prompts (--bon-prompts),
         N = 1 2 4 8: PRM-min (min_step_value) against majority vote (goal: +5 points at N = 8)
Then the table (OUT/table.md) and the curve (OUT/prm_curve.png). Every stage runs in its own process,
one after the other (two torch jobs on two cores run several times slower).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
PER_STEP = 32  # configs/prm_steps.yaml: rollout.prompts_per_step


def sh(*cmd: str) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)


def rlpost(*args: str) -> None:
    sh("-c", "import sys; from rlpost.cli import main; sys.exit(main())", *args)


def make_data(out: Path, gsm8k_train: int, names: list[str]) -> dict[str, Path]:
    files = {name: out / "data" / f"{name}.jsonl" for name in names}
    recipes = {"arith_train": ["arithmetic", "--n", "4000", "--seed", "1"],
               "arith_test": ["arithmetic", "--n", "600", "--seed", "2"],
               "gsm8k_train": ["gsm8k", "--source", str(GSM8K / "train.jsonl"), "--n", str(gsm8k_train), "--seed", "1"],
               "gsm8k_test": ["gsm8k", "--source", str(GSM8K / "test.jsonl"), "--n", "600", "--seed", "2"]}
    for name, path in files.items():
        if not path.is_file():
            sh("scripts/make_step_data.py", *recipes[name], "--out", str(path))
    return files


def rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def prm_curve(name: str, out: Path, train: Path, test: Path, epochs: float, every: int, overrides: list[str]) -> dict:
    """Train for `epochs` over `train`, evaluate every checkpoint on `test`; the curve's points."""
    steps = max(every, math.ceil(epochs * rows(train) / PER_STEP / every) * every)  # at least `epochs`
    run = out / f"prm_{name}"
    if not (run / "checkpoints" / f"step_{steps}" / "hf").is_dir():
        rlpost("train", "configs/prm_steps.yaml", "--no-progress", "--set", f"run.output_dir={run}",
               "--set", f"data.source={train}", "--set", f"train.max_steps={steps}", "--set", f"checkpoint.every={every}",
               "--set", f"checkpoint.keep_last={steps // every + 1}", *[x for o in overrides for x in ("--set", o)], *(["--resume", str(run)] if (run / "checkpoints").is_dir() else []))
    from rlpost.metrics import read_metrics
    losses = [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]
    points = {}
    for step in range(every, steps + 1, every):
        report = out / f"eval_{name}_step{step}" / "rm_eval.json"
        if not report.is_file():
            rlpost("eval-rm", "--prm", str(run / "checkpoints" / f"step_{step}"), "--process", str(test),
                   "--out", str(report.parent))
        process = json.loads(report.read_text())["process"]
        stretch = [loss for s, loss in losses if step - every < s <= step]
        points[step] = {"loss": sum(stretch) / len(stretch), "q": process["scorer"],
                        "r": process["scorer_step_reward"], "oracle_last_step": process["flag_last_step"],
                        "untrained": process["untrained_prm"],
                        "items": process["reported_on"]}
    return {"steps": steps, "epochs": steps * PER_STEP / rows(train), "train_rows": rows(train), "points": points}


def curve_lines(name: str, curve: dict) -> list[str]:
    first = next(iter(curve["points"].values()))
    last, untrained = first["oracle_last_step"], first["untrained"]
    lines = [f"### {name}: {curve['train_rows']} training solutions, {curve['steps']} steps x {PER_STEP} "
             f"({curve['epochs']:.2f} epochs); F1 on {next(iter(curve['points'].values()))['items']} held-out items",
             "", "| step | train CE loss (mean since the last point) | q rule: acc. err. / acc. correct / F1 | "
             "step-reward rule: F1 | q rule, oracle threshold: F1 |", "|---|---|---|---|---|"]
    for step, p in curve["points"].items():
        q, r = p["q"], p["r"]
        lines.append(f"| {step} | {p['loss']:.4f} | {q['acc_erroneous']:.3f} / {q['acc_correct']:.3f} / **{q['f1']:.3f}** | "
                     f"{r['f1']:.3f} | {q['oracle']['f1']:.3f} |")
    lines += ["", f"Outcome oracle (flag the last step of every wrong answer) on the same items: F1 {last['f1']:.3f}; "
              f"the untrained PRM (q = 0): F1 {untrained['f1']:.3f}.", ""]
    return lines


def plot(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        steps = list(curve["points"])
        ax.plot(steps, [curve["points"][s]["q"]["f1"] for s in steps], "o-", label="F1, q rule")
        ax.plot(steps, [curve["points"][s]["r"]["f1"] for s in steps], "s--", label="F1, step-reward rule")
        ax.axhline(curve["points"][steps[0]]["oracle_last_step"]["f1"], color="grey", lw=0.8, label="outcome oracle")
        twin = ax.twinx()
        twin.plot(steps, [curve["points"][s]["loss"] for s in steps], "x:", color="tab:red", label="train CE loss")
        twin.set_ylabel("CE loss")
        ax.set(xlabel="PRM training step", ylabel="held-out F1", title=name)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_prm")
    parser.add_argument("--stages", nargs="+", default=["arith", "gsm8k", "bon"], choices=["arith", "gsm8k", "bon"])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--every", type=int, default=25, help="PRM steps between checkpoints (curve points)")
    parser.add_argument("--gsm8k-train", type=int, default=2000, help="GSM8K-derived training solutions")
    parser.add_argument("--bon-prompts", type=int, default=100)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra overrides for the PRM training runs (configs/prm_steps.yaml)")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    if "gsm8k" in args.stages or "bon" in args.stages:
        if not (GSM8K / "train.jsonl").is_file():
            print(f"bench_prm: {GSM8K} has no GSM8K train.jsonl / test.jsonl", file=sys.stderr)
            return 2
    sets = (["arith"] if "arith" in args.stages else []) + (["gsm8k"] if {"gsm8k", "bon"} & set(args.stages) else [])
    files = make_data(out, args.gsm8k_train, [f"{s}_{part}" for s in sets for part in ("train", "test")])
    curves, lines = {}, []
    if "arith" in args.stages:
        curves["arithmetic chains"] = prm_curve("arith", out, files["arith_train"], files["arith_test"], args.epochs, args.every,
                                                 args.overrides)
    if "gsm8k" in args.stages or "bon" in args.stages:
        curves["GSM8K-derived"] = prm_curve("gsm8k", out, files["gsm8k_train"], files["gsm8k_test"], args.epochs, args.every,
                                                 args.overrides)
    for name, curve in curves.items():
        lines += curve_lines(name, curve)
    if "bon" in args.stages:
        gsm8k = curves["GSM8K-derived"]
        report = out / "eval_bon" / "rm_eval.json"
        if not report.is_file():
            rlpost("eval-rm", "--prm", str(out / "prm_gsm8k" / "checkpoints" / f"step_{gsm8k['steps']}"),
                   "--best-of-n", "configs/grpo_gsm8k.yaml", "--set", f"data.source={GSM8K / 'train.jsonl'}",
                   "--set", f"data.test_source={GSM8K / 'test.jsonl'}", "--n", "1", "2", "4", "8",
                   "--prompts", str(args.bon_prompts), "--out", str(report.parent))
        bon = json.loads(report.read_text())["best_of_n"]
        lines += [f"### Best-of-N with the GSM8K PRM ({bon['prompts']} held-out GSM8K prompts, the policy's samples)", "",
                  "| N | PRM-min (min_step_value) | PRM sum (r(y)) | majority vote | random | pass@N |",
                  "|---|---|---|---|---|---|"]
        for n, row in bon["accuracy"].items():
            lines.append(f"| {n} | {row['min_step_value']:.3f} | {row['sum_step_reward']:.3f} | {row['majority_vote']:.3f} | "
                         f"{row['random']:.3f} | {row['pass@n']:.3f} |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps(curves, indent=2))
    if curves:
        plot(curves, out / "prm_curve.png")
        print(f"plot: {out / 'prm_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
