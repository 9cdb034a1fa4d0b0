"""Objectives: what a step trains on, and its loss. One file per method, one registry line each.

The trainer calls, in this order, every step:

    keep(group) -> bool                         which scored groups train (also APRIL's accept filter)
    advantages(groups) -> Tensor | None         [N] or [N, T] per sample; None where a method has none
    micro_batches(groups, advantages, version)  fixed-size micro-batches, with the no-grad forwards of
                                                the objective's frozen models already done
    head(mb) -> HeadFn                          what the output head computes, chunk by chunk
    loss(mb, outputs) -> (loss, Stats)          the already-normalised loss of one micro-batch

`frozen_models(cfg)` (a classmethod) names the frozen models an objective needs (GRPO's KL
reference; APO's two snapshots; AlignDistil's teachers): the trainer loads them once and passes
them to the constructor, with `policy_weights()` (the learner's trained tensors, for objectives
that snapshot the policy; those name the snapshots in a `policy_snapshots` class attribute). With
LoRA the learner decides which frozen models are its own base with adapters disabled rather than a
copy (rlpost/build.frozen_models, rlpost/lora.py). An objective that trains several steps on one
round of samples has a `steps_per_round(cfg)` classmethod; its source then yields groups only at
round starts. `state_dict` / `load_state_dict` carry whatever the objective keeps between steps
(nothing for GRPO).
"""
from __future__ import annotations

from typing import Protocol

import torch

from rlpost.batch import HeadFn
from rlpost.config import Config
from rlpost.metrics import Stats
from rlpost.objectives.aligndistil import AlignDistil
from rlpost.objectives.apo import APO
from rlpost.objectives.dpo import DPO
from rlpost.objectives.grpo import GRPO
from rlpost.objectives.implicit_prm import ImplicitPRM
from rlpost.objectives.reward_model import RewardModel
from rollout.types import Group


class Objective(Protocol):
    @classmethod
    def frozen_models(cls, cfg: Config) -> dict[str, str]: ...

    def keep(self, group: Group) -> bool: ...

    def advantages(self, groups: list[Group]) -> torch.Tensor | None: ...

    def micro_batches(self, groups: list[Group], advantages: torch.Tensor | None, version: int) -> list: ...

    def head(self, micro_batch) -> HeadFn: ...

    def loss(self, micro_batch, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]: ...

    def metrics(self) -> dict[str, float]:
        """Numbers of the objective itself for this step's log (pairs built, round, ...)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


OBJECTIVES: dict[str, type] = {
    "grpo": GRPO,
    "dpo": DPO,
    "apo": APO,
    "aligndistil": AlignDistil,
    "implicit_prm": ImplicitPRM,
    "reward_model": RewardModel,
}


def objective_class(cfg: Config) -> type:
    return OBJECTIVES[cfg.algorithm]
