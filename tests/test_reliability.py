"""Faults and bad input lose nothing and get one clear line (issue "Reliability"). The slow kill -9
drill is scripts/fault_drill.py; every fault that runs in seconds is a test here."""
import errno
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env
from rlpost import checkpoint as ckpt
from rlpost.config import ConfigError, load_config
from test_checkpoint import TinyLearner


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "rlpost.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env or subprocess_env())


def one_line_error(proc, code, needle):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-2000:]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]


# --- checkpoints --------------------------------------------------------------------------------

class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    step = tmp_path / "checkpoints" / "step_1"
    (step / "hf").mkdir(parents=True)
    (step / "hf" / "config.json").write_text("{}")
    marker = tmp_path / "pwned"
    with open(step / ckpt.STATE_FILE, "wb") as f:
        pickle.dump({"step": 1, "payload": Exploit(marker)}, f)
    proc = cli("train", "configs/grpo_math.yaml", "--set", f"run.output_dir={tmp_path / 'new'}", "--resume", str(step))
    one_line_error(proc, 2, "refusing to load it")
    assert not marker.exists(), "loading the checkpoint ran code"


def test_trainer_state_round_trips_with_weights_only(tmp_path):
    """What the trainer saves (sampler and APRIL buffer state, RNG, config, summary) loads with
    weights_only=True, and restores the RNG streams exactly."""
    import random
    import numpy as np
    from rlpost.curriculum import CuresSampler
    from rollout.april import AprilScheduler, pending_group
    from rollout.types import SamplingParams

    sampler = CuresSampler(5, seed=0)
    sampler.update(1, [True, False])
    april = AprilScheduler(None, 1, 2, max_new_tokens=4, params=SamplingParams())
    april.buffer.append(pending_group(3, "q", "a", [1, 2], 2))
    ckpt.save_checkpoint(tmp_path, 1, TinyLearner(), None,
                         {"source": {"sampler": sampler.state_dict(), "april": april.state_dict()},
                          "config": load_config(None).model_dump(), "summary": {"eval_before": {"accuracy": 0.5}}}, 1)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    state = ckpt.load_trainer_state(tmp_path / "checkpoints" / "latest")
    ckpt.set_rng_state(state["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(2), expected[2])
    restored = AprilScheduler(None, 1, 2, max_new_tokens=4, params=SamplingParams())
    restored.load_state_dict(state["source"]["april"])
    assert restored.buffer[0].samples[0].prompt_ids == [1, 2]


def test_resaving_a_step_never_leaves_latest_dangling(tmp_path, monkeypatch):
    """Re-saving step 2 (after a resume from step 1) with a crash injected at each file-system operation
    of the swap: `latest` resolves to a complete checkpoint after every one of them."""
    import shutil
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, TinyLearner(), None, {}, keep_last=5)
    real = {"replace": os.replace, "rmtree": shutil.rmtree, "symlink": os.symlink}
    for crash_at in range(1, 9):
        calls = {"n": 0}

        def counting(name):
            def op(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == crash_at:
                    raise KeyboardInterrupt(f"killed at operation {crash_at}")  # like a kill: nothing after runs
                return real[name](*args, **kwargs)
            return op
        monkeypatch.setattr(ckpt.os, "replace", counting("replace"))
        monkeypatch.setattr(ckpt.shutil, "rmtree", counting("rmtree"))
        monkeypatch.setattr(ckpt.os, "symlink", counting("symlink"))
        try:
            ckpt.save_checkpoint(tmp_path, 2, TinyLearner(), None, {"attempt": crash_at}, keep_last=5)
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        resolved = ckpt.resolve_checkpoint(tmp_path / "checkpoints" / "latest")
        assert (resolved / ckpt.STATE_FILE).is_file() and (resolved / "hf" / "config.json").is_file(), crash_at
        assert resolved.name in ("step_1", "step_2", ".step_2.tmp"), resolved


def test_no_space_left_keeps_earlier_checkpoints_and_latest(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, TinyLearner(), None, {"step_state": 1}, keep_last=2)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left on device"):
        ckpt.save_checkpoint(tmp_path, 2, TinyLearner(), None, {"step_state": 2}, keep_last=2)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert ckpt.resolve_checkpoint(root / "latest").name == "step_1"
    assert ckpt.load_trainer_state(root / "step_1")["step_state"] == 1
    assert not list(root.glob(".step_*")), "the partial copy was left behind"


# --- resume and the run directory ---------------------------------------------------------------

def test_resume_refuses_a_different_run_and_accepts_safe_changes(tmp_path):
    saved = {"config": load_config(None).model_dump()}
    for safe in (["train.max_steps=99"], ["eval.every=5", "checkpoint.every=1"], ["train.lr=1e-5"]):
        ckpt.check_resume(saved, load_config(None, safe).model_dump(), tmp_path)
    changed = load_config(None, ["rollout.group_size=4", "data.source=other.jsonl", "curriculum.sampler=cures"])
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_resume(saved, changed.model_dump(), tmp_path)
    for key in ("rollout.group_size: 8 -> 4", "data.source", "curriculum.sampler"):
        assert key in str(e.value)
    with pytest.raises(ckpt.CheckpointError, match="was trained from model"):
        ckpt.check_resume(saved, load_config(None, ["model.name=tiny-random"]).model_dump(), tmp_path)


def test_a_second_run_into_a_live_run_dir_is_refused(tmp_path):
    from rlpost.rundir import run_lock
    with run_lock(tmp_path):
        proc = cli("train", "configs/grpo_math.yaml", "--set", f"run.output_dir={tmp_path}")
        one_line_error(proc, 2, "is in use by a live run")
    with run_lock(tmp_path):  # released: the next run gets it
        pass


# --- faults inside a run ------------------------------------------------------------------------

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6", "eval.num_prompts=4",
         "eval.pass_k=1", "train.micro_batch_size=4", "checkpoint.every=1", "grpo.dynamic_sampling=false",
         "train.lr=1e-4", "reward.format_weight=0.5", "data.arithmetic.train_size=50", "data.arithmetic.test_size=10",
         "eval.at_start=false"]


def _config(tmp_path, model, *extra):
    return load_config(REPO / "configs" / "grpo_math.yaml",
                       [*SMALL, f"model.name={model}", f"run.output_dir={tmp_path / 'run'}", *extra])


def _nan_at(monkeypatch, bad_steps):
    """The GRPO loss turns NaN in the optimizer steps numbered in `bad_steps` (1-based; an injected fault)."""
    from rlpost.objectives.grpo import GRPO
    from rlpost import learner as learner_module
    real_loss, real_step = GRPO.loss, learner_module.Learner.train_step
    calls = {"n": 0}

    def train_step(self, micro_batches, head, loss_fn):
        calls["n"] += 1
        return real_step(self, micro_batches, head, loss_fn)

    def loss(self, mb, outputs):
        value, stats = real_loss(self, mb, outputs)
        return (value * float("nan") if bad_steps(calls["n"]) else value), stats
    monkeypatch.setattr(GRPO, "loss", loss)
    monkeypatch.setattr(learner_module.Learner, "train_step", train_step)


def test_a_nan_step_is_skipped_and_reported_and_the_run_goes_on(tmp_path, digit_model, monkeypatch):
    from safetensors.torch import load_file
    from rlpost.metrics import read_metrics
    from rlpost.trainer import train

    _nan_at(monkeypatch, lambda n: n == 2)
    train(_config(tmp_path, digit_model, "train.max_steps=3", "checkpoint.keep_last=3"), show_progress=False)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert [r.get("nonfinite", 0.0) for r in rows] == [0.0, 1.0, 0.0]
    assert rows[1]["skipped_update"] == 1.0 and "skipped_update" not in rows[2]
    step = {n: load_file(tmp_path / "run" / "checkpoints" / f"step_{n}" / "hf" / "model.safetensors") for n in (1, 2, 3)}
    for name, value in step[1].items():  # the bad step changed nothing; the next one trained
        assert torch.equal(step[2][name], value) and torch.isfinite(step[3][name]).all()
    assert any(not torch.equal(step[3][k], v) for k, v in step[1].items())


def test_april_ends_a_step_whose_filter_keeps_nothing_after_max_waves(tmp_path, digit_model, monkeypatch):
    """A policy that answers every prompt right gives all-equal groups, which dynamic sampling drops,
    and APRIL submits wave after wave to find a kept one: without rollout.april_max_waves the step
    never ends. The filter here keeps nothing; with april_max_waves=2 each step ends after 2 waves
    of N' = 4 groups, trains on nothing (skipped_update) and says so (april/waves_capped), and the
    run finishes."""
    from rlpost.metrics import read_metrics
    from rlpost.objectives.grpo import GRPO
    from rlpost.trainer import train

    monkeypatch.setattr(GRPO, "keep", lambda self, group: False)
    train(_config(tmp_path, digit_model, "train.max_steps=2", "rollout.scheduler=april", "rollout.engine=hf",
                  "grpo.dynamic_sampling=true", "rollout.april_max_waves=2"), show_progress=False)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r or "april/groups_submitted" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["april/waves_capped"] == 1.0 and r["april/groups_submitted"] == 2 * 4
        assert r["april/groups_finished"] == 0.0 and r["april/groups_rejected"] == 8.0
        assert r["skipped_update"] == 1.0


def test_repeated_nan_steps_stop_the_run_with_the_last_good_checkpoint_intact(tmp_path, digit_model, monkeypatch):
    from rlpost.rundir import RunError
    from rlpost.trainer import train

    _nan_at(monkeypatch, lambda n: n >= 2)
    with pytest.raises(RunError, match="2 consecutive steps"):
        train(_config(tmp_path, digit_model, "train.max_steps=5", "train.max_bad_steps=2"), show_progress=False)
    latest = ckpt.resolve_checkpoint(tmp_path / "run" / "checkpoints" / "latest")
    assert latest.name == "step_2" and ckpt.load_trainer_state(latest)["step"] == 2


def test_an_engine_that_raises_mid_run_stops_with_one_line_and_checkpoints_intact(tmp_path, digit_model, monkeypatch):
    from rollout.hf_engine import HFEngine
    from rlpost.rundir import RunError
    from rlpost.trainer import train

    real, calls = HFEngine.generate, {"n": 0}

    def generate(self, prompts, params):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, prompts, params)
    monkeypatch.setattr(HFEngine, "generate", generate)
    with pytest.raises(RunError) as e:
        train(_config(tmp_path, digit_model, "train.max_steps=3"), show_progress=False)
    assert "illegal memory access" in str(e.value) and "--resume" in str(e.value) and "\n" not in str(e.value)
    assert ckpt.resolve_checkpoint(tmp_path / "run" / "checkpoints" / "latest").name == "step_1"
    assert "Traceback" in (tmp_path / "run" / "error.log").read_text()


