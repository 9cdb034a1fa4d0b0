"""APRIL on a deterministic fake engine: the toy schedule of ALGORITHMS.md §2.10, step by step."""
import pytest
import torch

from rlpost.algorithms import grpo
from rlpost.batch import padded
from rollout.april import AprilScheduler, pending_group, stale_fraction
from rollout.types import FinishReason, Sample, SamplingParams, tail_wait_s


class ToyEngine:
    """Unlimited concurrency, one token per tick per running request. A request's prompt is
    [prompt_id, member, *prefix]; that member stops by itself after `targets[prompt_id][member]`
    response tokens in total. Tokens are 100 + their position; log-probs are -0.1 * version; a
    sample's finish time is the tick it stopped at."""

    def __init__(self, targets):
        self.targets = targets
        self.version = 1
        self.running = {}  # request id -> [prompt ids, new tokens, max_new_tokens]
        self.max_new_tokens_seen = []
        self.tick = 0

    def add_request(self, request_id, prompt_ids, params):
        self.running[request_id] = [prompt_ids, [], params.max_new_tokens]
        self.max_new_tokens_seen.append((prompt_ids[0], prompt_ids[1], params.max_new_tokens))

    def _sample(self, request_id, reason):
        prompt, new, _ = self.running.pop(request_id)
        return Sample(prompt, new, [-0.1 * self.version] * len(new), reason, versions=[self.version] * len(new),
                      finished_at=None if reason == FinishReason.ABORT else float(self.tick))

    def step(self):
        self.tick += 1
        finished = []
        for request_id, (prompt, new, budget) in list(self.running.items()):
            already = len(prompt) - 2
            new.append(100 + already + len(new))
            if already + len(new) >= self.targets[prompt[0]][prompt[1]]:
                finished.append((request_id, self._sample(request_id, FinishReason.STOP)))
            elif len(new) >= budget:
                finished.append((request_id, self._sample(request_id, FinishReason.LENGTH)))
        return finished

    def abort(self, request_id):
        return self._sample(request_id, FinishReason.ABORT)

    def generate(self, prompts, params):
        raise NotImplementedError

    def load_weights(self, named_tensors, version):
        self.version = version

    def close(self):
        pass


def toy_group(prompt_id):
    """A pending group of 2 whose members' prompts are [prompt_id, member], as the ToyEngine expects."""
    group = pending_group(prompt_id, f"P{prompt_id}", "", [prompt_id], 2)
    for member, s in enumerate(group.samples):
        s.prompt_ids = [prompt_id, member]
    return group


def fresh_from(prompt_ids):
    queue = list(prompt_ids)

    def fresh(n):
        taken, queue[:] = queue[:n], queue[n:]
        return [toy_group(p) for p in taken]
    return fresh


def lengths(group):
    return [(len(s.response_ids), s.finish_reason) for s in group.samples]


