"""Reward-model training (Bradley-Terry) as an objective: a sequence classifier with one label
scores both responses of a preference pair, and the loss is -log sigmoid(r_chosen - r_rejected - m)
with TRL's optional per-row `margin` m, plus TRL's `center_rewards_coefficient` * mean((r_c + r_r)^2).
Pairs come from a preference file through the dataset source (TRL's standard / conversational
formats and Anthropic HH, read as the DPO path reads them). The checkpoint's `hf/` is a plain
`AutoModelForSequenceClassification` folder: `reward.models`, `rlpost eval-rm --classifier` and
transformers load it.

Where it departs from TRL's RewardTrainer, and why: the loss is the mean over the step's pairs on all
ranks (not per micro-batch), so the update does not depend on how pairs are split; a row is scored
at its last token that is not padding, exactly as transformers' classifier pools at inference, so a
trained model scores a text the same in training and when loaded back. The score head starts from
transformers' own initialisation of a new head (normal, std `initializer_range`), seeded by run.seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlpost.batch import Packed, empty_pack, pack, pad_across_ranks, pair_rows
from rlpost.config import Config
from rlpost.metrics import Mean, Stats
from rlpost.objectives.dpo import build_pairs
from rollout.types import Group, world


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair loss [k]: -log sigmoid(r_c - r_r - margin) (+ c (r_c + r_r)^2); its mean is TRL's loss."""
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff)
    if center_coefficient is not None:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss


@dataclass
class ScoredPairs:
    packed: Packed            # 2k rows: k chosen, then their k rejected
    margin: torch.Tensor      # [k]
    pairs_per_rank: float     # the step's pairs over all ranks / world size: the loss normaliser


class RewardModel:
    model_head = "score"  # the learner trains a sequence classifier (rlpost/learner.py)

    def __init__(self, cfg: Config, frozen: dict, pad_id: int, policy_weights=None):
        self.center = cfg.reward_model.center_rewards_coefficient
        self.pairs_per_micro_batch = max(cfg.train.micro_batch_size // 2, 1)
        self.pad_id = pad_id
        self._metrics: dict[str, float] = {}

    @classmethod
    def frozen_models(cls, cfg: Config) -> dict[str, str]:
        return {}

    def keep(self, group: Group) -> bool:
        return True

    def advantages(self, groups: list[Group]) -> None:
        return None

    def micro_batches(self, groups: list[Group], advantages, version: int) -> list[ScoredPairs]:
        pairs, margins = [], []
        for g in groups:
            for c, r in build_pairs([bool(s.correct) for s in g.samples], 1):
                pairs.append((g.samples[c], g.samples[r]))
                margins.append(float(g.columns.get("margin", 0.0)))
        self._metrics = {"pairs": float(len(pairs))}
        parts, start = [], 0
        for rows in pair_rows(pairs, self.pairs_per_micro_batch):
            k = len(rows) // 2
            parts.append((pack(rows, self.pad_id), torch.tensor(margins[start:start + k], dtype=torch.float64)))
            start += k
        parts, total = pad_across_ranks(parts, float(len(pairs)),
                                        lambda: (empty_pack(self.pad_id, 2), torch.zeros(1, dtype=torch.float64)))
        per_rank = max(total / world()[1], 1e-12)
        return [ScoredPairs(packed, margin, per_rank) for packed, margin in parts]

    def head(self, mb: ScoredPairs):
        return None  # the score head needs no hook

    def loss(self, mb: ScoredPairs, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        r = outputs["reward"].double()
        k = len(mb.margin)
        chosen, rejected = r[:k], r[k:]
        real = (mb.packed.response_mask[:k].sum(-1) > 0).to(r.device)  # an empty padding pair counts for nothing
        per_pair = bradley_terry_loss(chosen, rejected, mb.margin.to(r.device), self.center)
        loss = (per_pair * real).sum() / mb.pairs_per_rank
        with torch.no_grad():
            n = float(real.sum())
            stats: Stats = {"loss": float(loss),
                            "rewards/accuracies": Mean(float(((chosen > rejected) & real).sum()), n),
                            "rewards/margins": Mean(float(((chosen - rejected) * real).sum()), n),
                            "rewards/chosen": Mean(float((chosen * real).sum()), n),
                            "rewards/rejected": Mean(float((rejected * real).sum()), n)}
        return loss.float(), stats

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
