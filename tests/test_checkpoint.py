"""Checkpoint writing is atomic and `latest` only ever points at a complete checkpoint."""
import random

import pytest
import torch

from rlpost import checkpoint as ckpt
from rlpost.curriculum import UniformSampler


class TinyLearner:
    """Writes what a real Learner writes (an hf/ folder) so the atomic-rename logic can be tested alone."""

    def __init__(self, fail=False):
        self.fail = fail

    def save(self, directory, tokenizer):
        (directory / "hf").mkdir()
        (directory / "hf" / "config.json").write_text("{}")
        if self.fail:
            raise RuntimeError("disk full")


def test_latest_survives_a_crash_during_save(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, TinyLearner(), None, {"sampler": {}}, keep_last=3)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, TinyLearner(fail=True), None, {}, keep_last=3)
    root = tmp_path / "checkpoints"
    assert (root / "latest").resolve().name == "step_1"
    assert not (root / "step_2").exists()
    assert ckpt.resolve_checkpoint(root / "latest") == (root / "step_1").resolve()
    assert ckpt.resolve_checkpoint(tmp_path) == (root / "step_1").resolve()  # a run dir works too


def test_keep_last_prunes_old_checkpoints(tmp_path):
    for step in range(1, 5):
        ckpt.save_checkpoint(tmp_path, step, TinyLearner(), None, {}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_3", "step_4"]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(ckpt.CheckpointError, match="not an rlpost checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)


def test_rng_and_sampler_round_trip(tmp_path):
    sampler = UniformSampler(10, seed=1)
    sampler.next_batch(7)
    ckpt.save_checkpoint(tmp_path, 1, TinyLearner(), None, {"sampler": sampler.state_dict()}, keep_last=1)
    expected = (sampler.next_batch(8), random.random(), torch.rand(3))
    state = ckpt.load_trainer_state(tmp_path / "checkpoints" / "latest")
    restored = UniformSampler(10, seed=99)
    restored.load_state_dict(state["sampler"])
    ckpt.set_rng_state(state["rng"])
    got = (restored.next_batch(8), random.random(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_sampler_covers_each_prompt_once_per_epoch():
    sampler = UniformSampler(5, seed=0)
    (first, k1), (second, _) = sampler.next_batch(5), sampler.next_batch(5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second and k1 == [8] * 5