def test_a_verifier_worker_that_dies_costs_one_score_not_the_run():
    import signal
    from rewards.math import MathReward

    reward = MathReward(timeout_s=20)
    assert reward.check("42", "42") == (True, True)
    os.kill(reward._worker().process.pid, signal.SIGKILL)
    assert reward.check("42", "42") == (False, False) and reward.counters["errors"] == 1  # lost, counted
    assert reward.check("7", "7") == (True, True)  # a fresh worker took over
    reward.close()


# --- bad input ----------------------------------------------------------------------------------

def test_bad_config_files_get_one_line(tmp_path):
    (tmp_path / "dup.yaml").write_text("train:\n  lr: 1.0e-5\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'train' \\(line 3\\)"):
        load_config(tmp_path / "dup.yaml")
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(tmp_path)
    one_line_error(cli("eval", "configs/grpo_math.yaml", "--checkpoint", str(tmp_path / "missing" / "dir")), 2,
                   "no such checkpoint")
    one_line_error(cli("eval", "configs/grpo_math.yaml", "--checkpoint", str(tmp_path)), 2,
                   "is not an rlpost checkpoint")


def test_an_unreachable_hub_model_is_one_line():
    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1"}
    proc = cli("train", "configs/grpo_math.yaml", "--set", "model.name=someorg/somemodel", env=env)
    one_line_error(proc, 2, "model 'someorg/somemodel' is not cached here and the hub is not reachable")


