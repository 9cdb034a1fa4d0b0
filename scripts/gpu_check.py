"""The checks of the GPU check (run through `scripts/gpu_check.sh run`, which installs what is missing):

  1. the learner in bf16 on one GPU, ZeRO 0 and ZeRO 2: three GRPO steps on SmolLM2-135M-shaped
     random weights (8 groups x 8 samples, 256-token responses): seconds per step, peak memory,
     finite losses, the weights moved;
  2. StreamBP's float32 exactness tests on `cuda` (tests/test_streambp.py, the cuda cases);
  3. scripts/bench_streambp.py on the SmolLM2 shape: peak memory (torch.cuda.max_memory_allocated)
     and time of autograd, checkpointing and StreamBP at growing lengths;
  4. the hf engine's rollouts: 64 samples of 128 tokens, tokens per second;
  5. five steps of the main job (configs/grpo_math.yaml) on tiny-digits (SmolLM2's weights cannot be
     carried; tiny-digits answers right often enough for GRPO to have a signal);
  6. the same with one rollout worker (rollout.placement=workers, max_staleness 1, the hf engine), on
     the second GPU when there is one.
One table on stdout, every number in runs/gpu_check.json. `--device cpu --quick` runs the same code on a
CPU (how it is tested where no GPU is lent; bf16 is then off, as the learner only enables it on CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAPE = REPO / "runs" / "gpu_carry" / "smollm2-shape"


def smollm2_shape(cache: Path) -> str:
    """A model with SmolLM2-135M-Instruct's config and tokenizer and seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    out = cache / "smollm2-shape-random"
    if not (out / "config.json").exists():
        source = SHAPE if (SHAPE / "config.json").exists() else None
        if source is None:
            from rollout.models import resolve
            source = Path(resolve("smollm2-135m-instruct"))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), torch_dtype=torch.float32)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


def learner_check(model: str, zero: int, quick: bool) -> dict:
    from rlpost.build import make_objective
    from rlpost.config import Config
    from rlpost.learner import Learner
    from rollout.types import FinishReason, Group, Sample
    groups_n, size, length = (2, 4, 32) if quick else (8, 8, 256)
    cfg = Config.model_validate({"model": {"name": model}, "grpo": {"aggregation": "dapo", "beta": 0.0},
                                 "train": {"zero_stage": zero, "micro_batch_size": 8, "lr": 1e-5}})
    learner = Learner(model, cfg.train)
    objective = make_objective(cfg, learner, pad_id=0)
    g = torch.Generator().manual_seed(0)
    groups = [Group(k, "", "", [Sample(torch.randint(3, 1000, (32,), generator=g).tolist(),
                                       torch.randint(3, 1000, (length,), generator=g).tolist(), [0.0] * length,
                                       FinishReason.STOP, reward=float(j % 2)) for j in range(size)])
              for k in range(groups_n)]
    before = next(learner.model.parameters()).detach().float().clone()
    times, losses = [], []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        start = time.perf_counter()
        stats = learner.train_step(objective.micro_batches(groups, objective.advantages(groups), learner.version),
                                   objective.head, objective.loss)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(stats["loss"])
    moved = not torch.equal(before, next(learner.model.parameters()).detach().float())
    dtype = str(next(learner.engine.module.parameters()).dtype).removeprefix("torch.")
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    ok = moved and all(map(lambda x: x == x and abs(x) != float("inf"), losses))
    return {"check": f"learner ZeRO-{zero}", "ok": ok, "dtype": dtype, "s_per_step": min(times[1:]),
            "peak_gib": peak, "losses": losses}


def run(cmd: list[str], timeout: int) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU dry run)")
    parser.add_argument("--only", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="run only these checks")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu --quick for a dry run on a CPU)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from rollout.models import cache_dir
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    shape = smollm2_shape(cache_dir())
    rows: list[dict] = []

    for zero in (0, 2) if 1 in args.only else ():  # each in a fresh process: one DeepSpeed engine per process
        code, out = run([sys.executable, __file__, "--learner", str(zero), shape] + (["--quick"] if args.quick else []),
                        1800)
        found = re.search(r"^RESULT (.*)$", out, re.M)
        rows.append(json.loads(found.group(1)) if found else {"check": f"learner ZeRO-{zero}", "ok": False,
                                                               "error": out[-1500:]})

    if 2 in args.only:
        streambp_tests(args.device, rows)
    if 3 in args.only:
        streambp_bench(shape, args.quick, rows)
    if 4 in args.only:
        engine_check(shape, args.device, args.quick, rows)
    if 5 in args.only:
        main_job(rows)
    if 6 in args.only:
        workers_job(args.device, rows)
    report(device_name, rows)
    return 0 if all(r["ok"] for r in rows) else 1


