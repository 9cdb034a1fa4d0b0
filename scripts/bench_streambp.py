"""Peak memory and time of one forward + backward on one long response: plain autograd, gradient
checkpointing and StreamBP, SmolLM2-135M-Instruct (all three use the same chunked vocabulary head).

    .venv/bin/python scripts/bench_streambp.py [--lengths 1024 2048 4096 8192] [--cap-gib 2]

Every (method, length) runs in a fresh subprocess, so each has a clean allocator and its own peak.
Memory is what the step adds on top of the loaded model: on CPU the peak resident set (VmHWM, reset
after loading) minus the resident set before the step; on a GPU torch.cuda.max_memory_allocated
minus the memory allocated before. A method is not run at longer lengths once it exceeds the cap
(--cap-gib), and the table reports, per method, the longest length that stayed under the cap.
The loss is a GRPO-style token sum (every backward mode is exact, see tests/test_streambp.py).
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("autograd", "checkpointing", "streambp")
PROMPT_TOKENS = 32


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


LOGITS_CHUNK = 256  # vocabulary-head positions per chunk: the tables in docs/streambp.md were measured so


def worker(method: str, length: int, chunk_size: int, model_name: str) -> dict:
    import torch

    from rlpost.batch import hf_decoder, pack, token_logprobs
    from rollout.models import load_model
    from rlpost.streambp import streamed_decoder
    from rollout.types import FinishReason, Sample

    cuda = torch.cuda.is_available()
    model = load_model(model_name, dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to("cuda" if cuda else "cpu").train()
    model.config.use_cache = False
    decoder = hf_decoder
    if method == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif method == "streambp":
        decoder = functools.partial(streamed_decoder, chunk_size=chunk_size)

    def step(n_tokens: int) -> tuple[float, float, float]:
        g = torch.Generator().manual_seed(n_tokens)
        ids = torch.randint(0, model.config.vocab_size, (n_tokens,), generator=g).tolist()
        sample = Sample(ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:], [], FinishReason.LENGTH)
        batch = pack([sample], pad_id=0).to(model.device)
        model.zero_grad(set_to_none=False)  # the gradient buffers exist from the warm-up: not counted
        start = time.perf_counter()
        logp, _ = token_logprobs(model, batch, 1.0, chunk_size=LOGITS_CHUNK, decoder=decoder)
        loss = -(logp.float() * batch.response_mask).sum() / batch.response_mask.sum()
        if cuda:
            torch.cuda.synchronize()
        forward = time.perf_counter() - start
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return forward, time.perf_counter() - start - forward, float(loss)

    step(PROMPT_TOKENS + 96)  # warm-up: kernels, allocator, gradient buffers exist before measuring
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
        before = _rss_kib("VmRSS") * 1024
    forward, backward, loss = step(length)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    return {"method": method, "length": length, "peak_gib": (peak - before) / 2**30, "forward_s": forward,
            "backward_s": backward, "loss": loss, "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--cap-gib", type=float, default=2.0, help="memory cap for the max-length comparison")
    parser.add_argument("--chunk-size", type=int, default=512, help="StreamBP rows per layer chunk")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--out", default="runs/bench_streambp.json")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.chunk_size, args.model)))
        return

    results: dict[tuple[str, int], dict] = {}
    for method in args.methods:
        for length in sorted(args.lengths):
            cmd = [sys.executable, __file__, "--worker", method, str(length), "--chunk-size", str(args.chunk_size),
                   "--model", args.model]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                results[method, length] = {"error": "timeout"}
                print(f"{method:13} {length:>6}: timed out after {args.timeout} s", flush=True)
                break
            if proc.returncode != 0:
                results[method, length] = {"error": proc.stderr.strip().splitlines()[-1][:120]}
                print(f"{method:13} {length:>6}: failed: {results[method, length]['error']}", flush=True)
                break
            r = results[method, length] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{method:13} {length:>6}: +{r['peak_gib']:.2f} GiB, forward {r['forward_s']:.1f} s, "
                  f"backward {r['backward_s']:.1f} s, loss {r['loss']:.4f}", flush=True)
            if r["peak_gib"] > args.cap_gib:
                break  # longer sequences only need more

    device = next((r["device"] for r in results.values() if "device" in r), "?")
    print(f"\ndevice: {device}; memory = peak added by one forward+backward; times in seconds")
    header = f"{'length':>6} " + " ".join(f"{m + ' GiB':>18} {'fwd+bwd s':>9}" for m in args.methods)
    print(header + f" {'stream/ckpt time':>16}")
    for length in sorted(args.lengths):
        cells = []
        for m in args.methods:
            r = results.get((m, length))
            if r is None or "error" in r:
                cells.append(f"{(r or {}).get('error', '-')[:18]:>18} {'':>9}")
            else:
                cells.append(f"{r['peak_gib']:>18.3f} {r['forward_s'] + r['backward_s']:>9.1f}")
        ratio = ""
        s, c = results.get(("streambp", length), {}), results.get(("checkpointing", length), {})
        if "backward_s" in s and "backward_s" in c:
            ratio = f"{(s['forward_s'] + s['backward_s']) / (c['forward_s'] + c['backward_s']):.2f}"
        print(f"{length:>6} " + " ".join(cells) + f" {ratio:>16}")
    longest = {m: max([n for (mm, n), r in results.items() if mm == m and r.get("peak_gib", 1e9) <= args.cap_gib],
                      default=0) for m in args.methods}
    print(f"\nlongest length under {args.cap_gib} GiB: " + ", ".join(f"{m} {n}" for m, n in longest.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps([{"method": m, "length": n, **r} for (m, n), r in results.items()], indent=2))


if __name__ == "__main__":
    main()
