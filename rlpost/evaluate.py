"""Held-out accuracy: greedy (one answer per prompt) and pass@k (k samples at the rollout temperature).

`run_eval` is the one evaluation path: the trainer (before, during, after training) and `rlpost eval`
both call it with the run's config.
"""
from __future__ import annotations

from rlpost.config import Config
from rlpost.data import PromptSet
from rollout.types import SamplingParams


def evaluate(engine, prompts: PromptSet, reward_fn, *, max_new_tokens: int, num_prompts: int | None = None,
             pass_k: int = 1, temperature: float = 1.0, top_p: float = 1.0, seed: int = 1234) -> dict[str, float]:
    n = min(num_prompts or len(prompts), len(prompts))
    ids, answers = prompts.prompt_ids[:n], [p.answer for p in prompts.problems[:n]]
    greedy = engine.generate(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    correct = reward_fn.correctness([s.text for s in greedy], answers)
    result = {
        "accuracy": sum(correct) / n,
        "response_length": sum(len(s.response_ids) for s in greedy) / n,
        "truncated": sum(s.truncated for s in greedy) / n,
        "num_prompts": float(n),
    }
    if pass_k > 1:
        sampled = engine.generate([p for p in ids for _ in range(pass_k)],
                                  SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                 top_p=top_p, seed=seed))
        hits = reward_fn.correctness([s.text for s in sampled], [a for a in answers for _ in range(pass_k)])
        per_prompt = [any(hits[i * pass_k:(i + 1) * pass_k]) for i in range(n)]
        result[f"pass@{pass_k}"] = sum(per_prompt) / n
        result["sample_accuracy"] = sum(hits) / len(hits)
    return result


def run_eval(engine, prompts: PromptSet, verifier, cfg: Config) -> dict[str, float]:
    """`evaluate` with the config's eval settings, plus the verifier's timeout / error counters."""
    result = evaluate(engine, prompts, verifier, max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                      num_prompts=cfg.eval.num_prompts, pass_k=cfg.eval.pass_k,
                      temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
    result.update({f"reward_{k}": float(v) for k, v in verifier.pop_counters().items()})
    return result
