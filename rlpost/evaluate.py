"""Held-out accuracy: greedy (one answer per prompt) and pass@k (k samples at the rollout temperature).

`run_eval` is the one evaluation path for generated answers: the trainer (before, during, after
training) and `rlpost eval` both call it with the run's config. `PairwiseEval` ranks held-out
preference pairs by the implicit reward (offline DPO / APO on preference files).
"""
from __future__ import annotations

import torch

from rlpost.batch import Packed, pack, pair_rows, token_logprobs
from rlpost.config import Config
from rlpost.data import PromptSet
from rollout.types import Group, SamplingParams


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


class PairwiseEval:
    """Held-out pairwise accuracy of the implicit reward r(y) = beta (log pi(y) - log pi_ref(y)): a pair
    counts as right only when chosen scores strictly above rejected (a tie is wrong, and reported;
    before any training every pair is a tie). The sign does not depend on beta, so none is needed.
    Beside it, the share of pairs that "the shorter response wins" gets: a property of the data,
    the bar a length bias alone would reach. The reference's log-probs are computed once, here."""

    def __init__(self, policy: torch.nn.Module, reference_spec: str, groups: list[Group], pad_id: int,
                 micro_batch_size: int, device: torch.device):
        from rollout.models import load_model

        self.policy, self.device = policy, device
        k = max(micro_batch_size // 2, 1)
        pairs = [(next(s for s in g.samples if s.correct), next(s for s in g.samples if not s.correct)) for g in groups]
        self.batches = [pack(rows, pad_id) for rows in pair_rows(pairs, k)]
        self.shorter_wins = sum(len(c.response_ids) < len(r.response_ids) for c, r in pairs) / max(len(pairs), 1)
        reference = load_model(reference_spec).to(device).eval()
        self.reference_margins = [self._margins(reference, b) for b in self.batches]
        del reference

    def _margins(self, model: torch.nn.Module, batch: Packed) -> torch.Tensor:
        """log pi(chosen) - log pi(rejected) per pair."""
        with torch.no_grad():
            logp, _ = token_logprobs(model, batch.to(self.device), 1.0)
            seq = (logp.double() * batch.response_mask.to(logp.device).double()).sum(-1).cpu()
        k = len(seq) // 2
        return seq[:k] - seq[k:]

    def __call__(self) -> dict[str, float]:
        was_training = self.policy.training
        self.policy.eval()
        margins = torch.cat([self._margins(self.policy, b) - ref for b, ref in zip(self.batches, self.reference_margins)])
        self.policy.train(was_training)
        n = max(len(margins), 1)
        return {"accuracy": float((margins > 0).sum()) / n, "ties": float((margins == 0).sum()) / n,
                "mean_logratio_margin": float(margins.mean()) if len(margins) else 0.0,
                "shorter_wins": self.shorter_wins, "num_pairs": float(len(margins))}
