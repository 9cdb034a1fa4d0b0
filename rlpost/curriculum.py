"""Prompt samplers: which prompts go into the next rollout step, and how many samples each gets.

Both meet rollout.source.PromptSampler: `next_batch(B) -> (prompt_ids, samples_per_prompt)`, learn
from `update(prompt_id, correct)` (the verifier's verdicts, not the shaped reward: a format bonus must
not make a wrong answer count as solved), report `metrics(groups)`, and are stateful (state_dict /
load_state_dict) so resume is exact. The rollout source runs CurES's difficulty pass
(`warm_up_rollouts` samples of every prompt before step 1).

CurES (ALGORITHMS.md §3): a Beta(1,1) posterior of each prompt's accuracy, prompts sampled from
softmax(s(p)/tau) with s(p) = sqrt(p(1-p)), and the rollout budget split in proportion to s(p).
"""
from __future__ import annotations

import math
import random
from typing import Literal, Sequence

import torch

from rollout.types import Group

TauMode = Literal["fixed", "code"]


# ---------------------------------------------------------------------------------------------
# CurES maths: pure functions

def posterior_mean(correct: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Mean of Beta(1 + a, 1 + n - a): (a + 1) / (n + 2)."""
    return (correct + 1.0) / (total + 2.0)


def learning_signal(p: torch.Tensor) -> torch.Tensor:
    """s(p) = sqrt(p (1 - p)): the std of a Bernoulli reward, zero for always/never solved prompts."""
    return torch.sqrt(p * (1.0 - p))


def sampling_probs(correct: torch.Tensor, total: torch.Tensor, tau_mode: TauMode = "fixed",
                   tau: float = 0.1) -> torch.Tensor:
    """q_i = softmax(s(p_i) / tau_i); `code` reproduces the released sampler's tau_i = 100 (a_i + 1)."""
    score = learning_signal(posterior_mean(correct, total))
    if tau_mode == "fixed":
        temperature = torch.full_like(score, tau)
    elif tau_mode == "code":
        temperature = 100.0 * (correct + 1.0)
    else:
        raise ValueError(f"unknown tau_mode {tau_mode!r}")
    return torch.softmax(score / temperature, dim=0)


def gradient_sigma(p: float, grad_norms_correct: Sequence[float], grad_norms_wrong: Sequence[float]) -> float:
    """Std of the single-sample estimator (r - p) g (§3.3): g_c / g_w are gradient norms of log pi(y|x)
    of correct / wrong responses. Equal norms g give g * sqrt(p (1 - p))."""
    def moments(norms):
        norms = torch.tensor(list(norms), dtype=torch.float64)
        return (norms.mean().item(), (norms ** 2).mean().item()) if len(norms) else (0.0, 0.0)

    return sigma_from_moments(p, *moments(grad_norms_correct), *moments(grad_norms_wrong))


def sigma_from_moments(p: float, mean_c: float, sq_c: float, mean_w: float, sq_w: float) -> float:
    """sigma^2 = p q^2 E[g_c^2] + p^2 q E[g_w^2] - p^2 q^2 (E[g_c] - E[g_w])^2, q = 1 - p."""
    q = 1.0 - p
    variance = p * q * q * sq_c + p * p * q * sq_w - p * p * q * q * (mean_c - mean_w) ** 2
    return math.sqrt(max(variance, 0.0))


def allocate(weights: Sequence[float], budget: int, k_min: int = 2) -> list[int]:
    """Split `budget` rollouts in proportion to `weights` (largest-remainder rounding, sum == budget),
    with at least `k_min` per prompt: prompts that fall below it are pinned there and the rest re-split."""
    n = len(weights)
    if budget < k_min * n:
        raise ValueError(f"rollout budget {budget} cannot give {n} prompts {k_min} samples each")
    pinned: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in pinned]
        left = budget - k_min * len(pinned)
        w = [max(float(weights[i]), 0.0) for i in free]
        total = sum(w)
        raw = [left * x / total for x in w] if total > 0 else [left / len(free)] * len(free)
        ks = [math.floor(x) for x in raw]
        order = sorted(range(len(free)), key=lambda j: (raw[j] - ks[j], -j), reverse=True)
        for j in order[:left - sum(ks)]:
            ks[j] += 1
        low = [free[j] for j, k in enumerate(ks) if k < k_min]
        if not low:
            out = [k_min] * n
            for j, i in enumerate(free):
                out[i] = ks[j]
            return out
        pinned.update(low)


