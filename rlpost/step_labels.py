"""Step-labelled solutions in the ProcessBench format (ALGORITHMS.md §6.9): `problem`, `steps` (a list
of strings), `label` = the 0-based index of the first wrong step, -1 when every step is right.

Two seeded, deterministic sources (their own module rather than rlpost/data.py, which holds the
prompt and preference loaders and would pass 500 lines):
- `arithmetic_chains`: multi-step arithmetic ("Start with 7. Add 5. ..."), one step per operation.
- `corrupt_gsm8k`: GSM8K reference solutions, whose `<<48/2=24>>` annotations make each step
  checkable: one computation is corrupted and the wrong value propagates.
In both, an injected error propagates consistently: later steps compute correctly from the wrong
value, so the first wrong step is the only place where a step's own arithmetic fails.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_WORDS = {"+": "Add {b}.", "-": "Subtract {b}.", "*": "Multiply by {b}."}


@dataclass
class StepSolution:
    problem: str
    steps: list[str]
    label: int  # index of the first wrong step, -1 if none
    answer: str          # the final value the steps reach (wrong when an error propagated to it)
    correct_answer: str  # the problem's true answer: what an outcome verifier checks against

    def as_row(self) -> dict:
        """One jsonl row for two uses: a conversational `prompt / completion` with the true `answer`
        (the dataset source trains a PRM on it; the verifier labels the outcome, the step label is never
        read), and the ProcessBench fields `problem / steps / label` (the process evaluation). The
        completion is the steps joined by "\\n\\n", the delimiter the evaluation splits steps on."""
        return {"prompt": [{"role": "user", "content": self.problem}],
                "completion": [{"role": "assistant", "content": "\n\n".join(self.steps)}],
                "answer": self.correct_answer, "problem": self.problem, "steps": self.steps, "label": self.label}


def arithmetic_chains(n: int, seed: int, *, num_steps: int = 4, error_rate: float = 0.5) -> list[StepSolution]:
    """`n` chains of `num_steps` one-digit operations; with probability `error_rate` one step (chosen
    uniformly) states a wrong result, and every later step computes from that wrong result."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        value = true = rng.randint(1, 9)
        ops = [(rng.choice("+-*"), rng.randint(1, 9)) for _ in range(num_steps)]
        problem = f"Start with {value}. " + " ".join(_WORDS[op].format(b=b) for op, b in ops) + " What is the result?"
        wrong_at = rng.randrange(num_steps) if rng.random() < error_rate else -1
        steps = []
        for k, (op, b) in enumerate(ops):
            result = _OPS[op](value, b)
            if k == wrong_at:
                result += rng.choice([-3, -2, -1, 1, 2, 3])
            steps.append(f"{value} {op} {b} = {result}")
            value, true = result, _OPS[op](true, b)
        out.append(StepSolution(problem, steps, wrong_at, str(value), str(true)))
    return out


_ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
_NUMBER = re.compile(r"\d*\.\d+|\d+")


def _evaluate(expr: str) -> float | None:
    if not re.fullmatch(r"[\d\s.+\-*/()]+", expr):
        return None
    try:
        return float(eval(expr, {"__builtins__": {}}, {}))  # noqa: S307 - digits and + - * / ( ) only
    except (SyntaxError, ZeroDivisionError):
        return None


class _Unusable(Exception):
    pass


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.10g}"


def corrupt_gsm8k(question: str, solution: str, seed: int) -> StepSolution | None:
    """One GSM8K row -> a step-labelled solution: the lines before `####` are the steps. With the seeded
    coin, one annotated computation gets a wrong result (off by 1-3, or x2); every later annotation
    whose expression uses a changed value is recomputed, and the changed values replace the old ones
    in the text. Rows with no checkable annotation, or whose own annotations do not check, give None."""
    rng = random.Random(seed)
    body, _, final = solution.partition("####")
    steps = [line.strip() for line in body.strip().splitlines() if line.strip()]
    annotated = [k for k, s in enumerate(steps) if _ANNOTATION.search(s)]
    for s in steps:  # the reference itself must check, or a "first wrong step" means nothing
        for expr, stated in _ANNOTATION.findall(s):
            value = _evaluate(expr)
            if value is None or _evaluate(stated) is None or abs(value - float(_evaluate(stated))) > 1e-6:
                return None
    if not annotated:
        return None
    answer = final.strip().replace(",", "")
    if rng.random() < 0.5:
        return StepSolution(question, steps, -1, answer, answer)
    wrong_at = rng.choice(annotated)
    changed: dict[str, str] = {}  # old number -> new number, as written

    def rewrite(step: str, corrupt: bool) -> str:
        """Recompute the step's annotations from the changed values; `corrupt` falsifies the first."""
        new_step, position = step, 0
        for match in _ANNOTATION.finditer(step):
            expr, stated = match.group(1), match.group(2)
            new_expr = _NUMBER.sub(lambda m: changed.get(m.group(0), m.group(0)), expr)
            value = _evaluate(new_expr)
            if value is None:  # the propagated values make it uncomputable (a division by zero, ...)
                raise _Unusable
            if corrupt:
                value = value * 2 if rng.random() < 0.25 and value else value + rng.choice([-3, -2, -1, 1, 2, 3])
                corrupt = False
            new_value = _fmt(value)
            if new_value != stated:
                changed[stated] = new_value
            old_text, new_text = match.group(0), f"<<{new_expr}={new_value}>>"
            start = new_step.index(old_text, position)
            before, after = new_step[:start], new_step[start + len(old_text):]
            if after.startswith(stated):  # the visible result right after the annotation
                after = new_value + after[len(stated):]
            if expr != new_expr and expr in before:  # the visible expression, when written as annotated
                before = before[:before.rindex(expr)] + new_expr + before[before.rindex(expr) + len(expr):]
            new_step = before + new_text + after
            position = len(before) + len(new_text)
        return new_step

    try:
        out = [step if k < wrong_at else rewrite(step, corrupt=k == wrong_at) for k, step in enumerate(steps)]
    except _Unusable:
        return None
    return StepSolution(question, out, wrong_at, changed.get(answer, answer), answer)
