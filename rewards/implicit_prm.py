"""Implicit PRM maths (ALGORITHMS.md §6): process rewards from log-likelihood ratios, the losses that
train them from outcome labels, and PRIME's RLOO returns. Pure tensors: [N, T] per-token tensors with
a 0/1 `mask`, ragged groups as `group_sizes`; no models, no I/O.

Where it departs from the released code, and why: token rewards carry beta (the released PRIME code
used the raw log-ratio and rescaled by the batch maximum; `max_abs_scale` does that rescaling under
`prime.dense_norm: max_abs`, where beta cancels); both RLOO forms exist (`prime.rloo`: `paper`, the
paper's leave-one-out baseline per sample, or `code`, the released code's), equal at the first token
and different later.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F


def token_rewards(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """rho_t = beta (log pi_phi(y_t|s_t) - log pi_ref(y_t|s_t)), zero off the mask."""
    return beta * (logp - logp_ref) * mask


def cumulative_values(rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q_t = sum_{j <= t} rho_j; q at the last token is the outcome reward r(y)."""
    return torch.cumsum(rho * mask, dim=-1)


def step_values(q: torch.Tensor, step_ends: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per response, the value q at each step's last token (0-based token index; a step's value includes
    its delimiter) and the step rewards R_k = q_(e_k) - q_(e_(k-1)), q_(e_0) = 0. Ragged step counts come
    back padded to [N, K] with a 0/1 step mask: (values, rewards, mask)."""
    K = max((len(e) for e in step_ends), default=0)
    values = torch.zeros(q.shape[0], K, dtype=q.dtype)
    mask = torch.zeros(q.shape[0], K, dtype=q.dtype)
    for row, ends in enumerate(step_ends):
        if ends:
            values[row, :len(ends)] = q[row, list(ends)]
            mask[row, :len(ends)] = 1
    previous = torch.cat([torch.zeros(q.shape[0], 1, dtype=q.dtype), values[:, :-1]], dim=1)
    return values, (values - previous) * mask, mask


def response_scores(step_v: torch.Tensor, step_r: torch.Tensor, step_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Best-of-N scores: min and sum over step rewards and over step values (padding steps excluded)."""
    inf = torch.full_like(step_r, float("inf"))
    return {"min_step_reward": torch.where(step_mask.bool(), step_r, inf).min(-1).values,
            "sum_step_reward": (step_r * step_mask).sum(-1),
            "min_step_value": torch.where(step_mask.bool(), step_v, inf).min(-1).values,
            "sum_step_value": (step_v * step_mask).sum(-1)}


