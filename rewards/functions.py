"""Reward functions the user writes, called as TRL's GRPOTrainer calls them.

A function is named in the config as "package.module:name" or "path/to/file.py:name" and is called
once per rewards step on the whole batch:

    fn(prompts=..., completions=..., completion_ids=..., **columns) -> [float | None, ...]

`prompts` are the chat messages the policy saw (system + user), `completions` one assistant message
each (`[{"role": "assistant", "content": text}]`): rlpost always renders prompts with the chat
template, so its data is conversational in TRL's sense. `completion_ids` are the generated token
ids, `columns` the prompt row's other dataset columns as lists. A None means "this function does not
score this sample". The shaped reward is the weighted sum of the values that are not None (a sample
no function scores is an error); the verdict `correct` is `value >= threshold` of one function.

User code is untrusted for time and failure. By default each call runs in a worker process of its
own (rewards/worker.py, as the math verifier's checks: a lone process behind a pipe, killed and
replaced on timeout); `isolate: false` calls it in-process, faster but without the time limit. A timeout, an exception, a
wrong-length return or a value that is not a finite number either raises RewardError (one line
naming the function and the first offending sample) or scores 0 and is counted (`on_error: zero`).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rewards.outcome import overlong_penalty
from rewards.worker import Worker, WorkerError, one_line
from rollout.types import Group, Sample, UserError

STANDARD_ARGS = ("prompts", "completions", "completion_ids")


class RewardFunctionError(UserError):
    """A reward function that cannot be used at all (not importable, no such name, a signature it
    cannot be called with). Reported before any model loads; the CLI exits 2."""


class RewardError(RuntimeError):
    """A reward function failed during a run under `on_error: raise`: the run stops with this line."""


def load_function(spec: str) -> Callable:
    """'package.module:name' or '/path/to/file.py:name' (relative paths are resolved by the config)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise RewardFunctionError(f"reward function {spec!r}: expected 'package.module:name' or 'file.py:name'")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise RewardFunctionError(f"reward function {spec!r}: file not found: {path}")
            module_spec = importlib.util.spec_from_file_location(f"rlpost_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except RewardFunctionError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to import user code is one line
        raise RewardFunctionError(f"reward function {spec!r}: cannot import {where}: "
                                  + one_line(e, limit=None)) from None
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardFunctionError(f"reward function {spec!r}: {where} has no {name!r}")
    if not callable(fn):
        raise RewardFunctionError(f"reward function {spec!r}: {name!r} is not callable")
    return fn


def check_signature(fn: Callable, spec: str, columns: list[str]) -> None:
    """The function must be callable with keyword arguments prompts, completions, completion_ids and
    the dataset's columns: a required parameter outside those cannot be given."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return  # a builtin or C callable without a signature: trust it
    known = set(STANDARD_ARGS) | set(columns)
    for p in params:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.kind == p.POSITIONAL_ONLY and p.default is p.empty:
            raise RewardFunctionError(f"reward function {spec!r}: parameter {p.name!r} is positional-only; "
                                      "rlpost passes everything by keyword, as TRL does")
        if p.default is p.empty and p.name not in known:
            raise RewardFunctionError(f"reward function {spec!r}: required parameter {p.name!r} is none of "
                                      f"{', '.join(sorted(known))}")


def _arguments(fn: Callable, kwargs: dict) -> dict:
    """Everything when the function takes **kwargs (TRL's convention), else only what it names."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _function(spec: str):
    """The worker's handler (rewards/worker.py): kwargs -> the function's values; None -> None (the
    first request, so that the import happens outside any time limit)."""
    fn = load_function(spec)

    def handle(kwargs):
        if kwargs is None:
            return None
        values = fn(**_arguments(fn, kwargs))
        return list(values) if isinstance(values, (list, tuple)) else values
    return handle


@dataclass
class RewardFunction:
    """One configured function: its name (the metric `reward/NAME`), weight and isolation."""
    name: str
    spec: str
    weight: float = 1.0
    isolate: bool = True

    def __post_init__(self):
        self.fn = load_function(self.spec)  # in-process too: import errors surface before any model loads
        self.isolate = self.isolate and not getattr(self.fn, "isolates_itself", False)  # rewards.math:accuracy
        self._worker: Worker | None = None

    def __call__(self, kwargs: dict, timeout: float, samples=None):
        """The raw return value (`samples` are not the function's: it sees `kwargs` only). Raises
        TimeoutError, or WorkerError with the function's exception."""
        if not self.isolate:
            try:
                return self.fn(**_arguments(self.fn, kwargs))
            except Exception as e:  # noqa: BLE001 - user code
                raise WorkerError(one_line(e)) from e
        if self._worker is None:
            self._worker = Worker(_function, self.spec)
            try:
                self._worker.ask(None, None)  # the import, outside any time limit
            except WorkerError as e:
                self.close()
                raise RewardFunctionError(str(e)) from None
        try:
            return self._worker.ask(kwargs, timeout)
        except TimeoutError:
            self.close()  # it may be stuck in C code: kill it, start a fresh one next call
            raise
        except (OSError, EOFError):  # the worker died (killed, out of memory): replace it
            self.close()
            raise WorkerError("the worker process died") from None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and math.isfinite(float(v))


def validate(values, n: int) -> tuple[list[float | None], list[int], str]:
    """(values as floats or None, the indices of the bad ones, what is wrong with the first). A return
    that is not a list of n values is bad as a whole (every index)."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()  # a numpy array or tensor
    if not isinstance(values, (list, tuple)):
        return [0.0] * n, list(range(n)), f"returned {type(values).__name__}, not a list of {n} floats"
    if len(values) != n:
        return [0.0] * n, list(range(n)), f"returned {len(values)} values for {n} completions"
    out, bad, why = [], [], ""
    for i, v in enumerate(values):
        if v is None or _is_number(v):
            out.append(None if v is None else float(v))
            continue
        out.append(0.0)
        why = why or f"returned {v!r}, not a finite number"
        bad.append(i)
    return out, bad, why


class FunctionRewards:
    """The rewards step from user functions and reward models (anything with `name`, `weight` and
    `__call__(kwargs, timeout)`, see rewards/reward_model.py): fills `reward` (weighted sum) and `correct` (the verdict
    of `correct_from`) of every sample not scored yet. `problems[prompt_id]` gives a group's prompt
    row (question and columns); `messages(problem)` the chat messages the policy saw."""

    def __init__(self, functions: list[RewardFunction], problems: list, messages: Callable[[object], list[dict]], *,
                 correct_from: str, threshold: float = 1.0, on_error: str = "raise", timeout_s: float = 5.0,
                 max_new_tokens: int = 0, overlong: bool = False, overlong_cache: int = 16):
        self.functions, self.problems, self.messages = functions, problems, messages
        self.verdict = next(f for f in functions if f.name == correct_from)
        self.threshold, self.on_error, self.timeout_s = threshold, on_error, timeout_s
        self.max_new_tokens, self.overlong, self.overlong_cache = max_new_tokens, overlong, overlong_cache
        self._sums = {f.name: [0.0, 0] for f in functions}
        self.counters: dict[str, int] = {}

    # -- scoring -------------------------------------------------------------------------------
    def _kwargs(self, problems: list, samples: list[Sample]) -> dict:
        """TRL's keyword arguments for samples[i] answering problems[i]."""
        kwargs = {"prompts": [self.messages(p) for p in problems],
                  "completions": [[{"role": "assistant", "content": s.text}] for s in samples],
                  "completion_ids": [list(s.response_ids) for s in samples]}
        for key in sorted({k for p in problems for k in p.columns} - set(STANDARD_ARGS)):
            kwargs[key] = [p.columns.get(key) for p in problems]
        return kwargs

    def _call(self, f: RewardFunction, kwargs: dict, problems: list, samples: list[Sample]) -> list[float | None]:
        """f's validated values; a failure raises RewardError (on_error=raise) or scores 0, counted."""
        try:
            values, bad, why = validate(f(kwargs, self.timeout_s, samples), len(samples))
        except TimeoutError:
            values, bad = [0.0] * len(samples), list(range(len(samples)))
            why = f"gave no answer within reward.timeout_s={self.timeout_s:g} s"
            self._count(f"timeouts/{f.name}")
        except WorkerError as e:
            values, bad, why = [0.0] * len(samples), list(range(len(samples))), f"raised {e}"
        if not bad:
            return values
        if self.on_error == "raise":
            i = bad[0]
            raise RewardError(f"reward function {f.name!r} {why} (first offending sample: completion {i} of "
                              f"{len(samples)}, prompt {problems[i].question[:60]!r}, completion {samples[i].text[:60]!r})")
        self._count(f"errors/{f.name}", len(bad))  # on_error: zero
        return values

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def score(self, problems: list, samples: list[Sample]) -> None:
        """Set `reward` and `correct` of `samples` (samples[i] answers problems[i])."""
        if not samples:
            return
        kwargs = self._kwargs(problems, samples)  # built once: every function gets the same arguments
        values = {f.name: self._call(f, kwargs, problems, samples) for f in self.functions}
        penalty = [0.0] * len(samples)
        if self.overlong:
            lengths = torch.tensor([len(s.response_ids) for s in samples])
            penalty = overlong_penalty(lengths, self.max_new_tokens, self.overlong_cache).tolist()
        for i, sample in enumerate(samples):
            scored = [(f.weight, values[f.name][i]) for f in self.functions if values[f.name][i] is not None]
            if not scored:
                raise RewardError(f"no reward function scored completion {i} (prompt {problems[i].question[:60]!r}): "
                                  f"every one of {', '.join(f.name for f in self.functions)} returned None")
            sample.reward = sum(w * v for w, v in scored) + penalty[i]
            verdict = values[self.verdict.name][i]
            sample.correct = verdict is not None and verdict >= self.threshold
            if verdict is None:
                self._count("unverified")
        for f in self.functions:
            got = [v for v in values[f.name] if v is not None]
            self._sums[f.name][0] += sum(got)
            self._sums[f.name][1] += len(got)

    def __call__(self, groups: list[Group]) -> None:
        todo = [(self.problems[g.prompt_id], s) for g in groups for s in g.samples if s.correct is None]
        self.score([p for p, _ in todo], [s for _, s in todo])

    def verdicts(self, problems: list, samples: list[Sample]) -> list[bool]:
        """The verdict alone (held-out eval): only the `correct_from` function runs."""
        values = self._call(self.verdict, self._kwargs(problems, samples), problems, samples)
        return [v is not None and v >= self.threshold for v in values]

    # -- what the trainer logs -----------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        out = {f"reward/{name}": total / count for name, (total, count) in self._sums.items() if count}
        self._sums = {f.name: [0.0, 0] for f in self.functions}
        return out

    def pop_counters(self) -> dict[str, int]:
        """The same keys every call (ranks sum them): errors / timeouts per function, unverified samples."""
        keys = [f"{kind}/{f.name}" for f in self.functions for kind in ("errors", "timeouts")] + ["unverified"]
        out = {key: self.counters.get(key, 0) for key in keys}
        self.counters = {}
        return out

    def close(self) -> None:
        for f in self.functions:
            f.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


