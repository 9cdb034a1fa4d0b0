"""APRIL active partial rollouts (ALGORITHMS.md §2): over-provision, take the first B finished groups,
abort the rest and keep their partial work for the next step.

    submit : while (groups in flight or accepted) < B, submit a wave of N' groups, buffered groups
             first (FIFO), fresh prompts for the rest
    accept : groups in completion order (a group is done when every member stopped or hit L_max);
             an optional filter (dynamic sampling) drops a done group, which lets another wave in;
             at most `max_waves` waves a step (None: no bound, as the reference), after which the
             step ends with the groups kept so far, fewer than B (a policy that gets every prompt
             right would otherwise make the step never end)
    stop   : at B accepted groups, abort every request in flight; every unfinished group goes back
             to the buffer whole: finished members keep their response, partial members their prefix
    resume : from token ids, prompt + prefix, with max_new_tokens = L_max - tokens already generated

Every generated token keeps its behaviour log-prob and the policy version that sampled it, so the
trainer can measure staleness and mask or reweight stale tokens (rlpost/algorithms/grpo.py).
The engine is any StreamingEngine (rollout/engine.py). Evaluation must not go through this class.

On rollout workers (rollout/workers.py) two things change, both off by default (the colocated
scheduler above is unchanged):
  max_staleness k : a finished group with a token more than k versions older than the learner's is
             not trained on: its members are cleared and generated again (counted as
             stale_regenerated), as the workers' plain source does
  keep_running : the "stop" above aborts nothing: the requests in flight go on generating on the
             workers while the learner trains (their later tokens carry the newer version), and
             the next step starts with them. This is what makes APRIL asynchronous (slime's
             partial rollouts across weight updates); the checkpoint records those groups with the
             tokens that had come back, and a resume continues them from there.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from typing import Callable

from rollout.engine import StreamingEngine
from rollout.types import FinishReason, Group, Sample, SamplingParams

DONE = (FinishReason.STOP, FinishReason.LENGTH)


def pending_group(prompt_id: int, prompt: str, answer: str, prompt_ids: list[int], size: int) -> Group:
    """A fresh group: `size` members with nothing generated yet."""
    return Group(prompt_id, prompt, answer,
                 [Sample(list(prompt_ids), [], [], FinishReason.ABORT, versions=[]) for _ in range(size)])


def is_done(group: Group) -> bool:
    return all(s.finish_reason in DONE for s in group.samples)


def stale_fraction(groups: list[Group], version: int) -> float:
    """Share of response tokens sampled by an older policy than `version`, from per-token versions."""
    versions = [v for g in groups for s in g.samples for v in s.versions]
    return sum(v < version for v in versions) / max(len(versions), 1)


class AprilScheduler:
    def __init__(self, engine: StreamingEngine, target_groups: int, submit_groups: int | None = None, *,
                 max_new_tokens: int, params: SamplingParams,
                 accept: Callable[[Group], bool] | None = None, max_staleness: int | None = None,
                 keep_running: bool = False, max_waves: int | None = None):
        self.engine = engine
        self.target_groups = target_groups                      # B
        self.submit_groups = submit_groups or 2 * target_groups  # N', the wave size
        if self.submit_groups < target_groups:
            raise ValueError(f"APRIL needs N' >= B, got N'={self.submit_groups} < B={target_groups}")
        self.max_new_tokens = max_new_tokens                    # L_max, for a response in total
        self.params = params
        self.accept, self.max_waves = accept, max_waves
        self.buffer: deque[Group] = deque()
        self.max_staleness, self.keep_running = max_staleness, keep_running
        self.active: list[Group] = []  # keep_running: submitted, not accepted yet (requests may be running)
        self.in_flight: dict[str, tuple[Group, int]] = {}
        self._request_ids = itertools.count()

    def rollout(self, fresh: Callable[[int], list[Group]], version: int) -> tuple[list[Group], dict[str, float]]:
        """Exactly B finished (and accepted) groups, in completion order, plus the step's metrics.
        `fresh(n)` returns up to n new pending groups; `version` is the engine's policy version."""
        start = time.perf_counter()
        accepted: list[Group] = []
        rejected: list[Group] = []  # dropped by the filter, not recycled (as the reference does)
        submitted, self.active = self.active, []  # keep_running: the groups still going from the last step
        in_flight = self.in_flight
        counted = len(submitted)  # groups in flight or accepted, as §2.3 counts them
        stats = {"groups_submitted": 0.0, "tokens_generated": 0.0, "stale_regenerated": 0.0, "waves_capped": 0.0}
        done_queue: list[Group] = [g for g in submitted if is_done(g)]
        waves = 0
        while len(accepted) < self.target_groups:
            while counted < self.target_groups:
                if self.max_waves is not None and waves == self.max_waves:  # the filter kept too few
                    stats["waves_capped"] = 1.0
                    break
                waves += 1
                wave = [self.buffer.popleft() for _ in range(min(self.submit_groups, len(self.buffer)))]
                for group in wave:  # buffered work already too old to train on: start it afresh now
                    if self._too_stale(group, version):
                        stats["stale_regenerated"] += 1
                        self._clear(group)
                wave += fresh(self.submit_groups - len(wave))
                if not wave:
                    raise RuntimeError("APRIL: no prompts left to submit")
                for group in wave:
                    submitted.append(group)
                    self._submit(group, in_flight)
                    if is_done(group):  # every member already finished (or out of budget)
                        done_queue.append(group)
                counted += len(wave)
                stats["groups_submitted"] += len(wave)
            if not done_queue:
                if not in_flight:
                    if stats["waves_capped"]:  # every wave allowed has come back: train on what was kept
                        break
                    raise RuntimeError("APRIL: no finished group and no request in flight")  # a broken engine
                for request_id, out in self.engine.step():
                    group, member = in_flight.pop(request_id)
                    stats["tokens_generated"] += self._merge(group.samples[member], out, version)
                    if is_done(group):
                        done_queue.append(group)
            while done_queue and len(accepted) < self.target_groups:
                group = done_queue.pop(0)
                if self._too_stale(group, version):  # generated again, from the start
                    stats["stale_regenerated"] += 1
                    self._clear(group)
                    self._submit(group, in_flight)
                elif self.accept is None or self.accept(group):
                    accepted.append(group)
                else:
                    rejected.append(group)
                    counted -= 1
        waited = time.perf_counter() - start
        used = {id(g) for g in accepted + rejected}
        recycled = [g for g in submitted if id(g) not in used]  # in submission order: FIFO
        if self.keep_running:  # they go on generating while the learner trains
            self.active = recycled
        else:
            for request_id, (group, member) in list(in_flight.items()):
                stats["tokens_generated"] += self._merge(group.samples[member], self.engine.abort(request_id), version)
            in_flight.clear()
            self.buffer.extend(recycled)
        if self.max_staleness is None:
            del stats["stale_regenerated"]
        else:  # on the workers: how far behind the learner the trained tokens are, at most
            stats["staleness_max"] = float(max((version - v for g in accepted for s in g.samples for v in s.versions),
                                               default=0))
        stats.update(groups_finished=float(len(accepted)), groups_rejected=float(len(rejected)),
                     groups_recycled=float(len(recycled)),
                     buffer_size=float(len(self.buffer)), stale_fraction=stale_fraction(accepted, version),
                     rollout_s=waited)
        return accepted, stats

    @staticmethod
    def _clear(group: Group) -> None:
        group.samples = [Sample(list(s.prompt_ids), [], [], FinishReason.ABORT, versions=[]) for s in group.samples]

    def _too_stale(self, group: Group, version: int) -> bool:
        if self.max_staleness is None:
            return False
        oldest = min((v for s in group.samples for v in s.versions), default=version)
        return version - oldest > self.max_staleness

    def _submit(self, group: Group, in_flight: dict[str, tuple[Group, int]]) -> None:
        for member, sample in enumerate(group.samples):
            if sample.finish_reason in DONE:
                continue  # finished members are never regenerated
            budget = self.max_new_tokens - len(sample.response_ids)
            if budget <= 0:
                sample.finish_reason = FinishReason.LENGTH
                continue
            request_id = f"april-{next(self._request_ids)}"
            params = dataclasses.replace(self.params, max_new_tokens=budget)
            self.engine.add_request(request_id, sample.prompt_ids + sample.response_ids, params)
            in_flight[request_id] = (group, member)

    @staticmethod
    def _merge(sample: Sample, out: Sample, version: int) -> int:
        """Append what a request generated to the member it continues; returns the number of tokens."""
        sample.response_ids += out.response_ids
        sample.logprobs += out.logprobs
        sample.versions += out.versions or [version] * len(out.response_ids)
        sample.finish_reason = out.finish_reason
        sample.finished_at = out.finished_at
        return len(out.response_ids)

    def state_dict(self) -> dict:
        """The buffer (partial work and prompts not yet trained on) is part of the checkpoint; with
        keep_running, the groups still generating too, each member with the tokens that came back
        (a running request's tokens come back when it finishes: a resume generates those again)."""
        return {"buffer": [{**dataclasses.asdict(g), "samples": [{**dataclasses.asdict(s), "finish_reason": s.finish_reason.value}
                                                              for s in g.samples]} for g in [*self.active, *self.buffer]]}

    def load_state_dict(self, state: dict) -> None:
        self.active, self.in_flight = [], {}
        self.buffer = deque(
            Group(g["prompt_id"], g["prompt"], g["answer"],
                  [Sample(**{**s, "finish_reason": FinishReason(s["finish_reason"])}) for s in g["samples"]])
            for g in state["buffer"])
