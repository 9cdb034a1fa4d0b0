"""One rank of the world-size invariance test (tests/test_scale_out.py), started as a real process with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in its environment (gloo on CPU).

For each case (aggregation, ZeRO stage, batch layout) it builds a fresh learner on the tiny
model (with LoRA adapters where the case says so), takes this rank's share of one fixed global batch,
runs one real training step through the GRPO objective and the Learner, and rank 0 saves the full
updated weights to OUT/<case>.pt. APO cases (run_apo_case) run three rounds instead.

    python tests/dist_worker.py OUT CASES_JSON
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlpost.build import make_objective  # noqa: E402
from rlpost.config import Config  # noqa: E402
from rlpost.curriculum import CuresSampler  # noqa: E402
from rlpost.learner import Learner  # noqa: E402
from rollout.types import FinishReason, Group, Sample, world  # noqa: E402

VOCAB = 200  # token ids drawn below this: any id the tiny model knows


def global_groups(layout: str, world_size: int, rank: int) -> list[Group]:
    """This rank's groups of one fixed global batch.

    equal : 2 groups of 4 samples; rank r takes group r (2 ranks), or both (1 rank). With micro-batches
            of 4, one rank runs 2 micro-batches and two ranks 1 each: the same micro-batches.
    cures : 4 prompts whose group sizes come from a real CuresSampler ([5, 3, 4, 4]), split over ranks
            as SyncSource splits them (prompt k on rank k % world): rank 0 gets 9 samples (3 micro-
            batches), rank 1 gets 7 (2, plus an empty one to keep the collectives in step).
    """
    rng = random.Random(1234)
    if layout == "equal":
        sizes = [4, 4]
    else:
        sampler = CuresSampler(4, seed=0, rollouts_per_prompt=4, k_min=2)
        for pid, correct in enumerate([[1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]]):
            sampler.update(pid, [bool(c) for c in correct])
        _, sizes = sampler.next_batch(4)
    groups = []
    for k, size in enumerate(sizes):
        samples = []
        for j in range(size):
            prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 5))]
            response = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 7))]
            s = Sample(prompt, response, [0.0] * len(response), FinishReason.STOP)
            s.reward = float(rng.random() < 0.5) + 0.1 * j  # varied, so every group has a signal
            s.correct = s.reward >= 1
            samples.append(s)
        groups.append(Group(k, "", "", samples))
    return groups[rank::world_size], sizes


def run_case(case: dict, out: Path) -> None:
    rank, world_size = world()
    cfg = Config.model_validate({
        "model": {"name": "tiny-random"},
        "grpo": {"aggregation": case["aggregation"], "beta": 0.0, "dynamic_sampling": False},
        "rollout": {"max_new_tokens": 8, "group_size": 4},
        # AdamW with eps = 1: its first step lr * g / (|g| + 1) moves a weight by at most lr * |dg| when the
        # gradient moves by dg, so the test's tolerance follows from the gradient's (see the test)
        "train": {"zero_stage": case["zero"], "micro_batch_size": 4, "lr": 1e-2, "adam_eps": 1.0,
                  "max_grad_norm": 1e9}})
    if case.get("lora"):  # LoRA adapters (rank 4 on every linear layer) instead of full fine-tuning
        cfg.model.lora = {"r": 4, "alpha": 8.0}
    torch.manual_seed(0)  # LoRA's A is drawn from it: the same on every rank and world size
    learner = Learner(cfg.model.name, cfg.train, lora=cfg.model.lora)
    objective = make_objective(cfg, learner, pad_id=2)
    groups, sizes = global_groups(case["layout"], world_size, rank)
    advantages = objective.advantages(groups)
    micro_batches = objective.micro_batches(groups, advantages, learner.version)
    loss = objective.loss
    if case.get("drop_rank") == rank:  # a negative control: this rank's gradient is lost
        def loss(mb, outputs):
            value, stats = objective.loss(mb, outputs)
            return value * 0.0, stats
    stats = learner.train_step(micro_batches, objective.head, loss)
    params = list(learner.model.named_parameters())
    with learner._gathered([p for _, p in params]):
        weights = {name: p.detach().clone().cpu() for name, p in params}
    if rank == 0:
        torch.save({"weights": weights, "grad_norm": stats.get("grad_norm"), "group_sizes": sizes,
                    "micro_batches": len(micro_batches)}, out / f"{case['name']}.pt")


def run_apo_case(case: dict, out: Path) -> None:
    """APO, three rounds of one step each on the `equal` layout; in round 2 rank 1 gets no group (its
    source handed it none). Every rank must still start the round: roll its snapshots and count it.
    Each rank saves its round count and both snapshots to OUT/<case>-rank<r>.pt."""
    rank, world_size = world()
    cfg = Config.model_validate({
        "algorithm": "apo", "model": {"name": "tiny-random"}, "apo": {"alpha": 0.3, "steps_per_round": 1},
        "rollout": {"max_new_tokens": 8, "group_size": 4},
        "train": {"zero_stage": case["zero"], "micro_batch_size": 4, "lr": 1e-2, "max_grad_norm": 1e9}})
    torch.manual_seed(0)
    learner = Learner(cfg.model.name, cfg.train)
    objective = make_objective(cfg, learner, pad_id=2)
    for round_ in range(3):
        groups, _ = global_groups("equal", world_size, rank)
        if round_ == 1 and rank == 1:
            groups = []
        micro_batches = objective.micro_batches(groups, objective.advantages(groups), learner.version)
        if micro_batches:
            learner.train_step(micro_batches, objective.head, objective.loss)
    snapshot = lambda model: {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    torch.save({"round": objective.round, "latest": snapshot(objective.latest), "previous": snapshot(objective.previous)},
               out / f"{case['name']}-rank{rank}.pt")


def main() -> int:
    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    for case in cases:
        (run_apo_case if case.get("method") == "apo" else run_case)(case, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
