"""DPO as an objective: preference pairs from scored groups, a frozen reference, the sequence-level
logistic loss (rlpost/algorithms/dpo.py). Online (pairs among a policy's own samples, correct over
incorrect) or offline (a preference file through the dataset source, whose rows arrive labelled).

Where it departs from the paper (Rafailov et al.) and TRL's DPOTrainer, and why:
- Pairs are built inside each group from the verifier's verdicts (`correct` over not correct), so the
  same objective serves online sampling and preference files: a file's chosen / rejected arrive with
  those verdicts already set (and swapped with data.swap_pairs).
- The loss is the mean over the step's pairs on all ranks (not per micro-batch), so the update does
  not depend on how pairs are split into micro-batches or ranks.
- Reference log-probs are computed once per step without gradient, at temperature 1 (DPO scores the
  policy itself, not the sampling distribution).
APO (rlpost/objectives/apo.py) is this objective with a reference that rolls between rounds.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlpost.algorithms import dpo
from rlpost.batch import (Decoder, HeadFn, Packed, empty_pack, hf_decoder, logprob_head, pack, pad_across_ranks,
                          pair_rows, rows_decoder, token_logprobs)
from rlpost.config import Config
from rlpost.metrics import Mean, Stats
from rollout.types import Group, Sample, world


def build_pairs(correct: list[bool], pairs_per_group: int) -> list[tuple[int, int]]:
    """(chosen, rejected) member indices inside one group: a correct member over an incorrect one, at
    most `pairs_per_group`. Pair j takes the (j mod #correct)-th correct and the (j mod #incorrect)-th
    incorrect member while that gives new pairs (distinct members first), then the rest of the product
    in order. A group that is all correct or all wrong (a tie) gives none."""
    good = [i for i, c in enumerate(correct) if c]
    bad = [i for i, c in enumerate(correct) if not c]
    order: list[tuple[int, int]] = []
    for j in range(len(good) * len(bad)):
        pair = (j % len(good), j % len(bad))
        if pair in order:
            break
        order.append(pair)
    order += [p for p in itertools.product(range(len(good)), range(len(bad))) if p not in order]
    return [(good[c], bad[w]) for c, w in order[:pairs_per_group]]


@dataclass
class PairBatch:
    packed: Packed               # 2k rows: k chosen, then their k rejected
    ref_chosen: torch.Tensor     # [k] reference sequence log-probs
    ref_rejected: torch.Tensor   # [k]
    pairs_per_rank: float        # the step's pairs over all ranks / world size: the loss normaliser


def sequence_logps(model: torch.nn.Module, packed: Packed, decoder: Decoder = hf_decoder) -> torch.Tensor:
    """log pi(y|x) per row under a frozen model, float64 on the CPU."""
    batch = packed.to(next(model.parameters()).device)
    with torch.no_grad():
        logp = token_logprobs(model, batch, 1.0, decoder=decoder)[0].double()
        return dpo.sequence_logps(logp, batch.response_mask.double()).cpu()


class DPO:
    def __init__(self, cfg: Config, frozen: dict[str, torch.nn.Module], pad_id: int, policy_weights=None):
        self.beta, self.pairs_per_group = cfg.dpo.beta, cfg.dpo.pairs_per_group
        self.pairs_per_micro_batch = max(cfg.train.micro_batch_size // 2, 1)
        self.pad_id = pad_id
        self.reference = frozen.get("reference")
        self._head = logprob_head(1.0)
        self._decoder = rows_decoder(cfg.train.shares_prompts)  # frozen models read rows as the learner does
        self._metrics: dict[str, float] = {}

    @classmethod
    def frozen_models(cls, cfg: Config) -> dict[str, str]:
        return {"reference": cfg.dpo.reference or cfg.model.name}

    def keep(self, group: Group) -> bool:
        """Every group reaches micro_batches: one without a pair (a tie) contributes none and is counted
        there (`groups_without_pair`). (APO also needs the non-empty list as its round-start signal.)"""
        return True

    def has_pair(self, group: Group) -> bool:
        return bool(build_pairs([bool(s.correct) for s in group.samples], self.pairs_per_group))

    def advantages(self, groups: list[Group]) -> None:
        return None  # DPO has no per-sample advantage: the pair is the unit

    def pairs(self, groups: list[Group]) -> list[tuple[Sample, Sample]]:
        out = []
        for g in groups:
            out += [(g.samples[c], g.samples[r]) for c, r in
                    build_pairs([bool(s.correct) for s in g.samples], self.pairs_per_group)]
        return out

    def reference_logps(self, packed: Packed) -> torch.Tensor:
        return sequence_logps(self.reference, packed, self._decoder)

    def micro_batches(self, groups: list[Group], advantages, version: int) -> list[PairBatch]:
        pairs = self.pairs(groups)
        self._metrics = {"pairs": float(len(pairs)), "groups_without_pair": float(len(groups) - sum(map(self.has_pair, groups)))}
        return self.pack_pairs(pairs)

    def pack_pairs(self, pairs: list[tuple[Sample, Sample]]) -> list[PairBatch]:
        parts = []
        for rows in pair_rows(pairs, self.pairs_per_micro_batch):
            packed, n = pack(rows, self.pad_id), len(rows) // 2
            ref = self.reference_logps(packed)
            parts.append((packed, ref[:n], ref[n:]))
        return self.finish(parts, len(pairs))

    def finish(self, parts: list, num_pairs: int) -> list[PairBatch]:
        """Normalise by the step's pairs on all ranks; ranks with fewer micro-batches get empty ones."""
        empty = (lambda: (empty_pack(self.pad_id, 2), torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)))
        parts, total = pad_across_ranks(parts, float(num_pairs), empty)
        per_rank = max(total / world()[1], 1e-12)
        return [PairBatch(packed, ref_c, ref_r, per_rank) for packed, ref_c, ref_r in parts]

    def head(self, mb: PairBatch) -> HeadFn:
        return self._head

    def loss(self, mb: PairBatch, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        logp = outputs["logp"]
        seq = dpo.sequence_logps(logp, mb.packed.response_mask.to(logp.device, logp.dtype))
        k = len(mb.ref_chosen)
        chosen, rejected = seq[:k], seq[k:]
        ref_c, ref_r = mb.ref_chosen.to(seq.device, seq.dtype), mb.ref_rejected.to(seq.device, seq.dtype)
        margin = dpo.preference_margin(chosen, rejected, ref_c, ref_r)
        real = mb.packed.response_mask[:k].sum(-1).to(seq.device) > 0  # an empty padding pair counts for nothing
        loss = (-F.logsigmoid(self.beta * margin) * real).sum() / mb.pairs_per_rank
        with torch.no_grad():
            reward_c, reward_r = dpo.implicit_rewards(chosen, rejected, ref_c, ref_r, self.beta)
            n = float(real.sum())
            stats: Stats = {
                "loss": float(loss),
                "rewards/chosen": Mean(float((reward_c * real).sum()), n),
                "rewards/rejected": Mean(float((reward_r * real).sum()), n),
                "rewards/accuracies": Mean(float(((reward_c > reward_r) & real).sum()), n),
                "rewards/margins": Mean(float(((reward_c - reward_r) * real).sum()), n),
            }
        return loss, stats

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
