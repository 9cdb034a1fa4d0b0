"""Rollout workers (rollout/workers.py, rollout.placement=workers): engines in their own processes."""
import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, subprocess_env
from rlpost.config import ConfigError, load_config

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6", "eval.num_prompts=4",
         "eval.pass_k=1", "eval.at_start=false", "train.micro_batch_size=4", "grpo.dynamic_sampling=false",
         "train.lr=1e-3", "reward.format_weight=0.5", "data.arithmetic.train_size=50", "data.arithmetic.test_size=10",
         "rollout.engine=hf", "checkpoint.keep_last=5"]
THREADS = ["rollout.worker_threads=1", "rollout.learner_threads=1", "rollout.worker_timeout_s=120"]


def _train(tmp_path, name, model, steps, *extra, resume=None):
    from rlpost.trainer import train
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", [*SMALL, f"model.name={model}", f"train.max_steps={steps}",
                                                           f"run.output_dir={tmp_path / name}", *extra])
    summary = train(cfg, resume=resume, show_progress=False)
    return summary, load_file(tmp_path / name / "checkpoints" / f"step_{steps}" / "hf" / "model.safetensors")


def _rows(run):
    from rlpost.metrics import read_metrics
    return [r for r in read_metrics(run) if "reward" in r]


def test_staleness_zero_through_one_worker_is_the_colocated_run_bit_for_bit(tmp_path, digit_model):
    """max_staleness 0, one worker, the hf engine, seeded requests: the worker generates each step's
    groups with the weights the learner sent after the previous step, so three steps end with the
    colocated run's weights (rollout.seed_requests, the same thread count) bit for bit; the tokens were
    all sampled by the current version, and the sampler's log-probs match the learner's recomputation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what learner_threads=1 and worker_threads=1 give each side below
    try:
        colocated, a = _train(tmp_path, "colocated", digit_model, 3, "rollout.seed_requests=true")
    finally:
        torch.set_num_threads(threads)
    workers, b = _train(tmp_path, "workers", digit_model, 3, "rollout.placement=workers", *THREADS)
    torch.set_num_threads(threads)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from rollout.models import load_model
    initial = load_model(digit_model).state_dict()
    assert any(not torch.equal(initial[k], a[k]) for k in a)  # it trained
    rows = _rows(tmp_path / "workers")
    assert [r["rollout/staleness_max"] for r in rows] == [0.0, 0.0, 0.0]
    assert all(r["rollout/weight_sync_bytes"] > 0 for r in rows[1:]) and all(r["weight_sync_s"] > 0 for r in rows)
    # the sampler and the learner hold the same float32 weights: their log-probs differ by rounding of
    # the same computation batched differently (float32 eps 1.2e-7 on logits of order 10, through two
    # layers: ~1e-5); 1e-3 leaves a factor 100 for the CPU's kernels
    assert all(r["rollout/logprob_diff"] < 1e-3 for r in rows)
    assert workers["eval_after"] == colocated["eval_after"]  # eval ran on the worker, with the final weights


def test_staleness_one_keeps_the_workers_ahead_and_bounded(tmp_path, digit_model):
    """max_staleness 1 with two workers: the step's groups may come from the previous version, never
    older; every step trains its B groups."""
    _, _ = _train(tmp_path, "async", digit_model, 4, "rollout.placement=workers", "rollout.workers=2",
                  "rollout.max_staleness=1", *THREADS)
    rows = _rows(tmp_path / "async")
    assert len(rows) == 4 and all(r["groups"] == 2 for r in rows)
    assert all(0 <= r["rollout/staleness_max"] <= 1 for r in rows)
    assert all(r["rollout/in_flight_groups"] >= 0 for r in rows)


def test_april_on_the_workers_keeps_requests_running_across_updates(tmp_path, digit_model):
    """APRIL with rollout.placement=workers and max_staleness 1: N' = 4 groups in flight for B = 2;
    the two not accepted go on generating while the learner trains, and the next step trains on them:
    their first tokens are one version behind (they were submitted before the update), none more."""
    summary, _ = _train(tmp_path, "april", digit_model, 3, "rollout.placement=workers", "rollout.scheduler=april",
                        "rollout.april_submit_groups=4", "rollout.max_staleness=1", *THREADS)
    rows = _rows(tmp_path / "april")
    assert len(rows) == 3 and all(r["april/groups_finished"] == 2 for r in rows)
    assert rows[0]["april/staleness_max"] == 0
    assert all(r["april/staleness_max"] <= 1 for r in rows) and any(r["april/staleness_max"] == 1 for r in rows[1:])
    assert rows[1]["april/groups_submitted"] == 0  # step 2 needed no new wave: the carried two were enough


def test_a_vllm_worker_trains_with_its_weights_synced(tmp_path):
    """The design card's shape on this machine: SmolLM2 on a vLLM engine in a rollout worker, k = 1.
    Each step's weights reach the worker's vLLM (bytes counted), and it trains as colocated runs do."""
    from conftest import skip_unless_required
    from rollout import vllm_engine
    if not vllm_engine.available():
        skip_unless_required("vllm is not installed")
    summary, _ = _train(tmp_path, "vllm", "smollm2-135m-instruct", 2, "rollout.placement=workers", "rollout.engine=vllm",
                        "rollout.max_staleness=1", "rollout.max_new_tokens=12", "data.arithmetic.word_problems=false",
                        *THREADS)
    rows = _rows(tmp_path / "vllm")
    assert len(rows) == 2 and all(r["rollout/staleness_max"] <= 1 for r in rows)
    # a step's row counts the bytes of the sync before it (step 1 had none): every float32 weight of
    # SmolLM2-135M (134.5 M, the tied head once)
    assert rows[0]["rollout/weight_sync_bytes"] == 0 and rows[1]["rollout/weight_sync_bytes"] >= 4 * 134_000_000
    assert summary["eval_after"]["accuracy"] >= 0.0 and all(r["response_length"] > 0 for r in rows)


def test_bad_worker_settings_are_one_clear_line():
    with pytest.raises(ConfigError, match="rollout.placement=workers generates rollouts"):
        load_config(REPO / "configs" / "grpo_math.yaml", ["rollout.placement=workers", "rollout.scheduler=dataset", "eval.kind=none"])
    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        load_config(REPO / "configs" / "grpo_math.yaml", ["rollout.max_staleness=-1"])


def _run_and_kill_worker(tmp_path, model, *extra, signal=9, timeout_s=60):
    """`rlpost train` in a child process; once step 1 is logged, its rollout worker gets `signal`
    (9: killed, the process dies; 19, SIGSTOP: hung, alive but silent from then on)."""
    import psutil
    run = tmp_path / "run"
    args = [*SMALL, f"model.name={model}", "train.max_steps=4", f"run.output_dir={run}", "checkpoint.every=1",
            "rollout.placement=workers", *THREADS, f"rollout.worker_timeout_s={timeout_s}", *extra]
    proc = subprocess.Popen([sys.executable, "-m", "rlpost.cli", "train", "configs/grpo_math.yaml", "--no-progress",
                             *[x for a in args for x in ("--set", a)]], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any('"reward"' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.5)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "multiprocessing" in " ".join(c.cmdline())
               and "spawn_main" in " ".join(c.cmdline())]
    assert workers, "no rollout worker process found"
    for w in workers:
        w.send_signal(signal)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, err, run


def test_a_killed_worker_stops_the_run_with_one_line_and_the_checkpoint(tmp_path, digit_model):
    code, err, run = _run_and_kill_worker(tmp_path, digit_model)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and "Traceback" not in err, err[-2000:]
    assert "rollout worker 0" in lines[-1] and "died" in lines[-1] and "--resume" in lines[-1], lines[-1]
    assert (run / "checkpoints" / "step_1" / "hf" / "model.safetensors").is_file()


def test_a_killed_worker_is_restarted_when_asked(tmp_path, digit_model):
    code, err, run = _run_and_kill_worker(tmp_path, digit_model, "rollout.restart_workers=true")
    assert code == 0, err[-2000:]
    assert len(_rows(run)) == 4


def test_a_killed_worker_under_april_is_restarted_with_its_streamed_requests(tmp_path, digit_model):
    """APRIL's requests stream to the worker and keep running across updates (k = 1); a restarted
    worker gets them again from their start, so the run still trains B groups every step."""
    code, err, run = _run_and_kill_worker(tmp_path, digit_model, "rollout.restart_workers=true",
                                          "rollout.scheduler=april", "rollout.max_staleness=1")
    assert code == 0, err[-2000:]
    rows = _rows(run)
    assert len(rows) == 4 and all(r["april/groups_finished"] == 2 for r in rows)


def test_a_hung_worker_is_noticed_within_its_timeout_and_stops_the_run_with_one_line(tmp_path, digit_model):
    """SIGSTOP: the worker stays alive and never answers. The learner waits at most
    rollout.worker_timeout_s for it (a result or a weight transfer), then stops with one line naming
    the worker, the checkpoint of step 1 intact."""
    import signal
    start = time.time()
    code, err, run = _run_and_kill_worker(tmp_path, digit_model, signal=signal.SIGSTOP, timeout_s=30)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and "Traceback" not in err, err[-2000:]
    assert "rollout worker 0" in lines[-1] and "--resume" in lines[-1], lines[-1]
    assert "worker_timeout_s=30" in lines[-1] or "did not take the weights" in lines[-1], lines[-1]
    assert (run / "checkpoints" / "step_1" / "hf" / "model.safetensors").is_file()
    assert time.time() - start < 600  # bounded: the run ended by itself (communicate's limit not hit)


def test_a_hung_worker_is_killed_and_restarted_when_asked(tmp_path, digit_model):
    import signal
    code, err, run = _run_and_kill_worker(tmp_path, digit_model, "rollout.restart_workers=true",
                                          signal=signal.SIGSTOP, timeout_s=30)
    assert code == 0, err[-2000:]
    assert len(_rows(run)) == 4


def test_a_resume_loses_no_drawn_prompt_and_trains_none_twice(digit_model):
    """max_staleness 1 keeps a step's worth of groups in flight; the checkpoint state records them. A
    fresh pool and source resumed from that state (as after a kill) train every prompt the sampler
    drew exactly once: trained + still owed at the end == drawn, and no prompt twice (fewer draws than
    one epoch of the pool)."""
    import copy
    from dataclasses import dataclass
    from rlpost.curriculum import UniformSampler
    from rollout.source import AsyncSource
    from rollout.types import SamplingParams
    from rollout.workers import WorkerPool, worker_specs

    @dataclass
    class Problem:
        question: str
        answer: str

    class Prompts:
        problems = [Problem(f"q{i}", str(i)) for i in range(40)]
        prompt_ids = [[5 + i % 7, 6, 7] for i in range(40)]

    drawn = []

    class Recording(UniformSampler):
        def next_batch(self, size):
            ids, sizes = super().next_batch(size)
            drawn.extend(ids)
            return ids, sizes

    def source(pool):
        return AsyncSource(pool, Recording(40, 0, 2), Prompts(), SamplingParams(max_new_tokens=4), 2,
                           reward=lambda groups: None, max_staleness=1, seed=0)

    trained = []
    pool = WorkerPool(worker_specs("hf", digit_model, None, 1, 1, {}, 0), timeout_s=120)
    try:
        first = source(pool)
        for version in range(3):
            trained += [g.prompt_id for g in first.next_groups(version)[0]]
            pool.load_weights([], version + 1)  # no training here: only the version moves
        state = copy.deepcopy(first.state_dict())
    finally:
        pool.close()
    assert state["owed"], "something must be in flight at the checkpoint for this test to mean anything"
    pool = WorkerPool(worker_specs("hf", digit_model, None, 1, 1, {}, 0), timeout_s=120)
    try:
        second = source(pool)
        second.load_state_dict(state)
        pool.load_weights([], 3)  # as the trainer does on a resume
        for version in range(3, 6):
            trained += [g.prompt_id for g in second.next_groups(version)[0]]
            pool.load_weights([], version + 1)
        owed = [i for i, _ in second.state_dict()["owed"]]
    finally:
        pool.close()
    assert len(trained) == 12 and len(set(trained)) == 12
    assert sorted(trained + owed) == sorted(drawn)
