"""Synchronous rollouts vs APRIL active partial rollouts: same engine, model and prompt stream.

    .venv/bin/python scripts/bench_april.py [--engine vllm] [--steps 5] [--groups 8] [--group-size 4]

The workload has a long-tailed response length with natural end-of-sequence: most prompts are short
arithmetic questions answered in a few tokens, a few ask for explanations that run to hundreds of
tokens (or to --max-new-tokens). Each step needs --groups finished groups. The synchronous scheduler
generates exactly those groups to the end; APRIL submits 2x as many, takes the first that finish,
aborts the rest and continues them in the next step. Only rollouts are timed (no training): the
engine's policy version is bumped every step so the stale fraction counts what would be off-policy.
Throughput counts the tokens of the finished groups a step returns, per second of that step.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHORT = ["What is {a} + {b}?", "What is {a} * {b}?", "What is {a} - {b}?"]
LONG = ["Explain step by step how to compute {a} * {b} by hand, then give the result.",
        "Write a short story about the number {a}.",
        "Explain why {a} + {b} equals {b} + {a}, with examples."]


def prompt_stream(tokenizer, seed: int, long_share: float):
    rng = random.Random(seed)
    for i in itertools.count():
        template = rng.choice(LONG if rng.random() < long_share else SHORT)
        text = template.format(a=rng.randint(2, 99), b=rng.randint(2, 99))
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        yield i, text, list(ids["input_ids"] if not isinstance(ids, list) else ids)


def decode_rate_by_concurrency(engine, prompt_ids: list[int], counts=(1, 4, 8, 16, 32, 64), tokens: int = 64):
    """vLLM decode tokens/s with n requests running, each forced to `tokens` tokens: where this curve is
    still rising, slots left idle by a long tail cost throughput, and APRIL can win them back."""
    from vllm import SamplingParams as VllmParams

    rates = {}
    for n in counts:
        for i in range(n):
            engine.engine.add_request(f"probe-{n}-{i}", {"prompt_token_ids": prompt_ids},
                                      VllmParams(max_tokens=tokens, ignore_eos=True))
        start = time.perf_counter()
        while engine.engine.has_unfinished_requests():
            engine.engine.step()
        rates[n] = n * tokens / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--groups", type=int, default=8, help="B: finished groups per step")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--long-share", type=float, default=0.25, help="share of prompts asking for long answers")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_april.json")
    args = parser.parse_args()

    from rollout.models import load_tokenizer
    from rollout.april import AprilScheduler, pending_group, stale_fraction
    from rollout.engine import make_engine
    from rollout.types import Group, SamplingParams, tail_wait_s

    tokenizer = load_tokenizer(args.model)
    engine = make_engine(args.engine, args.model, tokenizer, max_batch_size=4 * args.groups * args.group_size,
                         max_model_len=args.max_new_tokens + 128, seed=args.seed)
    params = SamplingParams(args.max_new_tokens, args.temperature)
    warm_prompt = next(prompt_stream(tokenizer, 99, 0.0))[2]
    engine.generate([warm_prompt], SamplingParams(8, 1.0))  # warm-up
    rates = decode_rate_by_concurrency(engine, warm_prompt) if args.engine == "vllm" else {}

    def measured(step: int, samples: list, start: float, **extra) -> dict:
        """One step's row: wall time since `start`, tokens of the finished groups, tail wait."""
        return {"step": step, "wall_s": time.time() - start, "tokens": sum(len(s.response_ids) for s in samples),
                "tail_s": tail_wait_s(samples, start), "longest": max(len(s.response_ids) for s in samples), **extra}

    def run_sync() -> list[dict]:
        stream, rows = prompt_stream(tokenizer, args.seed, args.long_share), []
        for step in range(1, args.steps + 1):
            engine.version = step
            batch = [next(stream) for _ in range(args.groups)]
            start = time.time()
            samples = engine.generate([ids for _, _, ids in batch for _ in range(args.group_size)], params)
            rows.append(measured(step, samples, start, stale_fraction=0.0))
        return rows

    def run_april() -> list[dict]:
        stream, rows = prompt_stream(tokenizer, args.seed, args.long_share), []
        april = AprilScheduler(engine, args.groups, 2 * args.groups, max_new_tokens=args.max_new_tokens, params=params)

        def fresh(n: int) -> list[Group]:
            return [pending_group(i, text, "", ids, args.group_size) for i, text, ids in itertools.islice(stream, n)]

        for step in range(1, args.steps + 1):
            engine.version = step
            start = time.time()
            groups, stats = april.rollout(fresh, step)
            rows.append(measured(step, [s for g in groups for s in g.samples], start,
                                 stale_fraction=stale_fraction(groups, step), buffer=stats["buffer_size"],
                                 generated=stats["tokens_generated"]))
        return rows

    results = {"sync": run_sync(), "april": run_april()}
    if rates:
        print("\ndecode tokens/s by requests running: " + ", ".join(f"{n}: {r:.0f}" for n, r in rates.items()))
    print(f"\nengine {args.engine}, {args.model}, B={args.groups} groups x G={args.group_size}, "
          f"L_max={args.max_new_tokens}, {args.long_share:.0%} long prompts, {args.steps} steps")
    print(f"{'step':>4} {'sync s':>7} {'tail s':>6} {'sync tok/s':>10} {'april s':>7} {'tail s':>6} {'april tok/s':>11} "
          f"{'stale':>6} {'buffer':>6}")
    for s, a in zip(results["sync"], results["april"]):
        print(f"{s['step']:>4} {s['wall_s']:>7.1f} {s['tail_s']:>6.1f} {s['tokens'] / s['wall_s']:>10.1f} "
              f"{a['wall_s']:>7.1f} {a['tail_s']:>6.1f} {a['tokens'] / a['wall_s']:>11.1f} {a['stale_fraction']:>6.2f} "
              f"{a['buffer']:>6.0f}")
    totals = {k: (sum(r["tokens"] for r in rows), sum(r["wall_s"] for r in rows)) for k, rows in results.items()}
    sync_tps, april_tps = (totals[k][0] / totals[k][1] for k in ("sync", "april"))
    stale = sum(r["stale_fraction"] * r["tokens"] for r in results["april"]) / max(totals["april"][0], 1)
    print(f"finished-group tokens/s: sync {sync_tps:.1f}, APRIL {april_tps:.1f}, ratio {april_tps / sync_tps:.2f}x; "
          f"wall per step: sync {totals['sync'][1] / args.steps:.1f} s, APRIL {totals['april'][1] / args.steps:.1f} s; "
          f"APRIL stale-token fraction {stale:.2f}; waiting on the longest half of the samples: "
          f"sync {sum(r['tail_s'] for r in results['sync']) / args.steps:.1f} s, "
          f"APRIL {sum(r['tail_s'] for r in results['april']) / args.steps:.1f} s per step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "decode_rate_by_concurrency": rates, **results},
                                         indent=2))


if __name__ == "__main__":
    main()
