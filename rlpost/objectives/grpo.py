"""GRPO as an objective (ALGORITHMS.md §1-2): group-normalised advantages, clipped surrogate, optional
k3 KL to a frozen reference, four loss aggregations, APRIL's off-policy handling. The maths is in
rlpost/algorithms/grpo.py; this file only decides what a step trains on.

Where it departs from the paper (DeepSeekMath's GRPO) and why:
- One policy update per rollout (pi_old = the current policy): the ratio is 1 with a live gradient,
  so clipping only matters for stale tokens; this is how TRL and verl run GRPO by default.
- The default aggregation is DAPO's token-level sum over the whole batch (`dapo`), not the paper's
  per-sequence mean (`grpo`, still available): long answers are not down-weighted.
- Dynamic sampling (DAPO) drops groups whose rewards are all equal instead of resampling them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlpost.algorithms import grpo
from rlpost.batch import (HeadFn, Packed, empty_pack, logprob_head, pack, pad_across_ranks, padded, rows_decoder,
                          token_logprobs)
from rlpost.config import Config
from rlpost.metrics import Mean, Stats
from rewards import implicit_prm
from rollout.types import Group, world


@dataclass
class GRPOMicroBatch:
    packed: Packed
    advantages: torch.Tensor          # [n] or [n, T]
    loss_mask: torch.Tensor           # [n, T]
    behaviour_logp: torch.Tensor      # [n, T] log-probs stored at sampling time
    current: torch.Tensor             # [n, T] 1 where the token was sampled by the version being trained
    ref_logp: torch.Tensor | None     # [n, T] when beta > 0
    temperature: float
    num_micro_batches: int            # of this step on this rank: the grpo / bnpo / dr_grpo normaliser
    global_tokens: float              # loss tokens of the whole step over all ranks: dapo's normaliser


class GRPO:
    def __init__(self, cfg: Config, frozen: dict[str, torch.nn.Module], pad_id: int, policy_weights=None):
        self.cfg = cfg.grpo
        self.temperature, self.max_new_tokens = cfg.rollout.temperature, cfg.rollout.max_new_tokens
        self.micro_batch_size, self.pad_id = cfg.train.micro_batch_size, pad_id
        self.reference = frozen.get("reference")
        self.prime = cfg.prime
        self._head = logprob_head(self.temperature)
        self._decoder = rows_decoder(cfg.train.shares_prompts)  # the reference reads rows as the learner does

    @classmethod
    def frozen_models(cls, cfg: Config) -> dict[str, str]:
        # the reference costs memory and a forward pass: only when the KL term is on
        return {"reference": cfg.grpo.reference or cfg.model.name} if cfg.grpo.beta > 0 else {}

    def keep(self, group: Group) -> bool:
        """Dynamic sampling: a group whose rewards are all equal has zero advantage everywhere; with
        accuracy_range, only groups whose share of correct answers lies in it (PRIME's filter)."""
        if self.cfg.accuracy_range is not None:
            low, high = self.cfg.accuracy_range
            if not low <= sum(bool(s.correct) for s in group.samples) / len(group.samples) <= high:
                return False
        if not self.cfg.dynamic_sampling:
            return True
        return grpo.informative_groups(torch.tensor([s.reward for s in group.samples]), [len(group.samples)])[0]

    def advantages(self, groups: list[Group]) -> torch.Tensor:
        """[N]: group-normalised rewards. [N, T] when the samples carry token rewards (PRIME): the
        leave-one-out returns of prime.coef x token rewards (prime.rloo's form, prime.dense_norm'd) plus
        the outcome, whitened over the batch."""
        samples = [s for g in groups for s in g.samples]
        rewards = torch.tensor([s.reward for s in samples])
        if not len(rewards):
            return torch.zeros(0)
        sizes = [len(g.samples) for g in groups]
        if all(s.token_rewards is not None for s in samples):
            width = max(len(s.response_ids) for s in samples)
            rho = padded([s.token_rewards for s in samples], width).double()
            mask = padded([[1.0] * len(s.response_ids) for s in samples], width).double()
            dense, outcome = implicit_prm.rloo_returns(self.prime.coef * rho, mask, rewards.double(), sizes,
                                                       form=self.prime.rloo)
            if self.prime.dense_norm == "max_abs":
                dense = implicit_prm.max_abs_scale(dense, mask)
            return implicit_prm.whiten(dense + outcome, mask).float()
        return grpo.group_advantages(rewards, sizes, self.cfg.scale_rewards)

    def micro_batches(self, groups: list[Group], advantages: torch.Tensor, version: int) -> list[GRPOMicroBatch]:
        """Fixed-size micro-batches, and the loss-token total of the whole step (dapo needs it before
        any backward). With off_policy=mask_stale, tokens sampled before `version` carry no loss.

        With several ranks every rank must run the same number of backward passes (each one is a
        collective under ZeRO), so ranks with fewer micro-batches get empty ones (all-zero loss mask)."""
        samples = [s for g in groups for s in g.samples]
        keep = [not (self.cfg.mask_truncated and s.truncated) for s in samples]
        size = self.micro_batch_size
        parts = []
        for start in range(0, len(samples), size):
            chunk = samples[start:start + size]
            packed = pack(chunk, self.pad_id)
            width = packed.response_mask.shape[1]
            loss_mask = packed.response_mask * torch.tensor(keep[start:start + size], dtype=torch.float32).unsqueeze(-1)
            current = grpo.off_policy_mask(packed.response_mask, padded([s.versions for s in chunk], width), version)
            if self.cfg.off_policy == "mask_stale":
                loss_mask = loss_mask * current
            adv = advantages[start:start + size]
            if adv.dim() == 2:  # per-token advantages: to this micro-batch's width
                adv = torch.nn.functional.pad(adv, (0, max(width - adv.shape[1], 0)))[:, :width]
            ref_logp = None
            if self.reference is not None:
                with torch.no_grad():  # on the reference's device, kept on the CPU with the rest of the batch
                    ref_device = next(self.reference.parameters()).device
                    ref_logp = token_logprobs(self.reference, packed.to(ref_device), self.temperature,
                                              decoder=self._decoder)[0].float().cpu()
            parts.append((packed, adv, loss_mask, padded([s.logprobs for s in chunk], width), current, ref_logp))
        parts, global_tokens = pad_across_ranks(parts, sum(float(p[2].sum()) for p in parts), self._empty_part)
        return [GRPOMicroBatch(packed, adv, mask, behaviour, current, ref, self.temperature, len(parts), global_tokens)
                for packed, adv, mask, behaviour, current, ref in parts]

    def _empty_part(self):
        """A one-token micro-batch that contributes nothing: it only keeps the ranks' collectives in step."""
        ref = torch.zeros(1, 1) if self.reference is not None else None
        return empty_pack(self.pad_id), torch.zeros(1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), ref

    def head(self, mb: GRPOMicroBatch) -> HeadFn:
        return self._head

    def loss(self, mb: GRPOMicroBatch, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        g = self.cfg
        logp, entropy = outputs["logp"], outputs["entropy"]  # >= fp32: the head promotes the logits
        mask = mb.loss_mask.to(logp.device)
        behaviour = mb.behaviour_logp.to(logp.device)
        pg_weight = None
        if g.off_policy == "tis":  # min(pi / pi_behaviour, C): stale tokens were sampled by another policy
            pg_weight = grpo.truncated_importance_weight(logp, behaviour, g.tis_cap)
        elif g.off_policy == "icepop":  # no loss where sampler and learner disagree by more than the band
            mask = mask * grpo.ratio_band_mask(logp, behaviour, g.icepop_cap)
        # One update per rollout: pi_old is the current policy, so the ratio is 1 with a live gradient.
        token_loss, stats = grpo.grpo_token_loss(
            logp, logp.detach(), mb.advantages.to(logp.device), mask, eps_low=g.eps_low, eps_high=g.eps_high,
            beta=g.beta, logp_ref=None if mb.ref_logp is None else mb.ref_logp.to(logp.device),
            ratio_level=g.ratio_level, pg_weight=pg_weight)
        loss = grpo.aggregate(token_loss, mask, g.aggregation, grad_accum_steps=mb.num_micro_batches,
                              max_completion_length=self.max_new_tokens, global_tokens=mb.global_tokens,
                              num_processes=world()[1])
        tokens = float(mask.sum())
        current = mb.current.to(logp.device)  # the sampler's log-probs against the learner's, same weights
        out: Stats = {"loss": float(loss.detach()), "entropy": Mean(float((entropy * mask).sum()), tokens),
                      "clip_fraction": Mean(float(stats["clip_fraction"]) * tokens, tokens),
                      "rollout/logprob_diff": Mean(float(((logp.detach() - behaviour).abs() * current).sum()),
                                                   float(current.sum()))}
        if "kl" in stats:
            out["kl"] = Mean(float(stats["kl"]) * tokens, tokens)
        return loss, out

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
