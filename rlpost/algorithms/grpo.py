"""GRPO loss maths (ALGORITHMS.md §1). Pure tensor functions: no models, no I/O.

Shapes: per-token tensors are [N, T] (N sequences, T response positions, right-padded) with a
0/1 float `mask` of the same shape. Groups are ragged: a flat reward vector plus `group_sizes`
(sum(group_sizes) == N), never a padded [B, G] matrix.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

Scale = Literal["group", "batch", "none"]
Aggregation = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
RatioLevel = Literal["token", "sequence"]

STD_EPS = 1e-4  # TRL's constant; keeps all-equal groups finite (A = 0)


def group_advantages(rewards: torch.Tensor, group_sizes: Sequence[int], scale: Scale = "group") -> torch.Tensor:
    """A_i = (r_i - mean_group) / (std + 1e-4), std unbiased (n-1), per group or over the batch."""
    if any(g < 2 for g in group_sizes):
        raise ValueError(f"every group needs >= 2 samples for an unbiased std, got sizes {list(group_sizes)}")
    if sum(group_sizes) != rewards.numel():
        raise ValueError(f"group sizes sum to {sum(group_sizes)} but there are {rewards.numel()} rewards")
    rewards = rewards.double()
    groups = torch.split(rewards, list(group_sizes))
    centered = torch.cat([g - g.mean() for g in groups])
    if scale == "none":
        return centered.float()
    if scale == "group":
        std = torch.cat([g.std(unbiased=True).expand(len(g)) for g in groups])
    elif scale == "batch":
        std = rewards.std(unbiased=True).expand(len(rewards))
    else:
        raise ValueError(f"unknown advantage scale {scale!r}")
    return (centered / (std + STD_EPS)).float()


def informative_groups(rewards: torch.Tensor, group_sizes: Sequence[int]) -> list[bool]:
    """Dynamic sampling (DAPO): a group whose rewards are all equal has zero advantage everywhere."""
    return [bool((g.max() - g.min()) > 0) for g in torch.split(rewards, list(group_sizes))]


def importance_ratio(logp: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor,
                     level: RatioLevel = "token") -> torch.Tensor:
    """rho = exp(logp - logp_old), per token or (GSPO) as the exp of the masked mean log-ratio per sequence.

    Never shortcut to 1 when logp_old == logp.detach(): the value is 1 but the gradient is not 0.
    """
    log_ratio = logp - logp_old
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        seq = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return torch.exp(seq).unsqueeze(-1).expand_as(logp)
    raise ValueError(f"unknown importance-ratio level {level!r}")


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """Per-token PPO loss -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A); `advantages` broadcasts ([N, 1])."""
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped)


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 with d = logp_ref - logp; >= 0."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1.0


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, mode: Aggregation, *, grad_accum_steps: int = 1,
              max_completion_length: int | None = None, global_tokens: float | None = None,
              num_processes: int = 1) -> torch.Tensor:
    """Reduce per-token losses of one micro-batch so that summing over micro-batches gives the intended loss.

    `global_tokens` (dapo) is the mask total of the whole generation batch over all micro-batches and
    ranks; it must be known before the first backward, otherwise dapo silently degrades to bnpo.
    """
    masked = token_loss * mask
    if mode == "grpo":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.mean() / grad_accum_steps
    if mode == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1) / grad_accum_steps
    if mode == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo aggregation needs max_completion_length")
        return masked.sum() / (token_loss.shape[0] * max_completion_length) / grad_accum_steps
    if mode == "dapo":
        if global_tokens is None:
            raise ValueError("dapo aggregation needs global_tokens (the batch's total loss tokens)")
        return masked.sum() / max(global_tokens / num_processes, 1.0)
    raise ValueError(f"unknown aggregation {mode!r}")


def off_policy_mask(mask: torch.Tensor, versions: torch.Tensor, current_version: int) -> torch.Tensor:
    """APRIL `mask_stale`: keep the loss only on tokens sampled by the current policy version."""
    return mask * (versions >= current_version).to(mask.dtype)


def ratio_band_mask(logp: torch.Tensor, logp_behaviour: torch.Tensor, cap: float) -> torch.Tensor:
    """IcePop-style: 1 where the behaviour ratio pi / pi_behaviour lies in [1/cap, cap], else 0 (a token
    the sampler and the learner disagree on that much carries no loss)."""
    log_ratio = logp.detach() - logp_behaviour
    return (log_ratio.abs() <= torch.log(torch.tensor(cap, dtype=log_ratio.dtype))).to(logp.dtype)


def truncated_importance_weight(logp: torch.Tensor, logp_behaviour: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """APRIL `tis`: min(pi / pi_behaviour, C) per token from the stored sampling log-probs; a constant
    weight on the token loss (no gradient flows through it)."""
    return torch.exp(logp.detach() - logp_behaviour).clamp(max=cap)


def grpo_token_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    eps_low: float, eps_high: float, beta: float = 0.0, logp_ref: torch.Tensor | None = None,
                    ratio_level: RatioLevel = "token", pg_weight: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token GRPO loss [N, T] and detached diagnostics (clip fraction, KL) over masked tokens.

    `advantages` is [N] (one per sequence) or [N, T] (per token, e.g. PRIME's dense returns).
    `pg_weight` [N, T] multiplies the policy-gradient term only (APRIL's truncated importance weight,
    as slime applies it): the KL penalty keeps weight 1."""
    ratio = importance_ratio(logp, logp_old, mask, ratio_level)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    loss = clipped_surrogate(ratio, adv, eps_low, eps_high)
    if pg_weight is not None:
        loss = loss * pg_weight
    stats: dict[str, torch.Tensor] = {}
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats["clip_fraction"] = (clipped.float() * mask).sum() / n
    if beta > 0:
        if logp_ref is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = k3_kl(logp, logp_ref)
        loss = loss + beta * kl
        stats["kl"] = (kl.detach() * mask).sum() / n
    return loss, stats
