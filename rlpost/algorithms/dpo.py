"""DPO loss (Rafailov et al.), the sequence-level objective of the preference methods. Pure tensors.

With c = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)) per pair, the loss is
-log sigmoid(beta c), averaged over pairs; dL/dc = -beta (1 - sigmoid(beta c)) / B. It is not a sum
over tokens, which is why StreamBP must see whole sequences before any token's gradient is known.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per sequence: the masked sum of per-token log-probs, [N, T] -> [N]."""
    return (token_logps * mask).sum(-1)


def preference_margin(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor) -> torch.Tensor:
    """c = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)), one per pair."""
    return (chosen - rejected) - (ref_chosen - ref_rejected)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(beta c); inputs are sequence log-probs [B]."""
    return -F.logsigmoid(beta * preference_margin(chosen, rejected, ref_chosen, ref_rejected)).mean()


def extrapolated_reference(logp_latest: torch.Tensor, logp_previous: torch.Tensor | None,
                           alpha: float) -> torch.Tensor:
    """APO's reference (ALGORITHMS.md §4.3) as sequence log-probs: (1 + alpha) log pi_t(y) - alpha
    log pi_(t-1)(y). The normaliser log Z(x) of the extrapolated policy depends on the prompt only and
    cancels in the DPO margin, so it is left out. Round 1 (no previous policy) and alpha = 0 (iterative
    DPO) give log pi_t itself. Extrapolating log-probs, not logits, is what keeps that cancellation."""
    if logp_previous is None or alpha == 0:
        return logp_latest
    return (1.0 + alpha) * logp_latest - alpha * logp_previous


def implicit_rewards(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """beta (log pi(y) - log pi_ref(y)) for the chosen and the rejected member of each pair: TRL's
    `rewards/chosen` and `rewards/rejected`."""
    return beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
