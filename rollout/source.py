"""Where a step's groups come from. One interface, three implementations and a wrapper:

    SyncSource     prompts from the sampler -> engine.generate -> every group generated to the end
    AprilSource    active partial rollouts (rollout/april.py): the first B groups to finish
    AsyncSource    rollout workers in their own processes (rollout/workers.py), ahead of the learner
                   by at most rollout.max_staleness policy versions
    DatasetSource  fixed responses from a file (preference pairs, reference answers): no engine
    RoundSource    wraps one of them for objectives that train several steps per batch of samples

    next_groups(version) -> (groups, stats)   this step's groups, unscored unless the source had to
                                              score them (APRIL's accept filter)
    observe(groups) -> stats                  the scored groups go back to the prompt sampler (CurES
                                              learns from `correct`); returns the sampler's metrics
    warm_up() -> stats                        before step 1: the sampler's own pass (CurES's
                                              difficulty pass), nothing for the others
    state_dict() / load_state_dict()          sampler state and APRIL's buffer: resume is exact
    summed / maxed                            which of its stats add up over ranks (counts) or take
                                              the largest rank's value; the others are averaged

The prompt sampler is anything meeting `PromptSampler` (rlpost/curriculum.py has uniform and CurES).
The source scores through the `reward` callable it is given (rewards/outcome.py), which skips samples
already scored; the trainer calls the same callable on every step's groups, so rewards are one step
of the loop whichever source ran. Nothing here imports the trainer side (`rlpost`).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Protocol, Sequence

import torch

from rollout.april import AprilScheduler, pending_group
from rollout.engine import RolloutEngine, StreamingEngine
from rollout.types import Group, Sample, SamplingParams, UserError, world

Reward = Callable[[list[Group]], object]            # scores samples in place (sets correct / reward)
Keep = Callable[[Group], bool]                      # which scored groups are trained on
GradNorms = Callable[[list[Sample]], list[float]]   # per-response head gradient norms (CurES option)


class PromptSampler(Protocol):
    wants_grad_norms: bool    # CurES's grad_norm allocation: observe() passes per-response norms
    warm_up_rollouts: int     # rollouts of every training prompt before step 1 (0: no pass)

    def next_batch(self, size: int) -> tuple[list[int], list[int]]:
        """`size` prompt indices and the number of samples to draw for each."""

    def update(self, prompt_id: int, correct: Sequence[bool], grad_norms: Sequence[float] | None = None) -> None: ...

    def metrics(self, groups: list[Group]) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Prompts(Protocol):
    """A tokenized prompt set (rlpost.data.PromptSet): `problems[i].question / .answer`, `prompt_ids[i]`."""
    problems: list
    prompt_ids: list[list[int]]


def generate_groups(engine: RolloutEngine, prompts: Prompts, prompt_ids: list[int], group_sizes: list[int],
                    params: SamplingParams) -> list[Group]:
    """group_sizes[k] samples for prompt prompt_ids[k], all generated in one engine call."""
    requests = [prompts.prompt_ids[i] for i, k in zip(prompt_ids, group_sizes) for _ in range(k)]
    return as_groups(prompts, list(zip(prompt_ids, group_sizes)), engine.generate(requests, params))


def as_groups(prompts: Prompts, items: list[tuple[int, int]], samples: list[Sample]) -> list[Group]:
    """The samples of one engine call (k per prompt, in order) as one group per (prompt id, k)."""
    it = iter(samples)
    return [Group(prompt_id=i, prompt=prompts.problems[i].question, answer=prompts.problems[i].answer,
                  samples=[next(it) for _ in range(k)]) for i, k in items]


class _SampledSource:
    """What the engine-backed sources share: the sampler, its warm-up pass and its feedback."""
    summed: tuple[str, ...] = ()
    maxed: tuple[str, ...] = ()

    def __init__(self, engine: RolloutEngine, sampler: PromptSampler, prompts: Prompts, params: SamplingParams,
                 groups_per_step: int, reward: Reward, grad_norms: GradNorms | None = None):
        self.engine, self.sampler, self.prompts, self.params = engine, sampler, prompts, params
        self.groups_per_step, self.reward, self.grad_norms = groups_per_step, reward, grad_norms

    def warm_up(self) -> dict[str, float]:
        """The sampler's pass before step 1: `warm_up_rollouts` samples of every training prompt with the
        current model, scored and observed (CurES's difficulty pass). Real cost, reported."""
        n = self.sampler.warm_up_rollouts
        if n == 0:
            return {}
        start = time.time()
        rank, world_size = world()
        ids = list(range(len(self.prompts.problems)))[rank::world_size]
        groups = generate_groups(self.engine, self.prompts, ids, [n] * len(ids), self.params)
        self.reward(groups)
        self.observe(groups)
        tokens = sum(len(s.response_ids) for g in groups for s in g.samples)
        return {"init/rollouts": float(len(self.prompts.problems) * n), "init/tokens": float(tokens * world_size),
                "init/seconds": time.time() - start}

    def observe(self, groups: list[Group]) -> dict[str, float]:
        """Every scored rollout of every rank goes to the sampler (with per-response gradient norms,
        computed by the rank that generated it, when the sampler wants them): the ranks' samplers stay
        identical, and the sampler's metrics describe the whole step."""
        norms = [self.grad_norms(g.samples) if self.sampler.wants_grad_norms and self.grad_norms else None
                 for g in groups]
        if world()[1] > 1:
            everyone: list = [None] * world()[1]
            torch.distributed.all_gather_object(everyone, (groups, norms))
            groups = [g for rank_groups, _ in everyone for g in rank_groups]
            norms = [n for _, rank_norms in everyone for n in rank_norms]
        for g, n in zip(groups, norms):
            self.sampler.update(g.prompt_id, [bool(s.correct) for s in g.samples], n)
        return self.sampler.metrics(groups)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])


