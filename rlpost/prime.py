"""PRIME's rewards step (ALGORITHMS.md §6.3): the outcome reward, then dense token rewards from an
implicit PRM that is trained online, every step, with CE on the same rollouts. The PRM is a second
Learner with its own optimizer; it is saved in every checkpoint under `prm/`.

GRPO turns samples that carry token rewards into PRIME's advantages (rlpost/objectives/grpo.py):
leave-one-out returns of `prime.coef` x the token rewards plus the outcome reward, whitened over the
batch. Where it departs from the released code, and why: the token rewards carry beta (the code used
the raw log-ratio and rescaled by the batch maximum), since `prime.coef` already sets their weight.
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


class PrimeReward:
    def __init__(self, outcome, prm_learner, prm_objective: ImplicitPRM, update: str = "after", batch: int = 16):
        self.outcome, self.prm, self.objective = outcome, prm_learner, prm_objective
        self.update, self.batch = update, batch
        self.learners = {"prm": prm_learner}
        self._stats: dict[str, float] = {}

    def __call__(self, groups: list[Group]) -> None:
        self.outcome(groups)
        fresh = [g for g in groups if any(s.token_rewards is None for s in g.samples)]
        if not fresh:
            return
        if self.update == "before":
            self._train(fresh)
        self._score(fresh)
        if self.update == "after":
            self._train(fresh)

    def _score(self, groups: list[Group]) -> None:
        samples = [s for g in groups for s in g.samples]
        model, reference = self.prm.model, self.objective.reference
        model.eval()
        for start in range(0, len(samples), self.batch):
            chunk = samples[start:start + self.batch]
            packed = pack(chunk, self.objective.pad_id)
            with torch.no_grad():
                logp = token_logprobs(model, packed.to(next(model.parameters()).device))[0].double().cpu()
                ref = token_logprobs(reference, packed.to(next(reference.parameters()).device))[0].double().cpu()
            rho = token_rewards(logp, ref, packed.response_mask.double(), self.objective.cfg.beta)
            for row, sample in enumerate(chunk):
                sample.token_rewards = rho[row, :len(sample.response_ids)].tolist()

    def _train(self, groups: list[Group]) -> None:
        micro_batches = self.objective.micro_batches(groups, None, self.prm.version)
        if micro_batches:
            stats = resolve(self.prm.train_step(micro_batches, self.objective.head, self.objective.loss))
            self._stats = {f"prm/{k.removeprefix('prm/')}": v for k, v in stats.items()}

    def metrics(self) -> dict[str, float]:
        out, self._stats = self._stats, {}
        return out
