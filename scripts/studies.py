"""What the resumable studies (scripts/bench_prime.py, scripts/bench_curriculum.py) share.

A study is a list of `rlpost train` runs, one (arm, seed) each, run one after the other in their own
processes. A finished run is skipped; an interrupted one resumes from its last checkpoint. Because
runs/ does not outlive a checkout, each finished run's metrics.jsonl is also copied into a kept
folder under docs/results/, named by the run and a hash of its settings, and restored from there: a
study goes on in a fresh checkout and redoes nothing it finished.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def finished(run_dir: Path, steps: int) -> bool:
    """The run evaluated after its last step (the trainer's final evaluation)."""
    from rlpost.metrics import read_metrics
    return (run_dir / "metrics.jsonl").is_file() and any(r.get("step") == steps and "eval/accuracy" in r
                                                         for r in read_metrics(run_dir))


def run(name: str, out: Path, config: str, overrides: list[str], steps: int, kept_dir: Path,
        key: list[str] | None = None) -> Path:
    """One `rlpost train CONFIG --set ...` into out/name, skipped when it finished (in `out` or in
    `kept_dir`). `key` (default: the overrides less run.output_dir) names the run's settings in the
    kept file's name: leave machine-specific paths out of it."""
    run_dir = out / name
    settings = key if key is not None else [o for o in overrides if not o.startswith("run.output_dir=")]
    kept = kept_dir / f"{name}-{hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:10]}.jsonl"
    if not finished(run_dir, steps):
        if kept.is_file():  # kept only once finished
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept, run_dir / "metrics.jsonl")
            return run_dir
        resume = ["--resume", str(run_dir)] if (run_dir / "checkpoints" / "latest").is_symlink() else []
        cmd = [sys.executable, "-c", "import sys; from rlpost.cli import main; sys.exit(main())", "train",
               config, "--no-progress", *resume, *[x for o in overrides for x in ("--set", o)]]
        print("$", " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    kept_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "metrics.jsonl", kept)
    return run_dir


def spread(xs: list[float]) -> str:
    """Mean +- sample standard deviation over seeds (the value alone for one seed)."""
    return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