# ---------------------------------------------------------------------------------------------
# Samplers

def signal_metrics(groups: list[Group]) -> dict[str, float]:
    """Mean samples per prompt, and how many samples carry a learning signal (reward differs from the
    group mean)."""
    samples = sum(len(g.samples) for g in groups)
    effective = 0
    for g in groups:
        rewards = torch.tensor([s.reward for s in g.samples], dtype=torch.float64)
        effective += int(((rewards - rewards.mean()).abs() > 1e-8).sum())
    return {"curriculum/mean_k": samples / max(len(groups), 1), "curriculum/effective_samples": float(effective)}


class UniformSampler:
    """Epochs of a seeded random permutation; a prompt never repeats within an epoch; fixed group size."""
    wants_grad_norms = False
    warm_up_rollouts = 0

    def __init__(self, num_prompts: int, seed: int, group_size: int = 8):
        if num_prompts < 1:
            raise ValueError("the training set is empty")
        self.num_prompts, self.seed, self.group_size = num_prompts, seed, group_size
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.num_prompts))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> tuple[list[int], list[int]]:
        batch: list[int] = []
        while len(batch) < size:
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(size - len(batch), self.num_prompts - self.position)
            batch += self._order[self.position:self.position + take]
            self.position += take
        return batch, [self.group_size] * len(batch)

    def update(self, prompt_id: int, correct: Sequence[bool], grad_norms: Sequence[float] | None = None) -> None:
        pass  # uniform sampling learns nothing from outcomes

    def metrics(self, groups: list[Group]) -> dict[str, float]:
        return signal_metrics(groups)

    def state_dict(self) -> dict:
        return {"num_prompts": self.num_prompts, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(f"sampler state is for {state['num_prompts']} prompts, this run has {self.num_prompts}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation()


class CuresSampler:
    """CurES: sample prompts by the learning signal of their estimated accuracy, then split the budget
    R = B * rollouts_per_prompt over them (k_i >= k_min). Counters come from every scored rollout."""

    def __init__(self, num_prompts: int, seed: int, rollouts_per_prompt: int = 8, tau_mode: TauMode = "fixed",
                 tau: float = 0.1, allocation: Literal["score", "grad_norm"] = "score", k_min: int = 2,
                 init_rollouts: int = 0):
        if num_prompts < 1:
            raise ValueError("the training set is empty")
        self.wants_grad_norms = allocation == "grad_norm"  # costs an extra forward per response
        self.warm_up_rollouts = init_rollouts              # N_min: the difficulty pass
        self.num_prompts, self.rollouts_per_prompt = num_prompts, rollouts_per_prompt
        self.tau_mode, self.tau, self.allocation, self.k_min = tau_mode, tau, allocation, k_min
        self.correct = torch.zeros(num_prompts, dtype=torch.float64)
        self.total = torch.zeros(num_prompts, dtype=torch.float64)
        # Running moments of per-response gradient norms, [prompt, (correct, wrong), (count, sum, sum of squares)].
        self.grad_moments = torch.zeros(num_prompts, 2, 3, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def accuracy(self) -> torch.Tensor:
        return posterior_mean(self.correct, self.total)

    def next_batch(self, size: int) -> tuple[list[int], list[int]]:
        size = min(size, self.num_prompts)  # without replacement inside a batch
        q = sampling_probs(self.correct, self.total, self.tau_mode, self.tau)
        ids = torch.multinomial(q, size, replacement=False, generator=self.generator).tolist()
        p = self.accuracy()[ids]
        if self.allocation == "grad_norm":
            weights = [self._sigma(i, float(p_i)) for i, p_i in zip(ids, p)]
        else:
            weights = learning_signal(p).tolist()
        return ids, allocate(weights, size * self.rollouts_per_prompt, self.k_min)

    def _sigma(self, prompt_id: int, p: float) -> float:
        count_c, sum_c, sq_c = self.grad_moments[prompt_id, 0].tolist()
        count_w, sum_w, sq_w = self.grad_moments[prompt_id, 1].tolist()
        if count_c == 0 or count_w == 0:  # no norms seen yet on one side: the equal-norm formula
            return math.sqrt(p * (1 - p))
        return sigma_from_moments(p, sum_c / count_c, sq_c / count_c, sum_w / count_w, sq_w / count_w)

    def update(self, prompt_id: int, correct: Sequence[bool], grad_norms: Sequence[float] | None = None) -> None:
        self.correct[prompt_id] += sum(bool(c) for c in correct)
        self.total[prompt_id] += len(correct)
        for ok, norm in zip(correct, grad_norms or []):
            self.grad_moments[prompt_id, 0 if ok else 1] += torch.tensor([1.0, norm, norm * norm], dtype=torch.float64)

    def metrics(self, groups: list[Group]) -> dict[str, float]:
        """Where the sampled prompts sit in difficulty, besides the learning-signal counts."""
        out = signal_metrics(groups)
        p = self.accuracy()
        sampled = p[[g.prompt_id for g in groups]]
        out["curriculum/sampled_mid_accuracy"] = float(((sampled > 0.2) & (sampled < 0.8)).double().mean())
        for q in (0.1, 0.5, 0.9):
            out[f"curriculum/p_hat_q{int(q * 100)}"] = float(torch.quantile(p, q))
        return out

    def state_dict(self) -> dict:
        return {"num_prompts": self.num_prompts, "correct": self.correct.clone(), "total": self.total.clone(),
                "grad_moments": self.grad_moments.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(f"sampler state is for {state['num_prompts']} prompts, this run has {self.num_prompts}")
        self.correct, self.total = state["correct"].clone(), state["total"].clone()
        self.grad_moments = state["grad_moments"].clone()
        self.generator.set_state(state["generator"])


class ShardSampler:
    """A sampler over one rank's share of the prompts (global prompt ids `ids`), for sources where
    each rank streams prompts on its own (APRIL on several ranks). The inner sampler works on local
    indices 0..len(ids)-1; this wrapper speaks global prompt ids, and learns only from its own
    prompts' outcomes (observe() hands every rank's). Its metrics: the learning-signal counts of the
    whole step, plus the inner sampler's own numbers on this rank's share."""

    def __init__(self, inner, ids: list[int]):
        self.inner, self.ids = inner, list(ids)
        self.local = {g: i for i, g in enumerate(self.ids)}
        self.wants_grad_norms, self.warm_up_rollouts = inner.wants_grad_norms, inner.warm_up_rollouts

    def next_batch(self, size: int) -> tuple[list[int], list[int]]:
        ids, sizes = self.inner.next_batch(size)
        return [self.ids[i] for i in ids], sizes

    def update(self, prompt_id: int, correct: Sequence[bool], grad_norms: Sequence[float] | None = None) -> None:
        if prompt_id in self.local:
            self.inner.update(self.local[prompt_id], correct, grad_norms)

    def metrics(self, groups: list[Group]) -> dict[str, float]:
        import dataclasses
        mine = [dataclasses.replace(g, prompt_id=self.local[g.prompt_id]) for g in groups if g.prompt_id in self.local]
        return {**self.inner.metrics(mine), **signal_metrics(groups)}

    def state_dict(self) -> dict:
        return {"ids": self.ids, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["ids"] != self.ids:
            raise ValueError("the sampler state is for another share of the prompts")
        self.inner.load_state_dict(state["inner"])