def every_rank(mine: dict) -> dict:
    """State that differs per rank: this rank's alone on one rank, every rank's on several (a collective)."""
    if world()[1] == 1:
        return mine
    everyone: list = [None] * world()[1]
    torch.distributed.all_gather_object(everyone, mine)
    return {"world_size": world()[1], "ranks": everyone}


def this_rank(state: dict, what: str) -> dict:
    """This rank's part of every_rank's state; another world size is an error naming `what` is per rank."""
    saved = state.get("world_size", 1)
    if saved != world()[1]:
        raise ValueError(f"{what}: this checkpoint was written by {saved} rank(s), this run has {world()[1]}; "
                         f"resume it on {saved}")
    return state["ranks"][world()[0]] if "ranks" in state else state


def request_seed(run_seed: int, index: int) -> int:
    """The seed of the `index`-th generation request of a run (rollout.seed_requests, and always for
    rollout workers): what is sampled depends on the request, not on which process runs it or when."""
    return (run_seed * 1_000_003 + index) % 2 ** 31


def rank_share(total: int) -> int:
    """This rank's part of `total` when item k goes to rank k % world."""
    rank, world_size = world()
    return len(range(rank, total, world_size))


class SyncSource(_SampledSource):
    """B prompts per step in all (the sampler draws B, prompt k goes to rank k % world: the same
    prompts and group sizes whatever the world size), each group generated to the end in one call.
    With `seed`, the step's call carries request_seed(seed, calls so far) (rollout.seed_requests)."""

    def __init__(self, *args, seed: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed, self.calls = seed, 0

    def next_groups(self, version: int) -> tuple[list[Group], dict[str, float]]:
        rank, world_size = world()
        prompt_ids, group_sizes = self.sampler.next_batch(self.groups_per_step)
        prompt_ids, group_sizes = prompt_ids[rank::world_size], group_sizes[rank::world_size]
        params = self.params
        if self.seed is not None:
            params = dataclasses.replace(params, seed=request_seed(self.seed, self.calls))
        self.calls += 1
        return generate_groups(self.engine, self.prompts, prompt_ids, group_sizes, params), {}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.calls = state.get("calls", 0)


class AsyncSource(_SampledSource):
    """Rollout workers (rollout/workers.py: `engine` is the WorkerPool) generating ahead of the learner.

    It keeps (max_staleness + 1) steps' worth of this rank's groups in flight: each step's draw of B
    prompts (this rank's share of them), split over the K workers, one request per worker, each with
    its own seed. next_groups takes this rank's share of B finished groups, in the order they finish,
    and keeps the rest for the next step. A group with a token sampled more than max_staleness versions
    before the learner's is not trained on: its prompt is generated again (counted in
    rollout/stale_regenerated), so no drawn prompt is lost and none is biased out for being slow.
    max_staleness 0 is synchronous: the step's groups are requested after the weights of `version`
    went out, and all of them are waited for.

    The checkpoint records what was in flight or finished but not trained on (as prompt ids and
    sizes); a resume generates those first, with the resumed weights."""
    summed = ("rollout/stale_regenerated", "rollout/in_flight_groups", "rollout/weight_sync_bytes")
    maxed = ("rollout/staleness_max",)

    def __init__(self, pool, sampler: PromptSampler, prompts: Prompts, params: SamplingParams, groups_per_step: int,
                 reward: Reward, *, max_staleness: int, seed: int, grad_norms: GradNorms | None = None):
        super().__init__(pool, sampler, prompts, params, groups_per_step, reward, grad_norms)
        self.max_staleness, self.seed = max_staleness, seed
        self.share = rank_share(groups_per_step)
        if self.share == 0:
            raise UserError(f"rollout.prompts_per_step={groups_per_step} is fewer than the {world()[1]} ranks")
        self.requests = 0                                 # requests made: the next one's seed index
        self.in_flight: dict[int, list[tuple[int, int]]] = {}  # request id -> its (prompt id, group size)s
        self.finished: list[Group] = []                   # finished, not trained on yet
        self.again: list[tuple[int, int]] = []            # to generate before drawing new prompts

    def _request(self, items: list[tuple[int, int]], worker: int) -> None:
        params = dataclasses.replace(self.params, seed=request_seed(self.seed, self.requests))
        self.requests += 1
        prompts = [self.prompts.prompt_ids[i] for i, k in items for _ in range(k)]
        self.in_flight[self.engine.submit(prompts, params, worker)] = items

    def _submit(self, items: list[tuple[int, int]]) -> None:
        """One request per worker (round robin over the items)."""
        workers = len(self.engine.workers)
        for w in range(min(workers, len(items))):
            self._request(items[w::workers], w)

    def _fill(self) -> None:
        queued = sum(len(items) for items in self.in_flight.values()) + len(self.finished)
        if self.again:
            self._submit(self.again)
            queued, self.again = queued + len(self.again), []
        rank, world_size = world()
        while queued < (self.max_staleness + 1) * self.share:
            ids, sizes = self.sampler.next_batch(self.groups_per_step)  # every rank draws the same
            mine = list(zip(ids, sizes))[rank::world_size]
            self._submit(mine)
            queued += len(mine)

    def next_groups(self, version: int) -> tuple[list[Group], dict[str, float]]:
        self._fill()
        regenerated = 0
        while True:
            fresh, stale = [], []
            for g in self.finished:
                oldest = min(min(s.versions, default=version) for s in g.samples)
                (fresh if version - oldest <= self.max_staleness else stale).append(g)
            if stale:  # too old to train on: generated again, with the weights the workers have now
                regenerated += len(stale)
                self._submit([(g.prompt_id, len(g.samples)) for g in stale])
            self.finished = fresh
            if len(self.finished) >= self.share:
                break
            self.engine.wait_any(list(self.in_flight))
            for request_id, samples in sorted(self.engine.take(list(self.in_flight), block=False).items()):
                self.finished += as_groups(self.prompts, self.in_flight.pop(request_id), samples)
        groups, self.finished = self.finished[:self.share], self.finished[self.share:]
        lags = [version - v for g in groups for s in g.samples for v in s.versions]
        return groups, {"rollout/staleness_mean": sum(lags) / max(len(lags), 1),
                        "rollout/staleness_max": float(max(lags, default=0)),
                        "rollout/stale_regenerated": float(regenerated),
                        "rollout/in_flight_groups": float(sum(len(v) for v in self.in_flight.values())),
                        "rollout/weight_sync_bytes": float(self.engine.sync_bytes)}

    def state_dict(self) -> dict:
        """The sampler, the request count and what was drawn but not trained on (a collective on
        several ranks: every rank's part)."""
        owed = self.again + [item for items in self.in_flight.values() for item in items]
        owed += [(g.prompt_id, len(g.samples)) for g in self.finished]
        return every_rank({**super().state_dict(), "requests": self.requests, "owed": owed})

    def load_state_dict(self, state: dict) -> None:
        mine = this_rank(state, "rollout workers keep one share of the prompts per rank")
        super().load_state_dict(mine)
        self.requests, self.again = mine["requests"], [tuple(x) for x in mine["owed"]]


class AprilSource(_SampledSource):
    """APRIL over the sampler's prompt stream: B finished groups per step, partial work kept in the
    scheduler's buffer (part of this source's state). A finished group is decoded (a resumed response
    was generated in pieces, so its text comes from all its token ids), scored, and passed through
    `keep` (e.g. GRPO's dynamic sampling) before it counts towards B: the step trains on B kept groups.

    On N ranks every rank runs its own engine, scheduler and buffer over its own share of the prompts
    (`sampler` is then a rlpost.curriculum.ShardSampler, built so in rlpost/build.py) and finishes
    its share of B (waves of its share of N'); the checkpoint holds every rank's buffer, and a resume
    must use the same world size (the buffers and prompt shares are per rank). On rollout workers
    (`engine` is the WorkerPool) the scheduler bounds staleness by `max_staleness` and, with
    `keep_running`, leaves the requests in flight running while the learner trains (rollout/april.py)."""
    summed = tuple(f"april/{k}" for k in ("groups_submitted", "tokens_generated", "groups_finished", "groups_rejected",
                                          "groups_recycled", "buffer_size", "stale_regenerated", "waves_capped"))
    maxed = ("april/rollout_s", "april/staleness_max")

    def __init__(self, engine: RolloutEngine, sampler: PromptSampler, prompts: Prompts, params: SamplingParams,
                 groups_per_step: int, reward: Reward, tokenizer, *, submit_groups: int | None = None,
                 keep: Keep | None = None, grad_norms: GradNorms | None = None, max_staleness: int | None = None,
                 keep_running: bool = False, max_waves: int | None = None):
        super().__init__(engine, sampler, prompts, params, groups_per_step, reward, grad_norms)
        if not isinstance(engine, StreamingEngine):
            raise UserError(f"rollout.scheduler=april needs a streaming engine; {type(engine).__name__} is not one")
        self.tokenizer, self.keep = tokenizer, keep
        target = rank_share(groups_per_step)
        if target == 0:
            raise UserError(f"rollout.prompts_per_step={groups_per_step} is fewer than the {world()[1]} ranks: "
                            f"APRIL needs at least one group per rank")
        waves = max(target, -(-(submit_groups or 2 * groups_per_step) // world()[1]))
        self.scheduler = AprilScheduler(engine, target, waves, max_new_tokens=params.max_new_tokens,
                                        params=params, accept=self._accept, max_staleness=max_staleness,
                                        keep_running=keep_running, max_waves=max_waves)

    def _accept(self, group: Group) -> bool:
        for sample in group.samples:
            sample.text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
        if self.keep is None:
            return True
        self.reward([group])
        return self.keep(group)

    def _fresh(self, n: int) -> list[Group]:
        ids, sizes = self.sampler.next_batch(n)
        problems, prompt_ids = self.prompts.problems, self.prompts.prompt_ids
        return [pending_group(i, problems[i].question, problems[i].answer, prompt_ids[i], k) for i, k in zip(ids, sizes)]

    def next_groups(self, version: int) -> tuple[list[Group], dict[str, float]]:
        groups, stats = self.scheduler.rollout(self._fresh, version)
        return groups, {f"april/{k}": v for k, v in stats.items()}

    def state_dict(self) -> dict:
        """Every rank's sampler and buffer (a collective on several ranks)."""
        return every_rank({**super().state_dict(), "april": self.scheduler.state_dict()})

    def load_state_dict(self, state: dict) -> None:
        mine = this_rank(state, "APRIL keeps one buffer and prompt share per rank")
        super().load_state_dict(mine)
        self.scheduler.load_state_dict(mine["april"])


class DatasetSource:
    """Fixed responses from a file: `groups[i]` holds prompt i's responses (a chosen / rejected pair, or
    reference answers). The sampler (uniform epochs) picks B groups per step, group k for rank
    k % world; fresh copies are handed out, since rewards write into the samples."""

    summed: tuple[str, ...] = ()
    maxed: tuple[str, ...] = ()

    def __init__(self, groups: list[Group], sampler: PromptSampler, groups_per_step: int):
        if not groups:
            raise UserError("the response dataset is empty")
        self.groups, self.sampler, self.groups_per_step = groups, sampler, groups_per_step

    def warm_up(self) -> dict[str, float]:
        return {}

    def next_groups(self, version: int) -> tuple[list[Group], dict[str, float]]:
        rank, world_size = world()
        ids, _ = self.sampler.next_batch(self.groups_per_step)
        return [copy.deepcopy(self.groups[i]) for i in ids[rank::world_size]], {}

    def observe(self, groups: list[Group]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])


class RoundSource:
    """For objectives that train several steps on one batch of samples (APO's rounds): the inner
    source runs on the first step of every round of `steps_per_round` steps; the other steps get no
    new groups (an empty list) and train on what the objective kept from the round's start."""

    def __init__(self, inner, steps_per_round: int):
        self.inner, self.steps_per_round = inner, steps_per_round
        self.summed, self.maxed = inner.summed, inner.maxed
        self.step_in_round = 0  # steps of the current round already served

    def warm_up(self) -> dict[str, float]:
        return self.inner.warm_up()

    def next_groups(self, version: int) -> tuple[list[Group], dict[str, float]]:
        start = self.step_in_round == 0
        self.step_in_round = (self.step_in_round + 1) % self.steps_per_round
        return self.inner.next_groups(version) if start else ([], {})

    def observe(self, groups: list[Group]) -> dict[str, float]:
        return self.inner.observe(groups) if groups else {}

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "step_in_round": self.step_in_round}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.step_in_round = state["step_in_round"]
