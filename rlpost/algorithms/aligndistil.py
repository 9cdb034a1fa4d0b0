"""AlignDistil maths (ALGORITHMS.md §5): the teacher distribution synthesized from a DPO and a
reverse-DPO model, the per-token weights, and the weighted reverse-KL token loss. Pure tensors:
logits [..., V] in, per-position values [...] out; no models, no I/O.

Modes (as in the released code):
    aligndistil        w_t = gamma ||p_dpo - p_rev||_1 + 1e-3 (detached), z* = z_dpo + w_t (z_dpo - z_rev)
    theorem1           z* = w z_dpo + (1 - w) z_ref with a fixed w
    theorem1_adaptive  the same with the token-adaptive w_t
and in every mode the token loss is (beta / w) KL(pi_theta || softmax(z* / T_kd)): the temperature
applies to the teacher only (the released on-policy trainer also divided the student's logits).
An optional cap w_max bounds the adaptive w_t (not in the paper: where the two teachers disagree
almost completely, w_t ~ gamma * 2 extrapolates far past either of them).
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


def teacher_l1(z_dpo: torch.Tensor, z_rev: torch.Tensor) -> torch.Tensor:
    """||softmax(z_dpo) - softmax(z_rev)||_1 per position, in [0, 2]: how far the two teachers disagree."""
    with torch.no_grad():
        return (torch.softmax(z_dpo, -1) - torch.softmax(z_rev, -1)).abs().sum(-1)


def adaptive_weight(z_dpo: torch.Tensor, z_rev: torch.Tensor, gamma: float, w_max: float | None = None) -> torch.Tensor:
    """w_t = gamma * ||softmax(z_dpo) - softmax(z_rev)||_1 + 1e-3 (at most w_max), a constant (no gradient)."""
    weight = gamma * teacher_l1(z_dpo, z_rev) + W_FLOOR
    return weight if w_max is None else weight.clamp(max=w_max)


def teacher_logits(z_dpo: torch.Tensor, z_rev: torch.Tensor, mode: Mode = "aligndistil", *, gamma: float = 10.0,
                   w: float = 0.1, z_ref: torch.Tensor | None = None,
                   w_max: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z*, w) per position: the teacher's logits and the weight w that sets the loss weight beta / w."""
    z_dpo, z_rev = z_dpo.detach(), z_rev.detach()
    if mode == "aligndistil":
        weight = adaptive_weight(z_dpo, z_rev, gamma, w_max)
        return z_dpo + weight.unsqueeze(-1) * (z_dpo - z_rev), weight
    if mode in ("theorem1", "theorem1_adaptive"):
        if z_ref is None:
            raise ValueError(f"mode {mode!r} needs the reference model's logits")
        weight = adaptive_weight(z_dpo, z_rev, gamma, w_max) if mode == "theorem1_adaptive" else torch.full_like(z_dpo[..., 0], w)
        return weight.unsqueeze(-1) * z_dpo + (1 - weight.unsqueeze(-1)) * z_ref.detach(), weight
    raise ValueError(f"unknown AlignDistil mode {mode!r}")


def reverse_kl(z_student: torch.Tensor, z_teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(pi_theta || softmax(z_teacher / T)) per position; the student at temperature 1."""
    logp = torch.log_softmax(z_student, -1)
    return (logp.exp() * (logp - torch.log_softmax(z_teacher / temperature, -1))).sum(-1)


def token_loss(z_student: torch.Tensor, z_dpo: torch.Tensor, z_rev: torch.Tensor, *, beta: float = 0.1,
               mode: Mode = "aligndistil", gamma: float = 10.0, w: float = 0.1, z_ref: torch.Tensor | None = None,
               temperature: float = 1.0, w_max: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """((beta / w_t) * KL(pi_theta || pi*_t), w_t) per position."""
    z_star, weight = teacher_logits(z_dpo, z_rev, mode, gamma=gamma, w=w, z_ref=z_ref, w_max=w_max)
    return (beta / weight) * reverse_kl(z_student, z_star, temperature), weight


def teacher_diagnostics(z_star: torch.Tensor, z_dpo: torch.Tensor, z_rev: torch.Tensor,
                        temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Per position, what explains a teacher: its entropy (of softmax(z* / T)), the DPO model's
    probability of the teacher's top token, whether that token is among the DPO model's top 5, and
    the teachers' L1 disagreement. A teacher whose top token the DPO model finds unlikely is
    extrapolating beyond both of its models."""
    with torch.no_grad():
        logp = torch.log_softmax(z_star / temperature, -1)
        top = z_star.argmax(-1, keepdim=True)
        p_dpo = torch.softmax(z_dpo, -1)
        top5 = z_dpo.topk(min(5, z_dpo.shape[-1]), -1).indices
        return {"teacher_entropy": -(logp.exp() * logp).sum(-1), "p_dpo_of_teacher_top": p_dpo.gather(-1, top).squeeze(-1),
                "teacher_top_in_dpo_top5": (top5 == top).any(-1).to(z_star.dtype), "l1": teacher_l1(z_dpo, z_rev)}
