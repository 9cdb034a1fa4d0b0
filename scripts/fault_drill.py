"""Fault drill: inject each fault into a real short run and print one table row per fault.

    .venv/bin/python scripts/fault_drill.py [--kills 20] [--out runs/fault_drill]

Every run is `rlpost train configs/grpo_math.yaml` on the `tiny-digits` model (a few steps, a
checkpoint every step). A fault is injected from outside (SIGKILL, a locked run dir, an edited
checkpoint) or, for faults inside the process, by a child wrapper (`--child FAULT`) that patches one
function before calling the CLI: a NaN loss, a full disk at a checkpoint write, a verifier worker
that dies or hangs, an engine that raises. For each: what the user saw (exit code and the last
line on stderr), whether `--resume latest` then worked, and whether anything was lost (the resumed
run's final weights against an uninterrupted run's, bit for bit, where the run could resume).
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
SMALL = ["model.name=tiny-digits", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
         "eval.num_prompts=4", "eval.pass_k=1", "eval.at_start=false", "train.micro_batch_size=4", "checkpoint.every=1",
         "checkpoint.keep_last=10", "grpo.dynamic_sampling=false", "train.lr=1e-4", "reward.format_weight=0.5",
         "data.arithmetic.train_size=50", "data.arithmetic.test_size=10", f"train.max_steps={STEPS}"]


# ---------------------------------------------------------------------------------------------
# Inside the child: patch one function, then run the CLI

def install(fault: str) -> None:
    if fault in ("nan_once", "nan_always"):
        from rlpost import learner as learner_module
        from rlpost.objectives.grpo import GRPO
        real_loss, real_step, calls = GRPO.loss, learner_module.Learner.train_step, {"n": 0}

        def train_step(self, micro_batches, head, loss_fn):
            calls["n"] += 1
            return real_step(self, micro_batches, head, loss_fn)

        def loss(self, mb, outputs):  # NaN in the 2nd optimizer step (nan_once) or in every one from the 2nd on
            value, stats = real_loss(self, mb, outputs)
            bad = calls["n"] == 2 if fault == "nan_once" else calls["n"] >= 2
            return (value * float("nan") if bad else value), stats
        GRPO.loss, learner_module.Learner.train_step = loss, train_step
    elif fault == "disk_full":
        import errno
        from rlpost import checkpoint

        real_save = checkpoint.torch.save

        def save(obj, path, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, path, *args, **kwargs)
        checkpoint.torch.save = save
    elif fault in ("verifier_dies", "verifier_hangs"):
        from rewards.math import MathReward
        real_check, calls = MathReward.check, {"n": 0}

        def check(self, response, answer):
            calls["n"] += 1
            if calls["n"] == 12:
                if fault == "verifier_dies":
                    os.kill(self._worker().process.pid, signal.SIGKILL)
                else:
                    response = "\\boxed{100000000!}"  # sympy computes this inside C: the worker hangs
            return real_check(self, response, answer)
        MathReward.check = check
    elif fault == "engine_raises":
        from rollout.hf_engine import HFEngine
        real_generate, calls = HFEngine.generate, {"n": 0}

        def generate(self, prompts, params):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("engine failure injected at its 3rd call")
            return real_generate(self, prompts, params)
        HFEngine.generate = generate
    else:
        raise SystemExit(f"unknown fault {fault!r}")


# ---------------------------------------------------------------------------------------------
# The parent

def rlpost(run: Path, *extra: str, fault: str | None = None, background: bool = False):
    args = ["train", "configs/grpo_math.yaml", "--no-progress", *(x for s in SMALL for x in ("--set", s)),
            "--set", f"run.output_dir={run}", *extra]
    cmd = [sys.executable, __file__, "--child", fault, "--", *args] if fault else [sys.executable, "-m", "rlpost.cli", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if background:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)


def last_line(proc) -> str:
    lines = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
    return lines[-1][:110] if lines else "(nothing)"


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(run / "checkpoints" / f"step_{STEPS}" / "hf" / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resume_and_compare(run: Path, reference: dict) -> tuple[str, str]:
    """(resumed?, lost?) after a fault: resume from `latest` to the end, compare with the reference."""
    from rlpost.checkpoint import CheckpointError, resolve_checkpoint
    try:
        latest = resolve_checkpoint(run / "checkpoints" / "latest")
    except CheckpointError:
        if list((run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else []:
            return "NO: latest unusable", "YES"
        proc = rlpost(run)  # killed before the first checkpoint: a fresh start is all there is to do
        return ("fresh start (no checkpoint yet)" if proc.returncode == 0 else f"NO ({last_line(proc)})",
                "nothing" if proc.returncode == 0 and same(final_weights(run), reference) else "YES")
    proc = rlpost(run, "--resume", str(run / "checkpoints" / "latest"))
    if proc.returncode != 0:
        return f"NO ({last_line(proc)})", "?"
    return f"yes, from {latest.name}", "nothing (weights = uninterrupted run)" if same(final_weights(run), reference) else "YES: weights differ"


def kill_trials(out: Path, n: int, reference: dict, wall: float, train_s: float, rng: random.Random) -> list[tuple]:
    rows, outcomes = [], []
    for i in range(n):
        run = out / f"kill_{i}"
        shutil.rmtree(run, ignore_errors=True)
        proc = rlpost(run, background=True)
        during_save = i % 2 == 1
        start = time.time()
        if during_save:  # wait for a checkpoint write to start, then kill inside it
            target = rng.randint(1, STEPS - 1)
            while time.time() - start < wall * 2 and not (run / "checkpoints" / f".step_{target}.tmp").exists():
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        else:  # once the first checkpoint exists, at a random moment of the remaining steps and saves
            while time.time() - start < wall * 2 and not (run / "checkpoints" / "latest").is_symlink():
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, train_s))
        moment = time.time() - start
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed, lost = resume_and_compare(run, reference)
        outcomes.append((resumed, lost))
        print(f"  kill {i + 1}/{n} at {moment:.1f} s ({'in a checkpoint write' if during_save else 'random'}): "
              f"{resumed}; lost: {lost}", flush=True)
    ok = sum(lost.startswith("nothing") for _, lost in outcomes)
    froms = sorted({r for r, _ in outcomes})
    rows.append((f"kill -9 x{n} (half of them inside a checkpoint write)", "the process vanished (SIGKILL)",
                 "; ".join(froms)[:120], f"{ok}/{n} runs lost nothing"))
    return rows


def main() -> int:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        install(sys.argv[i + 1])
        sys.argv = ["rlpost", *sys.argv[sys.argv.index("--") + 1:]]
        sys.path.insert(0, str(REPO))
        from rlpost.cli import main as cli_main
        return cli_main(sys.argv[1:])

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--out", default="runs/fault_drill")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = random.Random(args.seed)

    t0 = time.time()
    proc = rlpost(out / "reference")
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return 1
    reference = final_weights(out / "reference")
    from rlpost.metrics import read_metrics
    times = [r["time"] for r in read_metrics(out / "reference") if "reward" in r]
    train_s = times[-1] - times[0] + 1.0  # from the first step's end (checkpoint 1) to the end, and the final eval
    print(f"reference run: {STEPS} steps in {wall:.1f} s (steps 2-{STEPS} and their checkpoints: {train_s:.1f} s)", flush=True)
    rows = kill_trials(out, args.kills, reference, wall, train_s, rng) if args.kills else []

    for fault, what in [("nan_once", "NaN loss at step 2"), ("nan_always", "NaN loss from step 2 on"),
                        ("disk_full", "no space left writing checkpoint 2"),
                        ("verifier_dies", "verifier worker SIGKILLed mid-run"),
                        ("verifier_hangs", "verifier worker hangs (sympy in C)"),
                        ("engine_raises", "rollout engine raises at its 3rd call")]:
        run = out / fault
        proc = rlpost(run, fault=fault)
        from rlpost.metrics import read_metrics
        rows_ = [r for r in read_metrics(run) if "reward" in r] if (run / "metrics.jsonl").exists() else []
        seen = f"exit {proc.returncode}: {last_line(proc)}" if proc.returncode else \
            f"exit 0; metrics: nonfinite at steps {[r['step'] for r in rows_ if r.get('nonfinite')]}, " \
            f"verifier timeouts {sum(r.get('reward/timeouts', 0) for r in rows_):.0f}, " \
            f"errors {sum(r.get('reward/errors', 0) for r in rows_):.0f}"
        if proc.returncode == 0:
            rows.append((what, seen, "not needed (run finished)", "nothing (finite weights, all steps logged)"
                         if len(rows_) == STEPS else "YES: steps missing"))
        elif fault == "nan_always":  # the skipped steps changed nothing: latest holds the last good weights
            from rlpost.checkpoint import resolve_checkpoint
            from safetensors.torch import load_file
            latest = resolve_checkpoint(run / "checkpoints" / "latest")
            good = same(load_file(latest / "hf" / "model.safetensors"),
                        load_file(run / "checkpoints" / "step_1" / "hf" / "model.safetensors"))
            rows.append((what, seen, f"latest = {latest.name}", "nothing (latest = the weights after step 1, the "
                         "last good one)" if good else "YES: latest differs from the last good weights"))
        else:
            resumed, lost = resume_and_compare(run, reference)
            rows.append((what, seen, resumed, lost))

    # A second run into a live run's directory.
    run = out / "locked"
    first = rlpost(run, background=True)
    while not (run / ".lock").exists() or not (run / ".lock").read_text().strip():
        time.sleep(0.05)
    second = rlpost(run)
    first.wait()
    rows.append(("second `rlpost train` into a live run dir", f"exit {second.returncode}: {last_line(second)}",
                 "first run finished" if first.returncode == 0 else "first run failed",
                 "nothing" if same(final_weights(run), reference) else "YES: weights differ"))

    # --resume with a config that changes what the run is; then with a safe change.
    changed = rlpost(out / "reference", "--set", "rollout.group_size=2", "--resume",
                     str(out / "reference" / "checkpoints" / "step_2"))
    safe = rlpost(out / "reference", "--set", "eval.every=1", "--resume", str(out / "reference" / "checkpoints" / "step_2"))
    rows.append(("--resume with rollout.group_size changed", f"exit {changed.returncode}: {last_line(changed)}",
                 f"safe change (eval.every) resumed: exit {safe.returncode}",
                 "nothing" if same(final_weights(out / "reference"), reference) else "YES: weights differ"))

    # A checkpoint whose trainer state runs code on load.
    evil = out / "evil"
    shutil.copytree(out / "reference" / "checkpoints" / "step_2", evil / "checkpoints" / "step_2", symlinks=True)
    marker = out / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    with open(evil / "checkpoints" / "step_2" / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": 2, "x": Exploit()}, f)
    proc = rlpost(out / "evil_run", "--resume", str(evil / "checkpoints" / "step_2"))
    rows.append(("trainer_state.pt replaced by a pickle that runs `touch`", f"exit {proc.returncode}: {last_line(proc)}",
                 "refused", "code ran!" if marker.exists() else "nothing ran"))

    print("\n| fault injected | what the user saw | resumed | lost |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    print(f"\n(total {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
