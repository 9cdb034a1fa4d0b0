"""Outcome reward for math answers, checked by `math-verify`.

Every check runs in a separate worker process with a wall-clock limit: sympy can spin for minutes
(or forever) on adversarial LaTeX, sometimes inside C code where no signal reaches it, so the only
reliable limit is killing the worker. A timeout or any exception scores 0 and is counted.
(math-verify's own signal timeouts are off inside the worker: they fail silently, so on a loaded
machine they turned right answers into wrong ones without a trace.)

An answer must be a value. math-verify evaluates the expression it extracts, so "To calculate
7 + 1, you add them." scores as the answer 8; a real run learned exactly that, restating every
question. An extracted answer with an arithmetic operator between two operands is not accepted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from rewards.worker import Worker

_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\uff0d": "-"})  # minus sign, full-width hyphen-minus
_EXPRESSION = re.compile(r"[\d)}]\s*(?:[-+*×÷^]|\\times|\\cdot|\\div)\s*[\d({\\]")


def is_value(extracted: str) -> bool:
    """'42', '-3.5', '\\frac{1}{2}', '1,000', '1/2' are values; '7 + 1' and '(964 * 7) * 5' are expressions."""
    return not _EXPRESSION.search(extracted)


def _verify(response: str, answer: str) -> tuple[bool, bool]:
    """(correct, a value could be extracted). Runs inside the worker process."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(answer, parsing_timeout=None)
    if not gold:
        raise ValueError(f"reference answer {answer!r} could not be parsed")
    pred = parse(response, parsing_timeout=None)
    if not pred or not is_value(str(pred[-1])):
        return False, False
    return bool(verify(gold, pred, timeout_seconds=None)), True


def _verifier():
    """The worker's handler (rewards/worker.py): (response, answer) -> (correct, has_answer)."""
    return lambda pair: _verify(*pair)


@dataclass
class MathReward:
    """Callable scorer: `reward(responses, answers, stopped)` -> list of floats.

    correct answer -> `correct_reward`; plus `format_weight` when the response ended by itself (not
    truncated) and contains an extractable answer. A check that times out, a worker that dies and a
    checker error all score 0 and are counted; a dead or stuck worker is replaced.
    """
    timeout_s: float = 5.0
    correct_reward: float = 1.0
    format_weight: float = 0.0
    counters: dict[str, int] = field(default_factory=lambda: {"timeouts": 0, "errors": 0, "checked": 0})

    def __post_init__(self):
        self._process: Worker | None = None

    def _worker(self) -> Worker:
        if self._process is None:
            self._process = Worker(_verifier)
            self._process.ask(("1", "1"), None)  # warm up (imports, sympy caches) outside any time limit
        return self._process

    def check(self, response: str, answer: str) -> tuple[bool, bool]:
        self.counters["checked"] += 1
        response = response.translate(_MINUS_SIGNS)  # "−5" (U+2212) is -5, which math-verify reads as 5
        try:
            return self._worker().ask((response, answer), self.timeout_s)
        except TimeoutError:
            self.counters["timeouts"] += 1
            self.close()  # the worker may be stuck in C code: kill it, start a fresh one next call
        except (OSError, EOFError):  # the worker died (killed, out of memory): replace it
            self.counters["errors"] += 1
            self.close()
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

    def verdicts(self, problems: list, samples: list) -> list[bool]:
        """The held-out eval's question: is samples[i] a right answer to problems[i] (`.answer`)?"""
        return self.correctness([s.text for s in samples], [p.answer for p in problems])

    def pop_counters(self) -> dict[str, int]:
        out = dict(self.counters)
        for key in self.counters:
            self.counters[key] = 0
        return out

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


_SHARED: MathReward | None = None
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: what follows '####', thousands commas dropped."""
    m = _GSM8K_ANSWER.search(text)
    return m.group(1).replace(",", "") if m else None


def accuracy(completions: list, answer: list, **kwargs) -> list[float]:
    """The built-in verifier as a reward function in TRL's convention (`reward.functions: [{fn:
    rewards.math:accuracy}]`): 1.0 when math-verify finds the reference `answer` column's value as the
    completion's final answer (a GSM8K answer is what follows '####'), else 0.0. Every check runs in
    the verifier's own killable worker with a 5 s limit, so the function isolates itself."""
    global _SHARED
    if _SHARED is None:
        _SHARED = MathReward()
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    golds = [g if (g := gsm8k_answer(str(a))) is not None else str(a) for a in answer]
    return [float(_SHARED.check(t, g)[0]) for t, g in zip(texts, golds)]


accuracy.isolates_itself = True  # rewards.functions runs it in-process: its checks already run in a worker
