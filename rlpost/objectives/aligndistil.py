"""AlignDistil as an objective (ALGORITHMS.md §5): token-level distillation of the student towards a
teacher synthesized, at every response state, from a DPO model and a reverse-DPO model (both frozen,
trained beforehand with `algorithm: dpo`, the second with `data.swap_pairs: true`).

States: on-policy (the student's own samples from the rollout source, at the sampling temperature;
the recipe uses 1) or off-policy (the preferred response of each preference pair, dataset source).
For every micro-batch the teachers' final hidden states are computed once without gradient; the
loss then runs inside the learner's chunked output head (the head hook): per chunk of positions the
student's logits, both teachers' logits from their hidden states, the teacher z*, the weighted
reverse KL. No [T, vocab] tensor of any of the three models exists for a whole sequence, and under
StreamBP the loss is exact like any other head loss.

Where it departs from the released code, and why:
- States s_1..s_T: the logits that score response token t, at position len(prompt) - 1 + t. Both
  released trainers score s_2..s_(T+1) (they skip the first response state and add the post-EOS one).
- The distillation temperature divides the teacher's logits only (the on-policy trainer also
  divided the student's; no difference at T = 1).
- Normalisation as the code's --reward_len_norm: token mean per sequence, then the mean over the
  step's sequences on all ranks (not per micro-batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlpost.algorithms import aligndistil as ad
from rlpost.batch import HeadFn, Packed, empty_pack, pack, pad_across_ranks, response_hidden, rows_decoder
from rlpost.config import Config, ConfigError
from rlpost.metrics import Mean, Stats
from rollout.types import Group, world


@dataclass
class DistilBatch:
    packed: Packed
    teacher_hidden: dict[str, torch.Tensor]  # name -> [n, T, d] final hidden states at the response states
    sequences_per_rank: float                # the step's sequences over all ranks / world size


class AlignDistil:
    def __init__(self, cfg: Config, frozen: dict[str, torch.nn.Module], pad_id: int, policy_weights=None):
        self.cfg = cfg.aligndistil
        self.teachers = frozen  # "dpo", "reverse" and, for the theorem-1 modes, "reference"
        self.pad_id, self.micro_batch_size = pad_id, cfg.train.micro_batch_size
        self._decoder = rows_decoder(cfg.train.shares_prompts)  # the teachers read rows as the learner does
        self._w: list[torch.Tensor] = []   # this step's w_t and teacher L1 at every response token
        self._l1: list[torch.Tensor] = []
        self._metrics: dict[str, float] = {}

    @classmethod
    def frozen_models(cls, cfg: Config) -> dict[str, str]:
        c = cfg.aligndistil
        if not c.dpo_model or not c.reverse_model:
            raise ConfigError("algorithm=aligndistil needs aligndistil.dpo_model and aligndistil.reverse_model "
                              "(train them with algorithm=dpo, the second with data.swap_pairs=true)")
        _same_tokenizer(cfg.model.name, {"aligndistil.dpo_model": c.dpo_model, "aligndistil.reverse_model": c.reverse_model})
        models = {"dpo": c.dpo_model, "reverse": c.reverse_model}
        if c.mode != "aligndistil":
            models["reference"] = c.reference or cfg.model.name
        return models

    def keep(self, group: Group) -> bool:
        return True

    def advantages(self, groups: list[Group]) -> None:
        return None  # a distillation target at every state, no advantage

    def micro_batches(self, groups: list[Group], advantages, version: int) -> list[DistilBatch]:
        if self.cfg.states == "off_policy":  # the preferred response of each pair
            samples = [s for g in groups for s in g.samples if s.correct]
        else:
            samples = [s for g in groups for s in g.samples]
        self._w, self._l1 = [], []
        parts = []
        for start in range(0, len(samples), self.micro_batch_size):
            packed = pack(samples[start:start + self.micro_batch_size], self.pad_id)
            with torch.no_grad():
                hidden = {name: response_hidden(model, packed.to(_device(model)), self._decoder).detach()
                          for name, model in self.teachers.items()}
            parts.append((packed, hidden))
        empty = (lambda: (empty_pack(self.pad_id), {n: torch.zeros(1, 1, m.config.hidden_size, device=_device(m))
                                                    for n, m in self.teachers.items()}))
        parts, total = pad_across_ranks(parts, float(len(samples)), empty)
        per_rank = max(total / world()[1], 1e-12)
        return [DistilBatch(packed, hidden, per_rank) for packed, hidden in parts]

    def head(self, mb: DistilBatch) -> HeadFn:
        c, teachers = self.cfg, self.teachers

        def distil(logits: torch.Tensor, targets: torch.Tensor, at) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                z = {name: teachers[name].get_output_embeddings()(h[at]).to(logits.dtype)
                     for name, h in mb.teacher_hidden.items()}
            names = list(z)
            trimmed = dict(zip(["student", *names], ad.trim_vocab(logits, *(z[n] for n in names))))
            z_star, w = ad.teacher_logits(trimmed["dpo"], trimmed["reverse"], c.mode, gamma=c.gamma, w=c.w,
                                          z_ref=trimmed.get("reference"), w_max=c.w_max)
            loss = (c.beta / w) * ad.reverse_kl(trimmed["student"], z_star, c.temperature)  # = ad.token_loss
            with torch.no_grad():
                kl_dpo = ad.reverse_kl(trimmed["student"], trimmed["dpo"])
                kl_rev = ad.reverse_kl(trimmed["student"], trimmed["reverse"])
                seen = ad.teacher_diagnostics(z_star, trimmed["dpo"], trimmed["reverse"], c.temperature)
            return {"loss": loss, "w": w, "kl_dpo": kl_dpo, "kl_reverse": kl_rev, **seen}
        return distil

    def loss(self, mb: DistilBatch, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        mask = mb.packed.response_mask.to(outputs["loss"].device, outputs["loss"].dtype)
        lengths = mask.sum(-1)
        per_sequence = (outputs["loss"] * mask).sum(-1) / lengths.clamp(min=1)
        loss = per_sequence.sum() / mb.sequences_per_rank
        with torch.no_grad():
            tokens = float(mask.sum())
            w = outputs["w"][mask.bool()].detach().float().cpu()
            self._w.append(w)
            self._l1.append(outputs["l1"][mask.bool()].detach().float().cpu())
            stats: Stats = {
                "loss": float(loss),
                "distil/w_mean": Mean(float(w.sum()), tokens),
                "distil/token_weight_mean": Mean(float((self.cfg.beta / w).sum()), tokens),
                "distil/kl_dpo": Mean(float((outputs["kl_dpo"] * mask).sum()), tokens),
                "distil/kl_reverse": Mean(float((outputs["kl_reverse"] * mask).sum()), tokens),
                **{f"distil/{k}": Mean(float((outputs[k] * mask).sum()), tokens)
                   for k in ("teacher_entropy", "p_dpo_of_teacher_top", "teacher_top_in_dpo_top5")},
            }
        return loss, stats

    def metrics(self) -> dict[str, float]:
        if not self._w or not sum(len(w) for w in self._w):
            return {}
        out = {}
        for name, values in (("w", self._w), ("l1", self._l1)):
            v = torch.cat(values).double()
            out |= {f"distil/{name}_q{int(q * 100)}": float(torch.quantile(v, q)) for q in (0.1, 0.5, 0.9)}
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _same_tokenizer(student: str, teachers: dict[str, str]) -> None:
    """The three models must share one tokenizer: the teachers score the student's token ids."""
    from rollout.models import load_tokenizer
    vocab = load_tokenizer(student).get_vocab()
    for key, spec in teachers.items():
        if load_tokenizer(spec).get_vocab() != vocab:
            raise ConfigError(f"{key}: {spec!r} has another tokenizer than model.name {student!r}; AlignDistil's "
                              "teachers must share the student's tokenizer")
