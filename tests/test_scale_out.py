"""Scale-out that is right on N ranks, tested with real processes (gloo on CPU).

World-size invariance: the same global batch trained by one rank (all micro-batches) and by two ranks
(each its share) must give the same updated weights, for every loss aggregation and ZeRO stage.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO

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
    out = {}
    for world_size in (1, 2):
        out[world_size] = tmp_path_factory.mktemp(f"world{world_size}")
        _launch(world_size, out[world_size], cases)
    from rollout.models import load_model
    initial = dict(load_model("tiny-random").named_parameters())
    return lambda world_size, name: torch.load(out[world_size] / f"{name}.pt"), initial


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
