"""The AlignDistil benchmark (docs/aligndistil.md), every stage a real run of the CLI, per seed:

    .venv/bin/python scripts/bench_aligndistil.py --seeds 0 1 [--variant theorem1:aligndistil.mode=theorem1] \
        [--variant gamma1:aligndistil.gamma=1] [--out runs/bench_aligndistil]

1. pairs (once, shared by the seeds): the base model's own samples of configs/aligndistil_math.yaml
   (8 per prompt, temperature 1), correct over incorrect as the verifier decides: 2 pairs per
   training prompt, 1 per held-out prompt (scripts/sample_pairs.py, vLLM engine).
2. the DPO teacher and the reverse-DPO teacher (configs/dpo_math.yaml, the second with
   data.swap_pairs=true), from the base model.
3. AlignDistil (configs/aligndistil_math.yaml) from the base model, with the two teachers; greedy
   accuracy on the 200 held-out prompts every eval.every steps. Each `--variant NAME:KEY=VALUE[,KEY=VALUE]`
   adds such a run with those config overrides (e.g. a theorem-1 ablation, another gamma).
4. greedy accuracy of each kept DPO checkpoint on the same 200 prompts (`rlpost eval`).
5. held-out pairwise accuracy of the contrastive reward log pi_dpo / pi_rev and of the DPO reward
   log pi_dpo / pi_ref (`rlpost eval-rm --prm DPO --reference REV|BASE --pairwise`).

A stage whose output exists is not run again (delete its folder to redo it), so the script resumes;
a training run killed after a checkpoint is resumed from it, one killed before any starts again.
Prints one table per seed and the goals' verdicts; writes OUT/results.json (keeping the entries of
seeds run earlier, e.g. `--seeds 1` after `--seeds 0 --variant ...`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PY = sys.executable
BASE = "smollm2-135m-instruct"


def run(cmd: list[str], log: Path) -> str:
    """Run a CLI stage, its output to `log`; stop the benchmark with the log's tail if it fails."""
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"stage failed (exit {proc.returncode}, log {log}):\n" + "\n".join(proc.stderr.splitlines()[-5:]))
    print(f"  done in {time.time() - t0:.0f} s", flush=True)
    return proc.stdout


def train(config: str, out: Path, sets: list[str]) -> None:
    from rlpost.checkpoint import resolve_checkpoint
    from rlpost.config import load_config

    cmd = [PY, "-m", "rlpost.cli", "train", config, "--set", f"run.output_dir={out}", *[a for s in sets for a in ("--set", s)]]
    latest = out / "checkpoints" / "latest"
    if latest.exists():
        if int(resolve_checkpoint(latest).name.split("_")[1]) >= load_config(config, sets).train.max_steps:
            return  # finished
        cmd += ["--resume", str(latest)]
    else:
        shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl appends: a run killed early would mix in
    run(cmd, out.with_suffix(".log"))


def eval_accuracy(checkpoint: Path, cache: Path) -> float:
    """Greedy accuracy of a checkpoint on aligndistil_math.yaml's held-out prompts (`rlpost eval`)."""
    if not cache.exists():
        stdout = run([PY, "-m", "rlpost.cli", "eval", "configs/aligndistil_math.yaml", "--checkpoint", str(checkpoint)],
                     cache.with_suffix(".log"))
        cache.write_text(stdout[stdout.index("{\n"):])
    return json.loads(cache.read_text())["accuracy"]


def pairwise(policy: Path, reference: str, pairs: Path, out: Path) -> dict:
    if not (out / "rm_eval.json").exists():
        run([PY, "-m", "rlpost.cli", "eval-rm", "--prm", str(policy), "--reference", reference, "--beta", "0.1",
             "--pairwise", str(pairs), "--out", str(out)], out.with_suffix(".log"))
    return json.loads((out / "rm_eval.json").read_text())["pairwise"]


def curve(run_dir: Path) -> dict[int, float]:
    """step -> eval/accuracy from a run's metrics.jsonl (the last value logged for a step)."""
    from rlpost.metrics import read_metrics
    return {r["step"]: r["eval/accuracy"] for r in read_metrics(run_dir) if "eval/accuracy" in r}


DIAGNOSTICS = ("distil/l1_q50", "distil/w_q50", "distil/teacher_entropy", "distil/p_dpo_of_teacher_top",
               "distil/teacher_top_in_dpo_top5")


def diagnostics(run_dir: Path) -> dict[str, float]:
    """The run's mean over steps of each teacher diagnostic AlignDistil logs (docs/aligndistil.md)."""
    from rlpost.metrics import read_metrics
    rows = [r for r in read_metrics(run_dir) if "distil/w_q50" in r]
    return {k: sum(r[k] for r in rows) / len(rows) for k in DIAGNOSTICS if rows and all(k in r for r in rows)}


def first_reaching(points: dict[int, float], target: float) -> int | None:
    return next((s for s in sorted(points) if points[s] >= target), None)