def test_toy_schedule_of_the_spec():
    targets = {1: [3, 4], 2: [2, 9], 3: [5, 6], 4: [12, 7], 5: [2, 3], 6: [8, 8], 7: [1, 1], 8: [1, 1]}
    engine = ToyEngine(targets)
    april = AprilScheduler(engine, target_groups=2, submit_groups=4, max_new_tokens=10,
                           params=SamplingParams(temperature=1.0))
    fresh = fresh_from([1, 2, 3, 4, 5, 6, 7, 8])

    # Step 1, policy v1: P1 done at tick 4, P3 at tick 6 -> accepted; abort at tick 6.
    accepted, stats = april.rollout(fresh, version=1)
    assert [g.prompt_id for g in accepted] == [1, 3]
    assert [g.prompt_id for g in april.buffer] == [2, 4]
    P2, P4 = april.buffer
    assert lengths(P2) == [(2, FinishReason.STOP), (6, FinishReason.ABORT)]
    assert lengths(P4) == [(6, FinishReason.ABORT), (6, FinishReason.ABORT)]
    assert stats["groups_submitted"] == 4 and stats["groups_recycled"] == 2 and stats["stale_fraction"] == 0.0
    assert tail_wait_s([s for g in accepted for s in g.samples], start=0.0) == 2.0  # half done at tick 4, last 6

    # Step 2, policy v2: wave [P2, P4, P5, P6]. P2b resumes with budget 4 (needs 3), P2a is not
    # regenerated; P4a gets budget 4; P2 and P5 finish at tick 3.
    engine.version = 2
    engine.max_new_tokens_seen.clear()
    step_start = engine.tick
    accepted, stats = april.rollout(fresh, version=2)
    assert (2, 1, 4) in engine.max_new_tokens_seen and (4, 0, 4) in engine.max_new_tokens_seen
    assert not any(p == 2 and m == 0 for p, m, _ in engine.max_new_tokens_seen)
    assert [g.prompt_id for g in accepted] == [2, 5]
    assert [g.prompt_id for g in april.buffer] == [4, 6]
    P4, P6 = april.buffer
    assert lengths(P4) == [(9, FinishReason.ABORT), (7, FinishReason.STOP)]
    assert lengths(P6) == [(3, FinishReason.ABORT), (3, FinishReason.ABORT)]
    P2b = accepted[0].samples[1]
    assert P2b.response_ids == [100 + t for t in range(9)]  # prefix + continuation, token by token
    assert P2b.versions == [1] * 6 + [2] * 3
    # finish times in the step: P2a 0 (done in step 1), P5a 2, P2b 3, P5b 3 ticks: half done at 2
    samples = [s for g in accepted for s in g.samples]
    assert tail_wait_s(samples, start=step_start) == 1.0

    # The training batch of step 2: 16 response tokens, 8 of them sampled by v1.
    assert sum(len(s.response_ids) for s in samples) == 16
    assert stats["stale_fraction"] == 0.5 == stale_fraction(accepted, 2)
    width = max(len(s.response_ids) for s in samples)
    mask = padded([[1.0] * len(s.versions) for s in samples], width)
    versions = padded([s.versions for s in samples], width)
    assert grpo.off_policy_mask(mask, versions, current_version=2).sum() == 8

    # Step 3 resumes P4a with max_new_tokens = 1.
    engine.version = 3
    engine.max_new_tokens_seen.clear()
    april.rollout(fresh, version=3)
    assert (4, 0, 1) in engine.max_new_tokens_seen


def test_buffer_round_trips_through_state_dict():
    targets = {1: [3, 4], 2: [2, 9], 3: [5, 6], 4: [12, 7]}
    engine = ToyEngine(targets)
    april = AprilScheduler(engine, 2, 4, max_new_tokens=10, params=SamplingParams())
    april.rollout(fresh_from([1, 2, 3, 4]), version=1)
    restored = AprilScheduler(engine, 2, 4, max_new_tokens=10, params=SamplingParams())
    restored.load_state_dict(april.state_dict())
    assert [lengths(g) for g in restored.buffer] == [lengths(g) for g in april.buffer]
    assert [g.samples[1].versions for g in restored.buffer] == [g.samples[1].versions for g in april.buffer]


def test_dynamic_sampling_filter_drops_groups_and_submits_another_wave():
    targets = {p: [1, 2] for p in range(1, 20)}
    engine = ToyEngine(targets)
    april = AprilScheduler(engine, 2, 2, max_new_tokens=10, params=SamplingParams(),
                           accept=lambda g: g.prompt_id % 2 == 0)  # odd prompts are "all-equal rewards"
    fresh = fresh_from(range(1, 20))

    accepted, stats = april.rollout(fresh, version=1)
    assert [g.prompt_id for g in accepted] == [2, 4]
    assert stats["groups_rejected"] == 2 and stats["groups_submitted"] == 4
    assert not april.buffer  # rejected groups are dropped, not recycled


