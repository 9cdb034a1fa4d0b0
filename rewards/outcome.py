"""The rewards step of every method: the verifier's verdict and the shaped scalar reward, per sample.

`OutcomeReward(groups)` scores, in place, every sample not scored yet (`correct is None`), so a source
that had to score early (APRIL's accept filter, CurES's difficulty pass) costs no second check:

    correct = the math verifier's verdict (rewards/math.py), alone: what accuracy and CurES count
    reward  = correct_reward * correct + format_weight * (stopped by itself with an answer)
              + the DAPO overlong penalty when enabled

Dense per-token rewards (PRIME's implicit PRM) come later, on the kept groups only (rlpost/prime.py).
"""
from __future__ import annotations

import torch

from rewards.math import MathReward
from rollout.types import Group


def overlong_penalty(length: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft length penalty: 0 up to max_len - cache_len, then linear down to -1 at max_len, -1 beyond."""
    length = length.double()
    soft_start = max_len - cache_len
    ramp = (soft_start - length) / cache_len
    penalty = torch.where(length <= soft_start, torch.zeros_like(length), ramp)
    return torch.where(length > max_len, torch.full_like(length, -1.0), penalty)


class OutcomeReward:
    def metrics(self) -> dict[str, float]:
        return {}

    def __init__(self, verifier: MathReward, *, max_new_tokens: int, overlong_penalty: bool = False,
                 overlong_cache: int = 16):
        self.verifier = verifier
        self.max_new_tokens, self.penalise, self.cache = max_new_tokens, overlong_penalty, overlong_cache

    def __call__(self, groups: list[Group]) -> None:
        todo = [(s, g.answer) for g in groups for s in g.samples if s.correct is None]
        if not todo:
            return
        penalty = [0.0] * len(todo)
        if self.penalise:
            lengths = torch.tensor([len(s.response_ids) for s, _ in todo])
            penalty = overlong_penalty(lengths, self.max_new_tokens, self.cache).tolist()
        v = self.verifier
        for (sample, answer), p in zip(todo, penalty):
            correct, has_answer = v.check(sample.text, answer)
            sample.correct = bool(correct)
            sample.reward = v.correct_reward * correct + v.format_weight * (not sample.truncated and has_answer) + p
