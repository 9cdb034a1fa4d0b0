"""The same job on 1 rank and on N ranks (DeepSpeed launcher), side by side: wall time per step and
how far the final weights are apart.

    .venv/bin/python scripts/bench_scale.py [--ranks 2] [--steps 4] [CONFIG] [--set key=value ...]

Default job: offline DPO on the HH pairs (configs/dpo_hh.yaml, SmolLM2-135M-Instruct, B = 8 pairs):
fixed data, no sampling, so both runs see the same pairs at every step and only the split differs
(on N ranks, pair k of a step goes to rank k % N). The weights then differ by float32 summation
order only, which AdamW's first steps, g / (sqrt(v) + eps), can magnify for parameters whose gradient
is near zero: the table reports the largest and the median difference against the size of the update.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(ranks: int, config: str, out: Path, steps: int, overrides: list[str]) -> float:
    sets = [x for kv in [f"run.output_dir={out}", f"train.max_steps={steps}", "eval.at_start=false",
                         f"checkpoint.every={steps}", *overrides] for x in ("--set", kv)]
    cmd = ([sys.executable, "-m", "rlpost.cli"] if ranks == 1 else
           [str(REPO / ".venv" / "bin" / "deepspeed"), "--num_gpus", str(ranks), "--module", "rlpost.cli"])
    start = time.time()
    subprocess.run(cmd + ["train", config, "--no-progress", *sets], cwd=REPO, check=True, capture_output=True, text=True)
    return time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/dpo_hh.yaml")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="runs/bench_scale")
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file
    from rlpost.metrics import read_metrics
    from rollout.models import resolve
    from rlpost.config import load_config

    root = Path(args.out)
    rows = {}
    for ranks in (1, args.ranks):
        run = root / f"ranks{ranks}"
        wall = train(ranks, args.config, run, args.steps, args.overrides)
        steps = [r for r in read_metrics(run) if "step_s" in r]
        rows[ranks] = {"wall_s": wall, "step_s": [r["step_s"] for r in steps],
                       "loss": [r.get("loss") for r in steps],
                       "weights": load_file(run / "checkpoints" / f"step_{args.steps}" / "hf" / "model.safetensors")}
    initial = load_file(Path(resolve(load_config(args.config, args.overrides).model.name)) / "model.safetensors")
    one, many = rows[1]["weights"], rows[args.ranks]["weights"]
    diffs = torch.cat([(one[k].float() - many[k].float()).abs().flatten() for k in one])
    update = torch.cat([(one[k].float() - initial[k].float()).abs().flatten() for k in one if k in initial])
    print(f"\n{args.config}, {args.steps} steps, this machine\n")
    print("| ranks | wall (s) | s / step (after the first) | loss per step |\n|---|---|---|---|")
    for ranks, r in rows.items():
        print(f"| {ranks} | {r['wall_s']:.0f} | {statistics.mean(r['step_s'][1:] or r['step_s']):.1f} | "
              + ", ".join(f"{x:.4f}" for x in r["loss"]) + " |")
    print(f"\nfinal weights, 1 vs {args.ranks} ranks: max |diff| {float(diffs.max()):.3g}, median {float(diffs.median()):.3g}, "
          f"identical entries {float((diffs == 0).double().mean()):.1%}; the update itself: max {float(update.max()):.3g}, "
          f"median {float(update.median()):.3g}")
    (root / "bench_scale.json").write_text(json.dumps({
        "config": args.config, "steps": args.steps,
        "runs": {str(k): {kk: vv for kk, vv in v.items() if kk != "weights"} for k, v in rows.items()},
        "max_diff": float(diffs.max()), "median_diff": float(diffs.median()), "max_update": float(update.max())}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