def test_truncated_importance_weight():
    """TIS: min(pi_train / pi_behaviour, C) per token, C = 2, no gradient."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    behaviour = torch.tensor([[-1.0, -3.0, -0.1]])
    w = grpo.truncated_importance_weight(logp, behaviour, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, torch.exp(torch.tensor(-0.4))]]))
    assert not w.requires_grad


def noisy_hf_engine(**kwargs):
    """The real hf engine on tiny-random with large random weights: greedy tokens change at every position."""
    from rollout.models import load_model, load_tokenizer
    from rollout.hf_engine import HFEngine

    model = load_model("tiny-random")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return HFEngine(model, load_tokenizer("tiny-random"), **kwargs)


def test_hf_engine_abort_and_resume_is_prefix_plus_continuation():
    """The real engine: abort mid-generation keeps the partial tokens; resuming from prompt + prefix
    gives, greedily, exactly the tokens of an uninterrupted generation."""
    engine = noisy_hf_engine(tokens_per_step=3)
    tokenizer = engine.tokenizer
    prompt = tokenizer("What is 3 + 4?")["input_ids"]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    (whole,) = engine.generate([prompt], greedy)
    assert len(set(whole.response_ids)) > 5

    engine.add_request("a", prompt, greedy)
    assert engine.step() == [] or len(whole.response_ids) <= 3
    partial = engine.abort("a")
    assert partial.finish_reason == FinishReason.ABORT and partial.response_ids == whole.response_ids[:3]
    assert len(partial.logprobs) == len(partial.versions) == 3

    engine.add_request("b", prompt + partial.response_ids, SamplingParams(max_new_tokens=7, temperature=0.0))
    finished = []
    while not finished:
        finished = engine.step()
    (_, rest), = finished
    assert partial.response_ids + rest.response_ids == whole.response_ids
    assert tokenizer.decode(partial.response_ids + rest.response_ids, skip_special_tokens=True) == whole.text
    assert rest.finish_reason == whole.finish_reason


def test_tail_wait_is_time_from_half_finished_to_the_last():
    start = 1000.0
    samples = [Sample([1], [2], [0.0], FinishReason.STOP, finished_at=start + t) for t in range(1, 11)]
    assert tail_wait_s(samples, start) == 5.0  # 5 of 10 done at +5 s, the last at +10 s
    samples[-1].finished_at = start + 30
    assert tail_wait_s(samples, start) == 25.0
    assert tail_wait_s(samples, start, share=0.9) == 21.0
    recycled = [Sample([1], [2], [0.0], FinishReason.STOP, finished_at=start - 50) for _ in range(10)]
    assert tail_wait_s(recycled + samples[:1], start) == 1.0  # finished earlier = done at the start
    assert tail_wait_s([], start) == 0.0


def test_hf_engine_stamps_each_sample_when_it_stops():
    """A batched generate returns all rows at once; each sample still gets the time its row stopped."""
    engine = noisy_hf_engine()
    tokenizer = engine.tokenizer
    prompts = [tokenizer("What is 3 + 4?")["input_ids"], tokenizer("Tell me a story")["input_ids"]]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    first, second = engine.generate(prompts, greedy)
    early_stop = first.response_ids[2]
    assert early_stop not in second.response_ids  # so only the first row stops early below
    engine.stop_ids = [early_stop]
    short, long = engine.generate(prompts, greedy)
    assert len(short.response_ids) == 3 and short.finish_reason == FinishReason.STOP
    assert long.finish_reason == FinishReason.LENGTH
    assert short.finished_at < long.finished_at


class StampingToyEngine(ToyEngine):
    """The ToyEngine, but every token carries the version that sampled it (as the real engines do),
    so a request running across a weight update is visible token by token; aborts are counted."""

    def __init__(self, targets):
        super().__init__(targets)
        self.versions, self.aborted = {}, 0

    def add_request(self, request_id, prompt_ids, params):
        super().add_request(request_id, prompt_ids, params)
        self.versions[request_id] = []

    def step(self):
        for request_id in self.running:
            self.versions[request_id].append(self.version)
        return super().step()

    def abort(self, request_id):
        self.aborted += 1
        return super().abort(request_id)

    def _sample(self, request_id, reason):
        sample = super()._sample(request_id, reason)
        sample.versions = self.versions.pop(request_id)
        return sample


def test_keep_running_carries_requests_across_a_weight_update():
    """Rollout workers with max_staleness 1: step 1 of the spec's toy schedule, but the requests in
    flight are not aborted; they go on under v2 and finish in step 2 with mixed versions."""
    targets = {1: [3, 4], 2: [2, 9], 3: [5, 6], 4: [12, 7]}
    engine = StampingToyEngine(targets)
    april = AprilScheduler(engine, 2, 4, max_new_tokens=10, params=SamplingParams(), max_staleness=1,
                           keep_running=True)
    accepted, stats = april.rollout(fresh_from([1, 2, 3, 4]), version=1)
    assert [g.prompt_id for g in accepted] == [1, 3] and engine.aborted == 0 and not april.buffer
    assert [g.prompt_id for g in april.active] == [2, 4] and len(april.in_flight) == 3  # P2b, P4a, P4b
    saved = april.state_dict()["buffer"]  # what came back so far: P2a's 2 tokens, nothing of the rest
    assert [[len(s["response_ids"]) for s in g["samples"]] for g in saved] == [[2, 0], [0, 0]]

    engine.version = 2  # the learner's update lands between two engine steps (ticks 6 and 7)
    accepted, stats = april.rollout(fresh_from([]), version=2)
    # P2b needs 9 tokens: 6 by tick 6 under v1, then ticks 7-9 under v2; P4b (7) stops at tick 7,
    # P4a (12) runs out of its budget of 10 at tick 10.
    assert [g.prompt_id for g in accepted] == [2, 4] and stats["groups_submitted"] == 0
    P2, P4 = accepted
    assert P2.samples[1].versions == [1] * 6 + [2] * 3
    assert P4.samples[0].versions == [1] * 6 + [2] * 4 and P4.samples[0].finish_reason == FinishReason.LENGTH
    assert P4.samples[1].versions == [1] * 6 + [2]
    assert stats["stale_regenerated"] == 0 and not april.active and not april.in_flight


def test_a_group_older_than_max_staleness_is_generated_again():
    """max_staleness 0 on the same schedule: P2 and P4 finish in step 2 with v1 tokens, one version
    behind, so both are cleared and generated again under v2: P2 (2, 9 tokens) from tick 9 finishes at
    tick 18, P4 (12 -> budget 10, 7) from tick 10 at tick 20."""
    targets = {1: [3, 4], 2: [2, 9], 3: [5, 6], 4: [12, 7]}
    engine = StampingToyEngine(targets)
    april = AprilScheduler(engine, 2, 4, max_new_tokens=10, params=SamplingParams(), max_staleness=0,
                           keep_running=True)
    april.rollout(fresh_from([1, 2, 3, 4]), version=1)
    engine.version = 2
    accepted, stats = april.rollout(fresh_from([]), version=2)
    assert [g.prompt_id for g in accepted] == [2, 4] and stats["stale_regenerated"] == 2
    assert engine.tick == 20
    assert [s.versions for s in accepted[0].samples] == [[2] * 2, [2] * 9]
    assert [s.versions for s in accepted[1].samples] == [[2] * 10, [2] * 7]


def test_buffered_work_too_old_for_max_staleness_starts_afresh_when_submitted():
    """APRIL on the workers with k = 0 and aborts (no keep_running): step 1 of the spec's schedule
    buffers P2 (P2a done, P2b 6 tokens) and P4 (6 and 6 tokens), all v1. In step 2 (v2) both are one
    version behind before a token more is generated, so they are cleared as they are submitted, not
    continued: every member gets the whole budget of 10 again and no v1 token is trained on."""
    targets = {1: [3, 4], 2: [2, 9], 3: [5, 6], 4: [12, 7], 5: [2, 3], 6: [8, 8]}
    engine = StampingToyEngine(targets)
    april = AprilScheduler(engine, 2, 4, max_new_tokens=10, params=SamplingParams(), max_staleness=0)
    fresh = fresh_from([1, 2, 3, 4, 5, 6])
    april.rollout(fresh, version=1)
    assert [g.prompt_id for g in april.buffer] == [2, 4]
    engine.version = 2
    engine.max_new_tokens_seen.clear()
    accepted, stats = april.rollout(fresh, version=2)
    assert stats["stale_regenerated"] == 2
    assert sorted(engine.max_new_tokens_seen) == [(p, m, 10) for p in (2, 4, 5, 6) for m in (0, 1)]
    assert all(v == 2 for g in accepted for s in g.samples for v in s.versions)


def test_max_waves_ends_the_step_with_the_groups_kept_so_far():
    """A filter that keeps only prompt 2: with max_waves 2 of N' = 2 the step sees prompts 1-4, keeps
    [2] (fewer than B = 2), lets the last wave's requests finish rather than aborting them, and ends;
    without the bound it goes on submitting until it runs out of prompts."""
    def scheduler(max_waves):
        return AprilScheduler(ToyEngine({p: [1, 2] for p in range(1, 40)}), 2, 2, max_new_tokens=10,
                              params=SamplingParams(), accept=lambda g: g.prompt_id == 2, max_waves=max_waves)
    accepted, stats = scheduler(2).rollout(fresh_from(range(1, 40)), version=1)
    assert [g.prompt_id for g in accepted] == [2]
    assert stats["waves_capped"] == 1 and stats["groups_submitted"] == 4 and stats["groups_rejected"] == 3
    with pytest.raises(RuntimeError, match="no prompts left"):  # here the stream ends; a sampler's never does
        scheduler(None).rollout(fresh_from(range(1, 40)), version=1)
