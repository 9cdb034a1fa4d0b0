"""Outcome reward for math answers, checked by `math-verify`.

Every check runs in a separate worker process with a wall-clock limit: sympy can spin for minutes
(or forever) on adversarial LaTeX, sometimes inside C code where no signal reaches it, so the only
reliable limit is killing the worker. A timeout or any exception scores 0 and is counted.
"""
from __future__ import annotations

import math
import multiprocessing as mp
from dataclasses import dataclass, field


def _verify(response: str, answer: str, limit_s: int) -> tuple[bool, bool]:
    """(correct, an answer could be extracted). Runs inside the worker process."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(answer, parsing_timeout=limit_s)
    pred = parse(response, parsing_timeout=limit_s)
    if not gold:
        raise ValueError(f"reference answer {answer!r} could not be parsed")
    return bool(pred) and verify(gold, pred, timeout_seconds=limit_s), bool(pred)


@dataclass
class MathReward:
    """Callable scorer: `reward(responses, answers, stopped)` -> list of floats.

    correct answer -> `correct_reward`; plus `format_weight` when the response ended by itself (not
    truncated) and contains an extractable answer.
    """
    timeout_s: float = 5.0
    correct_reward: float = 1.0
    format_weight: float = 0.0
    counters: dict[str, int] = field(default_factory=lambda: {"timeouts": 0, "errors": 0, "checked": 0})

    def __post_init__(self):
        self._pool = None

    def _worker(self):
        if self._pool is None:
            # forkserver: the worker is a small clean process, not a fork of a big multithreaded trainer.
            self._pool = mp.get_context("forkserver").Pool(1)
        return self._pool

    def check(self, response: str, answer: str) -> tuple[bool, bool]:
        self.counters["checked"] += 1
        inner_limit = max(1, math.ceil(self.timeout_s))
        try:
            return self._worker().apply_async(_verify, (response, answer, inner_limit)).get(self.timeout_s)
        except mp.TimeoutError:
            self.counters["timeouts"] += 1
            self.close()  # the worker may be stuck in C code: kill it, start a fresh one next call
        except Exception:  # noqa: BLE001 - any failure of the checker is reward 0, never a crash
            self.counters["errors"] += 1
        return False, False

    def __call__(self, responses: list[str], answers: list[str], stopped: list[bool] | None = None) -> list[float]:
        stopped = stopped if stopped is not None else [True] * len(responses)
        rewards = []
        for response, answer, ended in zip(responses, answers, stopped):
            correct, has_answer = self.check(response, answer)
            formatted = ended and has_answer
            rewards.append(self.correct_reward * correct + self.format_weight * formatted)
        return rewards

    def correctness(self, responses: list[str], answers: list[str]) -> list[bool]:
        return [self.check(r, a)[0] for r, a in zip(responses, answers)]

    def pop_counters(self) -> dict[str, int]:
        out = dict(self.counters)
        for key in self.counters:
            self.counters[key] = 0
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
