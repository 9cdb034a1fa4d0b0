"""Prompt samplers: which prompts go into the next rollout step. Stateful, so resume is exact."""
from __future__ import annotations

import random


class UniformSampler:
    """Epochs of a seeded random permutation; `next_batch(B)` never repeats a prompt within an epoch."""

    def __init__(self, num_prompts: int, seed: int):
        if num_prompts < 1:
            raise ValueError("the training set is empty")
        self.num_prompts = num_prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.num_prompts))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[int]:
        batch: list[int] = []
        while len(batch) < size:
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(size - len(batch), self.num_prompts - self.position)
            batch += self._order[self.position:self.position + take]
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {"num_prompts": self.num_prompts, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(f"sampler state is for {state['num_prompts']} prompts, this run has {self.num_prompts}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation()
