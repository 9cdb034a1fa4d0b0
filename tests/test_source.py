"""The rollout sources (rollout/source.py): what each yields, how it scores and filters, its state."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO
from rlpost.curriculum import CuresSampler, UniformSampler
from rollout.source import AprilSource, DatasetSource
from rollout.types import Group, SamplingParams
from test_april import ToyEngine


class Decoder:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def toy_prompts(n):
    """Prompt i is the token list [i, 0]: every member of its group asks the ToyEngine for member 0's length."""
    return SimpleNamespace(problems=[SimpleNamespace(question=f"P{i}", answer="") for i in range(n)],
                           prompt_ids=[[i, 0] for i in range(n)])


def test_april_with_dynamic_sampling_trains_on_b_kept_groups():
    """The accept filter runs inside APRIL: groups that the objective would drop (no reward variance)
    never count towards B, so the step still gets B groups. Here odd prompts are uninformative."""
    scored = []

    def reward(groups):
        for g in groups:
            for member, s in enumerate(g.samples):
                if s.correct is None:
                    s.correct = g.prompt_id % 2 == 0 and member == 0
                    s.reward = float(s.correct)
                    scored.append(g.prompt_id)

    def keep(group):
        return len({s.reward for s in group.samples}) > 1

    engine = ToyEngine({i: [3 + i % 3] for i in range(40)})
    sampler = UniformSampler(40, seed=0, group_size=2)
    source = AprilSource(engine, sampler, toy_prompts(40), SamplingParams(max_new_tokens=10), 2, reward, Decoder(),
                         submit_groups=4, keep=keep)
    rejected = 0
    for version in range(3):
        groups, stats = source.next_groups(version)
        assert len(groups) == 2 and all(keep(g) for g in groups)
        assert stats["april/groups_finished"] == 2
        rejected += stats["april/groups_rejected"]
    assert rejected > 0 and any(p % 2 for p in scored), "no uninformative group was ever filtered"
    assert all(s.text == Decoder().decode(s.response_ids) for g in groups for s in g.samples)


def test_cures_counts_verdicts_not_the_shaped_reward():
    """A format bonus (reward 0.5 for a wrong answer) must not make CurES count a solved rollout."""
    from rollout.source import SyncSource
    from rollout.types import FinishReason, Sample

    sampler = CuresSampler(3, seed=0, rollouts_per_prompt=2)
    source = SyncSource(None, sampler, toy_prompts(3), SamplingParams(), 1, reward=lambda g: None)
    wrong_but_formatted = [Sample([0], [1], [0.0], FinishReason.STOP, reward=0.5, correct=False) for _ in range(4)]
    source.observe([Group(1, "P1", "", wrong_but_formatted)])
    assert sampler.correct.tolist() == [0, 0, 0] and sampler.total.tolist() == [0, 4, 0]


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_dataset_source_reads_trl_formats_and_resumes(tmp_path, tokenizer):
    from rlpost.config import DataConfig
    from rlpost.data import load_response_groups

    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},                              # standard
        {"prompt": [{"role": "user", "content": "What is 3 + 3?"}],                                 # conversational
         "chosen": [{"role": "assistant", "content": "6"}], "rejected": [{"role": "assistant", "content": "7"}]},
        {"prompt": "What is 1 + 1?", "completion": "2", "answer": "2"},                            # prompt-completion
        {"question": "no responses"},                                                              # skipped
    ]
    data = load_response_groups(DataConfig(source=_write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer)
    groups = data.train
    assert [len(g.samples) for g in groups] == [2, 2, 1] and data.skipped == 1 and not data.held_out
    chosen, rejected = groups[1].samples
    assert "<|im_start|>user\nWhat is 3 + 3?" in groups[1].prompt
    assert tokenizer.decode(chosen.response_ids).startswith("6") and tokenizer.decode(rejected.response_ids).startswith("7")
    assert chosen.response_ids[-1] == rejected.response_ids[-1] == tokenizer.eos_token_id
    assert chosen.prompt_ids == tokenizer(groups[1].prompt, add_special_tokens=False).input_ids
    assert tokenizer.decode(groups[0].samples[0].prompt_ids) == "What is 2 + 2?" and groups[2].answer == "2"

    source = DatasetSource(groups, UniformSampler(len(groups), seed=0), groups_per_step=2)
    first, _ = source.next_groups(0)
    first[0].samples[0].reward = 99.0  # rewards write into samples: the source's own copy stays clean
    state = json.loads(json.dumps(source.state_dict()))
    after = [[g.prompt for g in source.next_groups(v)[0]] for v in (1, 2)]
    resumed = DatasetSource(groups, UniformSampler(len(groups), seed=5), groups_per_step=2)
    resumed.load_state_dict(state)
    assert [[g.prompt for g in resumed.next_groups(v)[0]] for v in (1, 2)] == after
    assert [s.reward for g in groups for s in g.samples] == [1.0, 0.0, 1.0, 0.0, 0.0]  # labels from the file only


def test_rollout_and_rewards_never_import_the_trainer_side():
    code = ("import sys, rollout.source, rollout.engine, rollout.april, rollout.hf_engine, rollout.vllm_engine, "
            "rollout.models, rewards.outcome, rewards.math, rewards.implicit_prm; "
            "bad = sorted(m for m in sys.modules if m == 'rlpost' or m.startswith('rlpost.')); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