def test_bytes_that_are_not_utf8_skip_one_row(tmp_path):
    from rlpost.config import DataConfig
    from rlpost.data import load_problems
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"question": "1+1?", "answer": "2"}).encode() + b"\n"
                     + b'{"question": "\xff\xfe bad", "answer": "3"}\n'
                     + json.dumps({"question": "2+2?", "answer": "4"}).encode() + b"\n")
    problems, skipped = load_problems(str(path), "train", DataConfig())
    assert [p.answer for p in problems] == ["2", "4"] and skipped == 1


def test_prompts_over_the_limit_are_skipped_and_counted(tmp_path, tokenizer):
    from rlpost.config import DataConfig
    from rlpost.data import load_prompt_sets
    path = tmp_path / "d.jsonl"
    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "word " * 50_000, "answer": "3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, test = load_prompt_sets(DataConfig(source=str(path), max_prompt_tokens=64), tokenizer, seed=0)
    assert len(train) == 1 and train.too_long == 1 and train.problems[0].answer == "2"
    assert all(len(ids) <= 64 for ids in train.prompt_ids)


def test_a_unicode_minus_is_a_minus():
    from rewards.math import MathReward
    reward = MathReward()
    assert reward.check("The answer is \u22125", "-5")[0] and not reward.check("The answer is \u22125", "5")[0]
    reward.close()