def bench_seed(seed: int, out: Path, pairs: Path, test_pairs: Path, variants: dict[str, list[str]]) -> dict:
    d = out / f"seed{seed}"
    dpo, rev = d / "dpo", d / "reverse"
    data = [f"run.seed={seed}", f"data.source={pairs}", f"data.test_source={test_pairs}"]
    train("configs/dpo_math.yaml", dpo, data)
    train("configs/dpo_math.yaml", rev, [*data, "data.swap_pairs=true", "checkpoint.every=0", "checkpoint.keep_last=1"])
    teachers = [f"aligndistil.dpo_model={dpo / 'checkpoints/latest/hf'}", f"aligndistil.reverse_model={rev / 'checkpoints/latest/hf'}"]
    runs = {name: d / name for name in ["aligndistil", *variants]}
    for name, run_dir in runs.items():
        train("configs/aligndistil_math.yaml", run_dir, [f"run.seed={seed}", *teachers, *variants.get(name, [])])
    steps = sorted(int(p.name.split("_")[1]) for p in (dpo / "checkpoints").glob("step_*"))
    dpo_curve = {s: eval_accuracy(dpo / "checkpoints" / f"step_{s}", d / f"dpo_eval_step{s}.json") for s in steps}
    curves = {mode: curve(run_dir) for mode, run_dir in runs.items()}
    dpo_curve[0] = curves["aligndistil"][0]  # the same base model, prompts and greedy decoding
    contrastive = pairwise(dpo / "checkpoints/latest", str(rev / "checkpoints/latest/hf"), test_pairs, d / "rm_contrastive")
    dpo_reward = pairwise(dpo / "checkpoints/latest", BASE, test_pairs, d / "rm_dpo")
    final_dpo = max(steps)
    target = dpo_curve[final_dpo]
    return {"seed": seed, "curves": {"dpo": dict(sorted(dpo_curve.items())), **curves},
            "dpo_steps": final_dpo, "dpo_final_accuracy": target,
            "steps_to_dpo_accuracy": {name: first_reaching(c, target) for name, c in curves.items()},
            "pairwise_contrastive": contrastive["accuracy"], "pairwise_dpo_reward": dpo_reward["accuracy"],
            "pairwise_pairs": contrastive["pairs"], "diagnostics": {name: diagnostics(run_dir) for name, run_dir in runs.items()}}


def print_seed(r: dict) -> None:
    print(f"\n## seed {r['seed']}: greedy accuracy on 200 held-out prompts against training steps")
    curves = r["curves"]
    steps = sorted({s for c in curves.values() for s in c})
    print("| step | " + " | ".join(curves) + " |\n|---|" + "---|" * len(curves))
    for s in steps:
        print(f"| {s} | " + " | ".join(f"{c[s]:.3f}" if s in c else "" for c in curves.values()) + " |")
    print(f"DPO after {r['dpo_steps']} steps: {r['dpo_final_accuracy']:.3f} (goal: reached in <= {r['dpo_steps'] // 2} steps)")
    for name, reach in r["steps_to_dpo_accuracy"].items():
        print(f"  {name} reaches it at step {reach if reach is not None else 'never (in its run)'}: "
              f"{'met' if reach is not None and reach <= r['dpo_steps'] // 2 else 'NOT met'}")
    print("teacher diagnostics, means over the run's steps: " + "; ".join(
        f"{name}: " + ", ".join(f"{k.removeprefix('distil/')} {v:.3g}" for k, v in d.items())
        for name, d in r.get("diagnostics", {}).items()))
    gap = 100 * (r["pairwise_contrastive"] - r["pairwise_dpo_reward"])
    print(f"pairwise accuracy on {r['pairwise_pairs']} held-out pairs: contrastive log pi_dpo/pi_rev "
          f"{r['pairwise_contrastive']:.3f}, DPO reward log pi_dpo/pi_ref {r['pairwise_dpo_reward']:.3f} "
          f"({gap:+.1f} points; goal >= +3: {'met' if gap >= 3 else 'NOT met'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="one more AlignDistil run per seed with these overrides (repeatable)")
    parser.add_argument("--pairs", default="runs/pairs/train.jsonl", help="training pairs (test.jsonl beside it)")
    parser.add_argument("--out", default="runs/bench_aligndistil")
    args = parser.parse_args()
    out, pairs = Path(args.out), Path(args.pairs)
    test_pairs = pairs.parent / "test.jsonl"
    variants = {}
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        if not name or not sets or name in ("aligndistil", "dpo", "reverse") or any("=" not in s for s in sets.split(",")):
            parser.error(f"--variant {spec}: expected NAME:KEY=VALUE[,KEY=VALUE] with a new NAME")
        variants[name] = sets.split(",")
    sampling = ["--set", "rollout.engine=vllm", "--set", "rollout.group_size=8", "--set", "rollout.prompts_per_step=100"]
    if not pairs.exists():
        run([PY, "scripts/sample_pairs.py", "configs/aligndistil_math.yaml", *sampling, "--pairs-per-group", "2",
             "--out", str(pairs)], out / "pairs_train.log")
    if not test_pairs.exists():
        run([PY, "scripts/sample_pairs.py", "configs/aligndistil_math.yaml", *sampling, "--split", "test",
             "--out", str(test_pairs)], out / "pairs_test.log")
    saved = out / "results.json"  # other seeds' results (runs with other --seeds) are kept
    results = {r["seed"]: r for r in json.loads(saved.read_text())} if saved.exists() else {}
    for r in results.values():  # JSON keys are strings: the steps back to ints
        r["curves"] = {name: {int(s): a for s, a in c.items()} for name, c in r["curves"].items()}
    for seed in args.seeds:
        results[seed] = bench_seed(seed, out, pairs, test_pairs, variants)
        saved.write_text(json.dumps([results[k] for k in sorted(results)], indent=2))
    for seed in sorted(results):
        print_seed(results[seed])
    print(f"\nwrote {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
