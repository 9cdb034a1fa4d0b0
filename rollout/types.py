"""The records both sides share: samples grouped by prompt, sampling parameters, the user-error base.

`rlpost` (the trainer side) imports these; `rollout` and `rewards` never import `rlpost`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum


class UserError(ValueError):
    """Bad input from the user (config, paths, data, models). The CLI prints it as one line, exit 2."""


class FinishReason(str, Enum):
    STOP = "stop"      # the model emitted an end-of-sequence / stop token
    LENGTH = "length"  # hit max_new_tokens: the response is truncated
    ABORT = "abort"    # cut off by the scheduler (APRIL); may be resumed later


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Sample:
    """One response. `logprobs[t]` is the behaviour log-prob of `response_ids[t]` under the sampling
    distribution (logits / temperature, before top-p), `versions[t]` the policy version that sampled it.
    `finished_at` is the wall-clock time (time.time()) at which the engine saw it stop or hit its length.

    Rewards (rewards/) fill in the rest: `correct` is the verifier's verdict alone, `reward` the shaped
    scalar the objective trains on (verdict plus format bonus, length penalty, ...), `token_rewards`
    optional per-token rewards (dense process rewards, PRIME). `correct is None` means not scored yet."""
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    versions: list[int] = field(default_factory=list)
    text: str = ""
    reward: float = 0.0
    finished_at: float | None = None
    correct: bool | None = None
    token_rewards: list[float] | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == FinishReason.LENGTH


@dataclass
class Group:
    """All samples drawn for one prompt. Groups are ragged: `len(samples)` may differ per group."""
    prompt_id: int
    prompt: str
    answer: str
    samples: list[Sample]
    columns: dict = field(default_factory=dict)  # a fixed-response row's extra columns (TRL's `margin`)


def tail_wait_s(samples: list[Sample], start: float, share: float = 0.5) -> float:
    """Seconds a rollout waited on its longest samples: from the moment `share` of `samples` had
    finished to the moment the last one did. Samples finished before `start` (recycled by APRIL)
    count as finished at `start`. (With a higher share, samples cut at max_new_tokens in the same
    engine step would hide the tail: they all finish at once.)"""
    times = sorted(max((s.finished_at or start) - start, 0.0) for s in samples)
    if not times:
        return 0.0
    return times[-1] - times[max(math.ceil(share * len(times)) - 1, 0)]


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed job, (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distinct_rows(rows: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """For a [N, L] tensor: the index of the first row of each distinct row, and for every row the
    number of its distinct row (rows[first][inverse] == rows). How the engine and the learner decode a
    repeated prompt once."""
    import torch
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((len(distinct),), len(rows), device=rows.device).scatter_reduce(
        0, inverse, torch.arange(len(rows), device=rows.device), "amin")
    return first, inverse
