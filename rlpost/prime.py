"""PRIME's dense rewards (ALGORITHMS.md §6.3): token rewards from an implicit PRM that is trained
online, once per step, with CE on the step's kept rollouts. The PRM is a second Learner with its own
optimizer; it is saved in every checkpoint under `prm/`.

The order is the released trainer's: the outcome verdicts first (the ordinary rewards step, which
APRIL and CurES may run early, group by group), then the prompt filter (`grpo.accuracy_range`, the
objective's `keep`), then, on the kept groups only, the PRM's scores and its one update of the step.
The trainer calls `PrimeDense` once per step after the filter; the other methods get `NoDense`.

GRPO turns samples that carry token rewards into PRIME's advantages (rlpost/objectives/grpo.py):
leave-one-out returns (`prime.rloo`: the paper's or the released code's form) of `prime.coef` x the
token rewards, optionally divided by the batch's largest |return| (`prime.dense_norm: max_abs`, the
released code's "batch_norm"), plus the outcome reward, whitened over the batch. Where it departs
from the released code, and why: the token rewards carry beta (the code used the raw log-ratio),
since `prime.coef` already sets their weight; under `dense_norm: max_abs` beta cancels.
`update: after` scores with the PRM as it was before this step's update (the released default);
`before` updates first.
"""
from __future__ import annotations

import torch

from rlpost.batch import pack, token_logprobs
from rlpost.metrics import resolve
from rlpost.objectives.implicit_prm import ImplicitPRM
from rewards.implicit_prm import token_rewards
from rollout.types import Group


class NoDense:
    """No dense rewards: every method but PRIME."""
    learners: dict = {}

    def __call__(self, groups: list[Group]) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


class PrimeDense:
    def __init__(self, prm_learner, prm_objective: ImplicitPRM, update: str = "after", batch: int = 16):
        self.prm, self.objective = prm_learner, prm_objective
        self.update, self.batch = update, batch
        self.learners = {"prm": prm_learner}
        self._stats: dict[str, float] = {}

    def __call__(self, groups: list[Group]) -> None:
        """Token rewards on every sample of `groups` (this step's kept groups) and one PRM update."""
        if self.update == "before":
            self._train(groups)
        self._score(groups)
        if self.update == "after":
            self._train(groups)

    def _score(self, groups: list[Group]) -> None:
        samples = [s for g in groups for s in g.samples]
        model, reference = self.prm.model, self.objective.reference
        model.eval()
        total, tokens = 0.0, 0
        for start in range(0, len(samples), self.batch):
            chunk = samples[start:start + self.batch]
            packed = pack(chunk, self.objective.pad_id)
            with torch.no_grad():
                logp = token_logprobs(model, packed.to(next(model.parameters()).device))[0].double().cpu()
                ref = token_logprobs(reference, packed.to(next(reference.parameters()).device))[0].double().cpu()
            rho = token_rewards(logp, ref, packed.response_mask.double(), self.objective.cfg.beta)
            for row, sample in enumerate(chunk):
                sample.token_rewards = rho[row, :len(sample.response_ids)].tolist()
            total, tokens = total + float(rho.abs().sum()), tokens + int(packed.response_mask.sum())
        if tokens:  # the dense rewards' scale: near 0 means PRIME is GRPO in all but cost
            self._stats["prime/token_reward_abs"] = total / tokens

    def _train(self, groups: list[Group]) -> None:
        micro_batches = self.objective.micro_batches(groups, None, self.prm.version)
        if micro_batches:  # empty on every rank when no rank kept a group
            stats = resolve(self.prm.train_step(micro_batches, self.objective.head, self.objective.loss))
            self._stats.update({f"prm/{k.removeprefix('prm/')}": v for k, v in stats.items()})

    def metrics(self) -> dict[str, float]:
        out, self._stats = self._stats, {}
        return out