def ce_loss(outcome_reward: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-[l log sigmoid(r) + (1 - l) log(1 - sigmoid(r))], mean over responses (one response suffices)."""
    return F.binary_cross_entropy_with_logits(outcome_reward, labels.to(outcome_reward.dtype))


def dpo_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r(y_w) - r(y_l)), mean over pairs (correct over incorrect)."""
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


def _reverse_discounted_sum(x: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    out = torch.zeros_like(x)
    running = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):
        running = (x[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def rloo_returns(rho: torch.Tensor, mask: torch.Tensor, outcomes: torch.Tensor, group_sizes: Sequence[int], *,
                 gamma: float = 1.0, form: Literal["paper", "code"] = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """PRIME's leave-one-out returns per token, (dense part, outcome part), each [N, T], before whitening.

    paper: A_t = sum_{s>=t} gamma^(s-t) [rho_s - mean_{j != i} mean_s(rho_j)] + r_o(i) - mean_{j != i} r_o(j)
    code : rho'_t = rho_t K / (K - 1) - (1 / (K - 1)) sum_j mean_s(rho_j), then the same discounted sum.
    The outcome part sits at the last token, so with gamma = 1 it is added at every position."""
    if any(k < 2 for k in group_sizes):
        raise ValueError(f"RLOO needs >= 2 samples per group, got {list(group_sizes)}")
    mean_rho = (rho * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    dense, outcome_adv = torch.zeros_like(rho), torch.zeros_like(outcomes, dtype=rho.dtype)
    start = 0
    for k in group_sizes:
        rows = slice(start, start + k)
        total, total_outcome = mean_rho[rows].sum(), outcomes[rows].to(rho.dtype).sum()
        if form == "paper":
            baseline = (total - mean_rho[rows]) / (k - 1)
            adjusted = rho[rows] - baseline.unsqueeze(-1)
        elif form == "code":
            adjusted = rho[rows] * k / (k - 1) - total / (k - 1)
        else:
            raise ValueError(f"unknown RLOO form {form!r}")
        dense[rows] = _reverse_discounted_sum(adjusted * mask[rows], mask[rows], gamma)
        outcome_adv[rows] = outcomes[rows].to(rho.dtype) - (total_outcome - outcomes[rows].to(rho.dtype)) / (k - 1)
        start += k
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()  # each response's last token
    outcome = _reverse_discounted_sum(last.to(rho.dtype) * outcome_adv.unsqueeze(-1), mask, gamma)
    return dense, outcome


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the batch's masked tokens (PRIME's final advantage normalisation)."""
    valid = values[mask.bool()]
    return (values - valid.mean()) / (valid.std(unbiased=False) + eps) * mask


def max_abs_scale(returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The released code's "batch_norm" of dense returns: divide by the batch's largest |return|."""
    return returns / (returns * mask).abs().max().clamp(min=1e-12)


class ImplicitPRMScorer:
    """A trained implicit PRM and its frozen reference: token, step and response scores for a batch.

    The batch is rlpost's packed layout ([left-padded prompt | right-padded response], response token t
    scored by the logits at column P - 1 + t); the log-probs are computed `chunk_size` positions at a
    time, so no [T, vocab] logits are held for a sequence. `beta` only scales the scores (rankings and
    thresholds on q scale with it)."""

    def __init__(self, prm: torch.nn.Module, reference: torch.nn.Module, beta: float = 0.05, chunk_size: int = 256):
        self.prm, self.reference = prm.eval(), reference.eval()
        self.beta, self.chunk_size = beta, chunk_size

    @torch.no_grad()
    def _logps(self, model: torch.nn.Module, input_ids, attention_mask, position_ids, prompt_width: int, width: int):
        device = next(model.parameters()).device
        hidden = model.get_decoder()(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     position_ids=position_ids.to(device)).last_hidden_state
        hidden = hidden[:, prompt_width - 1:prompt_width - 1 + width]
        targets = input_ids[:, prompt_width:prompt_width + width].to(device)
        head, out = model.get_output_embeddings(), []
        for start in range(0, width, self.chunk_size):
            logits = head(hidden[:, start:start + self.chunk_size]).float()
            out.append(torch.log_softmax(logits, -1).gather(-1, targets[:, start:start + self.chunk_size, None]).squeeze(-1))
        return torch.cat(out, 1).double().cpu()

    def score(self, input_ids, attention_mask, position_ids, response_mask, prompt_width: int,
              step_ends: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
        width = response_mask.shape[1]
        mask = response_mask.double()
        args = (input_ids, attention_mask, position_ids, prompt_width, width)
        rho = token_rewards(self._logps(self.prm, *args), self._logps(self.reference, *args), mask, self.beta)
        q = cumulative_values(rho, mask)
        ends = step_ends if step_ends is not None else [[int(mask[i].sum()) - 1] for i in range(len(mask))]
        values, rewards, step_mask = step_values(q, ends)
        return {"token_rewards": rho, "q": q, "outcome": q.gather(1, (mask.sum(-1).long() - 1).clamp(min=0)[:, None])[:, 0],
                "step_values": values, "step_rewards": rewards, "step_mask": step_mask,
                **response_scores(values, rewards, step_mask)}
