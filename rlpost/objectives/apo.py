"""APO (ALGORITHMS.md §4): iterative DPO in rounds whose reference extrapolates, Nesterov-style, from
the two latest round-start policies. `apo.alpha: 0` is iterative DPO.

A round is `apo.steps_per_round` steps of the one training loop. Its first step receives fresh groups
(the rollout source runs once per round, rollout.source.RoundSource); the objective then

    rolls the snapshots   previous <- latest; latest <- the learner's current weights (pi_t)
    builds the pairs      correct over incorrect inside each group (rlpost/objectives/dpo.py)
    fixes the reference   ref(y) = (1 + alpha) log pi_t(y) - alpha log pi_(t-1)(y), sequence sums,
                          once per round without gradient (round 1: log pi_0)

and every step of the round is one DPO step over all of the round's pairs.

Where it departs from the paper and why: the paper's judge (PairRM, best vs worst of several
samples) is replaced by the math verifier (correct over incorrect); the previous policy is kept as a
frozen copy rather than as cached log-probs, because only it can score the next round's new
samples. Resume inside a round is exact: the round's pairs, their reference log-probs and the
round-start weights pi_t are in the objective's state. With LoRA (model.lora) the snapshots are
adapter snapshots on the learner's own base (rlpost/lora.AdapterView): the base exists once, and a
snapshot, its roll and its checkpoint state are the adapter tensors only.
"""
from __future__ import annotations

import torch

from rlpost.algorithms import dpo
from rlpost.batch import Packed, pack, pair_rows
from rlpost.config import Config
from rlpost.objectives.dpo import DPO, PairBatch, sequence_logps
from rollout.types import Group


class APO(DPO):
    policy_snapshots = ("latest", "previous")  # frozen models that hold the policy of a round start (LoRA: its adapters)

    def __init__(self, cfg: Config, frozen: dict[str, torch.nn.Module], pad_id: int, policy_weights=None):
        super().__init__(cfg, frozen, pad_id)
        self.beta, self.pairs_per_group = cfg.apo.beta, cfg.apo.pairs_per_group
        self.alpha = cfg.apo.alpha
        self.latest, self.previous = frozen["latest"], frozen["previous"]  # pi_t and pi_(t-1), frozen copies
        self.policy_weights = policy_weights  # () -> (name, tensor) pairs of the learner's trained tensors
        self.round, self.round_steps = 0, cfg.apo.steps_per_round
        self.step_in_round = 0  # steps of the current round already trained (the source counts the same)
        self._parts: list = []  # the round's (packed pair rows, reference chosen, reference rejected)
        self._num_pairs = 0

    @classmethod
    def frozen_models(cls, cfg: Config) -> dict[str, str]:
        return {"latest": cfg.model.name, "previous": cfg.model.name}

    @classmethod
    def steps_per_round(cls, cfg: Config) -> int:
        return cfg.apo.steps_per_round

    def _roll_snapshots(self) -> None:
        """previous <- latest; latest <- the learner's weights now (parameter by parameter: a tied output
        head is not a parameter of its own and follows its embedding)."""
        self.previous.load_state_dict(self.latest.state_dict())
        params = dict(self.latest.named_parameters())
        with torch.no_grad():
            for name, tensor in self.policy_weights():
                params[name].copy_(tensor)

    def micro_batches(self, groups: list[Group], advantages, version: int) -> list[PairBatch]:
        start = self.step_in_round == 0  # every rank starts the round, with or without groups of its own
        self.step_in_round = (self.step_in_round + 1) % self.round_steps
        if start:  # the first step of a round: new samples (none on a rank the source gave no group)
            self.round += 1
            if self.round > 1:
                self._roll_snapshots()
            pairs = self.pairs(groups)
            self._num_pairs, self._parts = len(pairs), []
            margins = []
            for rows in pair_rows(pairs, self.pairs_per_micro_batch):
                packed, n = pack(rows, self.pad_id), len(rows) // 2
                latest = sequence_logps(self.latest, packed, self._decoder)
                previous = sequence_logps(self.previous, packed, self._decoder) if self.round > 1 else None
                ref = dpo.extrapolated_reference(latest, previous, self.alpha)
                self._parts.append((packed, ref[:n], ref[n:]))
                # the policy starts the round at pi_t: its DPO margin against the extrapolated reference
                margins.append(self.beta * dpo.preference_margin(latest[:n], latest[n:], ref[:n], ref[n:]))
            start_margin = float(torch.cat(margins).mean()) if margins else 0.0
            self._metrics = {"round": float(self.round), "round/pairs": float(len(pairs)),
                             "round/groups_without_pair": float(len(groups) - sum(map(self.has_pair, groups))),
                             "round/start_margin": start_margin}
        else:
            self._metrics = {"round": float(self.round)}
        return self.finish(list(self._parts), self._num_pairs)

    def state_dict(self) -> dict:
        return {"round": self.round, "step_in_round": self.step_in_round, "num_pairs": self._num_pairs,
                "parts": [{"input_ids": p.input_ids, "attention_mask": p.attention_mask, "position_ids": p.position_ids,
                           "response_mask": p.response_mask, "prompt_width": p.prompt_width,
                           "ref_chosen": rc, "ref_rejected": rr} for p, rc, rr in self._parts],
                "latest": self.latest.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.step_in_round, self._num_pairs = state["round"], state["step_in_round"], state["num_pairs"]
        self._parts = [(Packed(p["input_ids"], p["attention_mask"], p["position_ids"], p["response_mask"],
                               p["prompt_width"]), p["ref_chosen"], p["ref_rejected"]) for p in state["parts"]]
        self.latest.load_state_dict(state["latest"])
