"""AlignDistil maths (ALGORITHMS.md §5): the teacher distribution synthesized from a DPO and a
reverse-DPO model, the per-token weights, and the weighted reverse-KL token loss. Pure tensors:
logits [..., V] in, per-position values [...] out; no models, no I/O.

Modes (as in the released code):
    aligndistil        w_t = gamma ||p_dpo - p_rev||_1 + 1e-3 (detached), z* = z_dpo + w_t (z_dpo - z_rev)
    theorem1           z* = w z_dpo + (1 - w) z_ref with a fixed w
    theorem1_adaptive  the same with the token-adaptive w_t
and in every mode the token loss is (beta / w) KL(pi_theta || softmax(z* / T_kd)): the temperature
applies to the teacher only (the released on-policy trainer also divided the student's logits).
"""
from __future__ import annotations

from typing import Literal

import torch

Mode = Literal["aligndistil", "theorem1", "theorem1_adaptive"]
W_FLOOR = 1e-3


def trim_vocab(*logits: torch.Tensor) -> list[torch.Tensor]:
    """Cut every [..., V_i] to the smallest V (checkpoints of one family may pad their embeddings)."""
    size = min(z.shape[-1] for z in logits)
    return [z[..., :size] for z in logits]


def adaptive_weight(z_dpo: torch.Tensor, z_rev: torch.Tensor, gamma: float) -> torch.Tensor:
    """w_t = gamma * ||softmax(z_dpo) - softmax(z_rev)||_1 + 1e-3, a constant (no gradient)."""
    with torch.no_grad():
        return gamma * (torch.softmax(z_dpo, -1) - torch.softmax(z_rev, -1)).abs().sum(-1) + W_FLOOR


def teacher_logits(z_dpo: torch.Tensor, z_rev: torch.Tensor, mode: Mode = "aligndistil", *, gamma: float = 10.0,
                   w: float = 0.1, z_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z*, w) per position: the teacher's logits and the weight w that sets the loss weight beta / w."""
    z_dpo, z_rev = z_dpo.detach(), z_rev.detach()
    if mode == "aligndistil":
        weight = adaptive_weight(z_dpo, z_rev, gamma)
        return z_dpo + weight.unsqueeze(-1) * (z_dpo - z_rev), weight
    if mode in ("theorem1", "theorem1_adaptive"):
        if z_ref is None:
            raise ValueError(f"mode {mode!r} needs the reference model's logits")
        weight = adaptive_weight(z_dpo, z_rev, gamma) if mode == "theorem1_adaptive" else torch.full_like(z_dpo[..., 0], w)
        return weight.unsqueeze(-1) * z_dpo + (1 - weight.unsqueeze(-1)) * z_ref.detach(), weight
    raise ValueError(f"unknown AlignDistil mode {mode!r}")


def reverse_kl(z_student: torch.Tensor, z_teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(pi_theta || softmax(z_teacher / T)) per position; the student at temperature 1."""
    logp = torch.log_softmax(z_student, -1)
    return (logp.exp() * (logp - torch.log_softmax(z_teacher / temperature, -1))).sum(-1)


def token_loss(z_student: torch.Tensor, z_dpo: torch.Tensor, z_rev: torch.Tensor, *, beta: float = 0.1,
               mode: Mode = "aligndistil", gamma: float = 10.0, w: float = 0.1, z_ref: torch.Tensor | None = None,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """((beta / w_t) * KL(pi_theta || pi*_t), w_t) per position."""
    z_star, weight = teacher_logits(z_dpo, z_rev, mode, gamma=gamma, w=w, z_ref=z_ref)
    return (beta / weight) * reverse_kl(z_student, z_star, temperature), weight
