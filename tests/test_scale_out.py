"""Scale-out that is right on N ranks, tested with real processes (gloo on CPU).

World-size invariance: the same global batch trained by one rank (all micro-batches) and by two ranks
(each its share) must give the same updated weights, for every loss aggregation and ZeRO stage, and
with LoRA adapters.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, deepspeed_launcher

AGGREGATIONS = ["grpo", "bnpo", "dr_grpo", "dapo"]
STAGES = [0, 2, 3]
LR, ULP_1 = 1e-2, 2.0 ** -23  # the worker's learning rate; float32 spacing just above 1.0


def _launch(world_size: int, out, cases: list[dict]) -> None:
    """`world_size` worker processes with the rendezvous in their environment, as a launcher sets it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world_size):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # same kernels in both runs
        procs.append(subprocess.Popen([sys.executable, "tests/dist_worker.py", str(out), json.dumps(cases)], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cases = [{"name": f"{a}-zero{z}", "aggregation": a, "zero": z, "layout": "equal"} for a in AGGREGATIONS for z in STAGES]
    cases += [{"name": f"cures-dapo-zero{z}", "aggregation": "dapo", "zero": z, "layout": "cures"} for z in STAGES]
    cases += [{"name": "cures-dapo-zero2-rank1-dropped", "aggregation": "dapo", "zero": 2, "layout": "cures", "drop_rank": 1}]
    cases += [{"name": f"lora-dapo-zero{z}", "aggregation": "dapo", "zero": z, "layout": "equal", "lora": True} for z in STAGES]
    cases += [{"name": f"apo-zero{z}", "method": "apo", "zero": z} for z in (0, 3)]
    out = {}
    for world_size in (1, 2):
        out[world_size] = tmp_path_factory.mktemp(f"world{world_size}")
        _launch(world_size, out[world_size], cases)
    from rollout.models import load_model
    initial = dict(load_model("tiny-random").named_parameters())
    return lambda world_size, name: torch.load(out[world_size] / f"{name}.pt"), initial


@pytest.mark.parametrize("zero", [0, 3])
def test_apo_ranks_roll_their_snapshots_together(trained, zero):
    """A round where rank 1 has no group: both ranks still start it (three rounds counted on each) and
    hold the same snapshots, bit for bit (they are copies of the same all-reduced weights); the
    snapshots did roll (latest and previous differ after round 3)."""
    load, _ = trained
    ranks = [load(2, f"apo-zero{zero}-rank{r}") for r in (0, 1)]
    assert [r["round"] for r in ranks] == [3, 3]
    for which in ("latest", "previous"):
        a, b = ranks[0][which], ranks[1][which]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    assert any(not torch.equal(ranks[0]["latest"][k], ranks[0]["previous"][k]) for k in ranks[0]["latest"])


@pytest.mark.parametrize("zero", STAGES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_one_rank_two_micro_batches_equals_two_ranks_one_each(trained, aggregation, zero):
    """Both runs back-propagate the same two micro-batches (same shapes, same kernels). One rank
    accumulates g1/GA + g2/GA with GA = 2; two ranks average g1 and g2 over the world of 2; dapo
    divides by N_glob / P instead of N_glob. Every difference is a power-of-two scaling, exact in
    floating point, and a sum of two terms commutes, so the updated weights must be bitwise equal."""
    load, initial = trained
    one, two = load(1, f"{aggregation}-zero{zero}"), load(2, f"{aggregation}-zero{zero}")
    moved = max(float((one["weights"][k] - initial[k].detach()).abs().max()) for k in initial)
    assert moved > 1e-3 * LR  # the step really trained
    for key in one["weights"]:
        assert torch.equal(one["weights"][key], two["weights"][key]), key


@pytest.mark.parametrize("zero", STAGES)
def test_lora_one_rank_equals_two_ranks(trained, zero):
    """The same invariance with LoRA adapters (rank 4 on every linear layer): the same power-of-two
    argument, so the adapters after the step are bitwise equal; B moved (A has no gradient while B = 0)
    and no base weight did."""
    load, initial = trained
    one, two = load(1, f"lora-dapo-zero{zero}"), load(2, f"lora-dapo-zero{zero}")
    assert one["weights"].keys() == two["weights"].keys()
    for key in one["weights"]:
        assert torch.equal(one["weights"][key], two["weights"][key]), key
    adapters = {k: w for k, w in one["weights"].items() if ".lora_B." in k}
    assert adapters and max(float(w.abs().max()) for w in adapters.values()) > 1e-3 * LR
    base = {k.removeprefix("base_model.model.").replace(".base_layer", ""): w for k, w in one["weights"].items()
            if ".lora_" not in k}
    assert all(torch.equal(base[k], initial[k].detach()) for k in initial)


@pytest.mark.parametrize("zero", STAGES)
def test_cures_ragged_groups_on_two_ranks(trained, zero):
    """Ragged CurES groups [5, 3, 4, 4]: rank 0 trains 9 samples in 3 micro-batches, rank 1 7 samples
    in 2 plus an empty one; the single rank trains all 16 in 4 micro-batches of other compositions,
    so float32 sums run in another order. dapo normalises by the global token count, so the gradient
    is the same up to that re-association: for n = 16 per-sample terms, relative error <= n^2 u =
    256 * 6e-8 = 1.5e-5 of the gradient scale; we allow 1e-4 * grad norm. AdamW's first step with
    eps = 1 moves a weight by lr * g / (|g| + 1), whose slope in g is at most 1, so the weights may
    differ by lr * 1e-4 * grad norm, plus one rounding of w - update in each run (|w| < 2: 2 ulp(1))."""
    load, initial = trained
    one, two = load(1, f"cures-dapo-zero{zero}"), load(2, f"cures-dapo-zero{zero}")
    assert one["group_sizes"] == [5, 3, 4, 4] and one["micro_batches"] == 4 and two["micro_batches"] == 3
    tolerance = LR * 1e-4 * one["grad_norm"] + 2 * ULP_1
    diff = max(float((one["weights"][k] - two["weights"][k]).abs().max()) for k in one["weights"])
    assert diff <= tolerance, (diff, tolerance)
    # the bound has power: losing one rank's gradient moves the weights far outside it
    dropped = load(2, "cures-dapo-zero2-rank1-dropped")
    lost = max(float((one["weights"][k] - dropped["weights"][k]).abs().max()) for k in one["weights"])
    assert lost > 100 * tolerance, (lost, tolerance)


# ---------------------------------------------------------------------------------------------
# Whole runs on two ranks: APRIL, resume, whole-job metrics, eval, two nodes

SMALL = ["rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6", "eval.num_prompts=6",
         "eval.pass_k=2", "train.micro_batch_size=4", "checkpoint.every=1", "checkpoint.keep_last=3",
         "grpo.dynamic_sampling=false", "train.lr=1e-4", "reward.format_weight=0.5", "data.arithmetic.train_size=50",
         "data.arithmetic.test_size=10", "rollout.max_batch_size=8"]


def _sets(*pairs):
    return [x for p in pairs for x in ("--set", p)]


def _run(cmd, ok=True):
    from conftest import subprocess_env
    # one thread per process in every run: runs compared with each other use the same CPU kernels
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**subprocess_env(), "OMP_NUM_THREADS": "1"})
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(step_dir):
    from safetensors.torch import load_file
    return load_file(step_dir / "hf" / "model.safetensors")


@pytest.fixture(scope="module")
def april_two_ranks(tmp_path_factory, digit_model):
    """APRIL on 2 ranks for 3 steps (checkpoint every step); a second run resumed from its step 1."""
    launcher = deepspeed_launcher()
    root = tmp_path_factory.mktemp("april2")
    config = ["configs/grpo_math.yaml", "--no-progress",
              *_sets(*SMALL, f"model.name={digit_model}", "rollout.scheduler=april", "rollout.tokens_per_step=2",
                     "grpo.off_policy=mask_stale", "train.zero_stage=2", "train.max_steps=3")]
    launch = [launcher, "--num_gpus", "2", "--module", "rlpost.cli", "train"]
    _run(launch + config + _sets(f"run.output_dir={root / 'a'}"))
    _run(launch + config + _sets(f"run.output_dir={root / 'b'}", "eval.at_start=false")
         + ["--resume", root / "a" / "checkpoints" / "step_1"])
    return root, config


def test_april_on_two_ranks_keeps_every_buffer_and_resumes_exactly(april_two_ranks):
    from rlpost.checkpoint import load_trainer_state
    from rlpost.metrics import read_metrics
    root, _ = april_two_ranks
    state = load_trainer_state(root / "a" / "checkpoints" / "step_1")["source"]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    # each rank streams its own share of the prompts (prompt k on rank k % 2) and keeps its own buffer:
    # N' = 2B = 8 in all, 4 per rank, of which each rank trains B / 2 = 2: 2 groups wait on each rank
    for rank, part in enumerate(state["ranks"]):
        assert part["sampler"]["ids"] == list(range(rank, 50, 2))[:len(part["sampler"]["ids"])]
        assert len(part["april"]["buffer"]) == 2
        assert all(g["prompt_id"] % 2 == rank for g in part["april"]["buffer"])
    rows = [r for r in read_metrics(root / "a") if "april/groups_finished" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["april/groups_finished"] == 4 and r["groups"] == 4 for r in rows)  # B = 4 in all, summed over ranks
    a, b = _weights(root / "a" / "checkpoints" / "step_3"), _weights(root / "b" / "checkpoints" / "step_3")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the resumed run continued exactly
    moved = _weights(root / "a" / "checkpoints" / "step_2")
    assert any(not torch.equal(a[k], moved[k]) for k in a)  # and the steps did train


def test_april_resume_on_another_world_size_is_one_clear_error(april_two_ranks):
    root, config = april_two_ranks
    proc = _run([sys.executable, "-m", "rlpost.cli", "train", *config, *_sets(f"run.output_dir={root / 'c'}"),
                 "--resume", root / "a" / "checkpoints" / "step_1"], ok=False)
    assert proc.returncode == 2 and "written by 2 rank(s), this run has 1" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_eval_numbers_do_not_depend_on_the_world_size(april_two_ranks):
    """The 2-rank run's eval before training (the prompts split over ranks, results gathered) equals
    a 1-rank eval of the same initial model: same chunks, same seeds, same numbers."""
    from rlpost.metrics import read_metrics
    root, config = april_two_ranks
    _run([sys.executable, "-m", "rlpost.cli", "train", *config, *_sets(f"run.output_dir={root / 'one'}", "train.max_steps=1")])
    two = next(r for r in read_metrics(root / "a") if r["step"] == 0 and "eval/accuracy" in r)
    one = next(r for r in read_metrics(root / "one") if r["step"] == 0 and "eval/accuracy" in r)
    for key in ("eval/accuracy", "eval/pass@2", "eval/sample_accuracy", "eval/response_length", "eval/num_prompts"):
        assert one[key] == two[key], key


WORKERS = ["rollout.placement=workers", "rollout.engine=hf", "rollout.worker_threads=1", "rollout.learner_threads=1"]


@pytest.mark.parametrize("placement", ["colocated", "workers"])
def test_two_nodes_with_the_deepspeed_launcher(tmp_path, digit_model, placement):
    """Two launcher invocations on this machine as node 0 and node 1 of a hostfile (one process each,
    no ssh: --no_ssh --node_rank), as on two hosts without passwordless ssh; trains two steps. With
    rollout workers each node's rank starts and reaches its own worker (a TCP store on that node's
    loopback), as on two hosts."""
    launcher = deepspeed_launcher()
    from conftest import subprocess_env
    from rlpost.metrics import read_metrics
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    procs = [subprocess.Popen([str(launcher), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "--module", "rlpost.cli",
                               "train", "configs/grpo_math.yaml", "--no-progress",
                               *_sets(*SMALL, f"model.name={digit_model}", f"run.output_dir={run}", "train.max_steps=2",
                                      "eval.at_start=false", *(WORKERS if placement == "workers" else []))],
                              cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    assert (run / "checkpoints" / "latest").resolve().name == "step_2"
    rows = [r for r in read_metrics(run) if "groups" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(r["groups"] == 4 for r in rows)
    if placement == "workers":
        assert all(r["rollout/staleness_max"] == 0 for r in rows)