def streambp_tests(device: str, rows: list[dict]) -> None:
    code, out = run([sys.executable, "-m", "pytest", "-q", "tests/test_streambp.py", "-k", device], 3600)
    summary = re.findall(r"(\d+) (passed|failed|skipped|error)", out)
    rows.append({"check": f"StreamBP float32 exactness on {device}", "ok": code == 0,
                 "result": ", ".join(f"{n} {w}" for n, w in summary) or out[-500:]})


def streambp_bench(shape: str, quick: bool, rows: list[dict]) -> None:
    lengths = ["256", "512"] if quick else ["2048", "8192", "16384", "32768"]
    bench = REPO / "runs" / "gpu_bench_streambp.json"
    code, out = run([sys.executable, "scripts/bench_streambp.py", "--model", shape, "--lengths", *lengths,
                     "--cap-gib", "60", "--out", str(bench)], 3600)
    results = json.loads(bench.read_text()) if code == 0 and bench.exists() else []
    results = results.get("runs", results) if isinstance(results, dict) else results
    rows.append({"check": "bench_streambp (SmolLM2 shape)", "ok": code == 0, "runs": results,
                 **({} if code == 0 else {"error": out[-1500:]})})


def engine_check(shape: str, device: str, quick: bool, rows: list[dict]) -> None:
    from rollout.engine import make_engine
    from rollout.models import load_tokenizer
    from rollout.types import SamplingParams
    tokenizer = load_tokenizer(shape)
    engine = make_engine("hf", shape, tokenizer, device, max_batch_size=64)
    n, new = (8, 16) if quick else (64, 128)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    start = time.perf_counter()
    samples = engine.generate([prompt] * n, SamplingParams(new, 1.0, seed=0))
    seconds = time.perf_counter() - start
    tokens = sum(len(s.response_ids) for s in samples)
    rows.append({"check": "hf engine rollouts", "ok": tokens > 0, "samples": n, "tokens": tokens,
                 "tokens_per_s": tokens / seconds})


def main_job(rows: list[dict], name: str = "gpu_check_main", extra: list[str] = (),
             label: str = "main job, 5 steps (tiny-digits)") -> None:
    run_dir = REPO / "runs" / name
    code, out = run([sys.executable, "-m", "rlpost.cli", "train", "configs/grpo_math.yaml", "--no-progress",
                     "--set", "model.name=tiny-digits", "--set", f"run.output_dir={run_dir}", "--set", "train.max_steps=5",
                     "--set", "eval.num_prompts=32", "--set", "eval.pass_k=1", "--set", "data.arithmetic.word_problems=false",
                     "--set", "rollout.max_new_tokens=6", "--set", "data.arithmetic.num_operations=1",
                     "--set", "checkpoint.every=5", *[x for o in extra for x in ("--set", o)]], 3600)
    steps = []
    if (run_dir / "metrics.jsonl").exists():
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step_s"' in line]
    rows.append({"check": label, "ok": code == 0 and len(steps) >= 5,
                 "s_per_step": sum(r["step_s"] for r in steps[1:]) / max(len(steps) - 1, 1) if steps else None,
                 "reward": [r.get("reward") for r in steps], **({} if code == 0 else {"error": out[-1500:]})})


def workers_job(device: str, rows: list[dict]) -> None:
    """6. the same job with one rollout worker (hf engine; on its own GPU when there are two), k = 1."""
    worker = "cuda:1" if device == "cuda" and torch.cuda.device_count() > 1 else ("cuda:0" if device == "cuda" else "cpu")
    main_job(rows, "gpu_check_workers", ["rollout.placement=workers", "rollout.engine=hf", "rollout.max_staleness=1",
                                         f"rollout.worker_devices=[{worker}]"],
             f"main job, 5 steps, one rollout worker on {worker} (max_staleness 1)")


def report(device_name: str, rows: list[dict]) -> None:
    print(f"\nGPU check on {device_name} (torch {torch.__version__})\n")
    print("| check | ok | numbers |\n|---|---|---|")
    for r in rows:
        numbers = {k: v for k, v in r.items() if k not in ("check", "ok", "error", "runs", "losses")}
        if r.get("runs"):
            numbers["runs"] = "; ".join(f"{x['method']} {x['length']}: {x['peak_gib']:.2f} GiB {x['forward_s'] + x['backward_s']:.2f} s"
                                        for x in r["runs"] if "peak_gib" in x)
        text = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items())
        print(f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {text}{' ' + r['error'][-300:] if 'error' in r else ''} |")
    out_file = REPO / "runs" / "gpu_check.json"
    out_file.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=2, default=str))
    print(f"\nwrote {out_file}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--learner":  # the per-stage child process
        print("RESULT " + json.dumps(learner_check(sys.argv[3], int(sys.argv[2]), "--quick" in sys.argv)))
        sys.exit(0)
    sys.exit(main())
