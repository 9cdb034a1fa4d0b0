"""Training an implicit PRM from outcome labels (ALGORITHMS.md §6): a causal LM whose reward is
r(y) = beta (log pi_phi(y) - log pi_ref(y)), trained with cross-entropy on the verifier's verdicts
(`correct`), or with DPO on correct-over-incorrect pairs; its per-token log-ratios are then process
rewards (rewards/implicit_prm.py, ImplicitPRMScorer). Samples come from the policy through the
rollout source and are labelled by the verifier, or from a labelled file (dataset source).

Where it departs from the paper / released code, and why: the CE loss is averaged over the step's
responses on all ranks (not per micro-batch), so the update does not depend on the split; the
reference log-probs are computed once per step without gradient. The checkpoint's objective state
names the reference, which a scorer needs (`ImplicitPRMScorer` must use the exact reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlpost.batch import (HeadFn, Packed, empty_pack, logprob_head, pack, pad_across_ranks, pair_rows, rows_decoder,
                          token_logprobs)
from rlpost.config import Config
from rlpost.metrics import Mean, Stats
from rlpost.objectives.dpo import build_pairs
from rewards import implicit_prm as prm
from rollout.types import Group, world


@dataclass
class PRMBatch:
    packed: Packed                 # CE: n labelled responses; DPO: k chosen then their k rejected
    ref_logp: torch.Tensor         # [n, T] reference per-token log-probs
    labels: torch.Tensor           # [n] 1.0 correct / 0.0 wrong (CE)
    per_rank: float                # responses (CE) or pairs (DPO) of the step on all ranks / world size


class ImplicitPRM:
    trains_the_sampler = False  # the samples come from a fixed policy (model.name), not from the PRM in training

    def __init__(self, cfg: Config, frozen: dict[str, torch.nn.Module], pad_id: int, policy_weights=None):
        self.cfg = cfg.prm
        self.reference = frozen["reference"]
        self.reference_name = cfg.prm.reference or cfg.model.name
        self.pad_id, self.micro_batch_size = pad_id, cfg.train.micro_batch_size
        self._head = logprob_head(1.0)
        self._decoder = rows_decoder(cfg.train.shares_prompts)  # the reference reads rows as the learner does

    @classmethod
    def frozen_models(cls, cfg: Config) -> dict[str, str]:
        return {"reference": cfg.prm.reference or cfg.model.name}

    def keep(self, group: Group) -> bool:
        return True

    def advantages(self, groups: list[Group]) -> None:
        return None

    def micro_batches(self, groups: list[Group], advantages, version: int) -> list[PRMBatch]:
        if self.cfg.loss == "dpo":
            pairs = [(g.samples[c], g.samples[r]) for g in groups
                     for c, r in build_pairs([bool(s.correct) for s in g.samples], self.cfg.pairs_per_group)]
            chunks = pair_rows(pairs, max(self.micro_batch_size // 2, 1))
            units = len(pairs)
        else:
            samples = [s for g in groups for s in g.samples if s.correct is not None]
            chunks = [samples[i:i + self.micro_batch_size] for i in range(0, len(samples), self.micro_batch_size)]
            units = len(samples)
        parts, device = [], next(self.reference.parameters()).device
        for chunk in chunks:
            packed = pack(chunk, self.pad_id)
            with torch.no_grad():
                ref = token_logprobs(self.reference, packed.to(device), 1.0, decoder=self._decoder)[0].double().cpu()
            parts.append((packed, ref, torch.tensor([float(bool(s.correct)) for s in chunk], dtype=torch.float64)))
        empty = (lambda: (empty_pack(self.pad_id, 2), torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)))
        parts, total = pad_across_ranks(parts, float(units), empty)
        per_rank = max(total / world()[1], 1e-12)
        return [PRMBatch(p, ref, labels, per_rank) for p, ref, labels in parts]

    def head(self, mb: PRMBatch) -> HeadFn:
        return self._head

    def loss(self, mb: PRMBatch, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        logp = outputs["logp"]
        mask = mb.packed.response_mask.to(logp.device, logp.dtype)
        real = mask.sum(-1) > 0
        rho = prm.token_rewards(logp, mb.ref_logp.to(logp.device, logp.dtype), mask, self.cfg.beta)
        reward = rho.sum(-1)  # r(y) = q_T
        if self.cfg.loss == "dpo":
            k = len(reward) // 2
            per_unit = -F.logsigmoid(reward[:k] - reward[k:]) * real[:k]
            right = ((reward[:k] > reward[k:]) & real[:k]).sum()
            n = float(real[:k].sum())
        else:
            labels = mb.labels.to(reward.device, reward.dtype)
            per_unit = F.binary_cross_entropy_with_logits(reward, labels, reduction="none") * real
            right = (((reward > 0) == labels.bool()) & real).sum()
            n = float(real.sum())
        loss = per_unit.sum() / mb.per_rank
        return loss, {"loss": float(loss), "prm/accuracy": Mean(float(right), n),
                      "prm/mean_reward": Mean(float((reward * real).sum()), float(real.sum()))}

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"reference": self.reference_name, "beta": self.cfg.beta}  # what a scorer needs besides hf/

    def load_state_dict(self, state: dict) -> None:
        pass
