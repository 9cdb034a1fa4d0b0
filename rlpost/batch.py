"""Pack samples into padded tensors, and score response tokens with a chunked log-prob head.

Layout of a packed micro-batch: [left-padded prompt | right-padded response], so that every row's
response starts at column P. The logits that score response token t live at column P - 1 + t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from rollout.types import FinishReason, Sample, distinct_rows, world


@dataclass
class Packed:
    input_ids: torch.Tensor       # [N, P + T]
    attention_mask: torch.Tensor  # [N, P + T]
    position_ids: torch.Tensor    # [N, P + T], counting from each row's first real token
    response_mask: torch.Tensor   # [N, T] float, 1 on response tokens
    prompt_width: int             # P

    def to(self, device) -> "Packed":
        return Packed(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                      self.response_mask.to(device), self.prompt_width)


def pack(samples: list[Sample], pad_id: int) -> Packed:
    P = max(len(s.prompt_ids) for s in samples)
    T = max(max(len(s.response_ids) for s in samples), 1)
    input_ids = torch.full((len(samples), P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros(len(samples), T)
    for row, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        input_ids[row, P - p:P] = torch.tensor(s.prompt_ids)
        input_ids[row, P:P + r] = torch.tensor(s.response_ids, dtype=torch.long)
        attention_mask[row, P - p:P + r] = 1
        response_mask[row, :r] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return Packed(input_ids, attention_mask, position_ids, response_mask, P)


def pair_rows(pairs: list[tuple[Sample, Sample]], per_batch: int) -> list[list[Sample]]:
    """Preference pairs in micro-batches of `per_batch` pairs, each laid out as its chosen members
    then their rejected ones (row i and row k + i are one pair)."""
    return [[c for c, _ in pairs[i:i + per_batch]] + [r for _, r in pairs[i:i + per_batch]]
            for i in range(0, len(pairs), per_batch)]


def padded(rows: list[list[float]], width: int) -> torch.Tensor:
    """Right-pad ragged per-token lists (e.g. behaviour log-probs) to [N, width] with zeros."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row[:width])
    return out


# (model, input_ids, attention_mask, position_ids, prompt_width=P) -> final hidden states [N, L, d].
# prompt_width is the packed layout's P (a decoder may use it to decode each distinct prompt once).
Decoder = Callable[..., torch.Tensor]


def hf_decoder(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, prompt_width: int = 0, share_prompts: bool = False) -> torch.Tensor:
    """The model's own decoder forward (autograd, or HF gradient checkpointing when enabled).

    share_prompts: rows that repeat a prompt (a GRPO group's samples, a preference pair's two answers)
    decode it once: the distinct prompts (first `prompt_width` columns) run alone with a KV cache, the
    cache is copied out to their rows, and the responses run on it. The same arithmetic as the
    whole-row forward (causal attention: a prompt position never sees a response; every response
    position attends to the same keys and values), rounded differently (other matmul shapes); a
    repeated prompt's gradient is the sum over its rows, as in the whole-row backward. Only for plain
    autograd: HF turns the cache off under gradient checkpointing."""
    decoder = model.get_decoder()
    P = prompt_width
    if share_prompts and 0 < P < input_ids.shape[1]:
        # the mask too: a pad id may be a real token
        first, rows = distinct_rows(torch.cat([input_ids[:, :P], attention_mask[:, :P]], 1))
        if len(first) < len(rows):
            prompt = decoder(input_ids=input_ids[first, :P], attention_mask=attention_mask[first, :P],
                             position_ids=position_ids[first, :P], use_cache=True)
            cache = prompt.past_key_values
            cache.batch_select_indices(rows)  # each row's copy of its prompt's keys and values (autograd sums back)
            rest = decoder(input_ids=input_ids[:, P:], attention_mask=attention_mask, position_ids=position_ids[:, P:],
                           past_key_values=cache, use_cache=True)
            return torch.cat([prompt.last_hidden_state[rows], rest.last_hidden_state], 1)
    return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state


def response_hidden(model: torch.nn.Module, batch: Packed, decoder: Decoder = hf_decoder) -> torch.Tensor:
    """Final hidden states at the positions that score the response tokens, [N, T, d]."""
    P, T = batch.prompt_width, batch.response_mask.shape[1]
    hidden = decoder(model, batch.input_ids, batch.attention_mask, batch.position_ids, prompt_width=P)
    return hidden[:, P - 1:P - 1 + T]


def sequence_scores(model: torch.nn.Module, batch: Packed, decoder: Decoder = hf_decoder) -> torch.Tensor:
    """A reward model's score of each row, [N]: its score head on the final hidden state of the row's
    last token that is not padding (the rightmost, as transformers' sequence classifiers pool)."""
    hidden = decoder(model, batch.input_ids, batch.attention_mask, batch.position_ids, prompt_width=batch.prompt_width)
    real = (batch.input_ids != model.config.pad_token_id).int()
    last = (torch.arange(real.shape[1], device=real.device, dtype=torch.int32) * real).argmax(-1)
    return model.score(hidden[torch.arange(len(last), device=hidden.device), last]).squeeze(-1)


# The head hook: what a loss computes from the output head, one chunk of positions at a time.
# (logits [N, c, V] in >= fp32, target token ids [N, c], the chunk's response columns) -> named
# per-position tensors [N, c]. A loss over the whole vocabulary (a KL to a teacher's distribution, say)
# is a HeadFn that returns its per-position value: only one chunk's [N, c, V] ever exists, and it
# is recomputed in backward. Side inputs per position (a teacher's hidden states) are sliced by
# `cols` from the micro-batch the HeadFn closes over.
HeadFn = Callable[[torch.Tensor, torch.Tensor, slice], dict[str, torch.Tensor]]


def logprob_head(temperature: float = 1.0) -> HeadFn:
    """log pi(y_t | s_t) at the sampling temperature ("logp"), and the detached entropy ("entropy")."""
    def head(logits: torch.Tensor, targets: torch.Tensor, cols: slice) -> dict[str, torch.Tensor]:
        logp_all = torch.log_softmax(logits / temperature, dim=-1)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return {"logp": logp, "entropy": entropy.detach()}
    return head


def _head_chunk(lm_head: torch.nn.Module, head: HeadFn, hidden: torch.Tensor, targets: torch.Tensor,
                cols: slice) -> dict[str, torch.Tensor]:
    logits = lm_head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    return head(logits, targets, cols)


def head_outputs(model: torch.nn.Module, batch: Packed, head: HeadFn, chunk_size: int = 256,
                 decoder: Decoder = hf_decoder) -> dict[str, torch.Tensor]:
    """Run `head` over the response positions, `chunk_size` at a time, and concatenate its [N, T] outputs.

    The vocabulary head runs on chunks of positions under activation checkpointing, so a long
    response never holds its full [T, vocab] logits; only the hidden states are kept for backward.
    Every backward mode goes through here; `decoder` picks how the hidden states are computed
    (autograd, HF checkpointing, StreamBP).
    """
    P, T = batch.prompt_width, batch.response_mask.shape[1]
    hidden = response_hidden(model, batch, decoder)
    targets = batch.input_ids[:, P:P + T]
    lm_head = model.get_output_embeddings()
    chunks = []
    for start in range(0, T, chunk_size):
        h, y = hidden[:, start:start + chunk_size], targets[:, start:start + chunk_size]
        cols = slice(start, start + h.shape[1])
        if torch.is_grad_enabled():
            chunks.append(checkpoint(_head_chunk, lm_head, head, h, y, cols, use_reentrant=False))
        else:
            chunks.append(_head_chunk(lm_head, head, h, y, cols))
    return {key: torch.cat([c[key] for c in chunks], 1) for key in chunks[0]}


def token_logprobs(model: torch.nn.Module, batch: Packed, temperature: float = 1.0, chunk_size: int = 256,
                   decoder: Decoder = hf_decoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi(y_t | s_t) of the responses, [N, T] (logits divided by the sampling
    temperature, as at generation time), and the per-token entropy (detached)."""
    out = head_outputs(model, batch, logprob_head(temperature), chunk_size, decoder)
    return out["logp"], out["entropy"]


@torch.no_grad()
def head_gradient_norms(model: torch.nn.Module, batch: Packed, temperature: float = 1.0) -> list[float]:
    """Per response, ||d log pi(y|x) / d W_head||_F, the gradient norm w.r.t. the output-embedding
    matrix (the token embeddings when they are tied, as in the CurES reference code).

    d/dW sum_t log softmax(W h_t / T)[y_t] = sum_t (e_{y_t} - p_t) h_t^T / T, so its squared norm is
    sum_{t,t'} <e_t - p_t, e_t' - p_t'> <h_t, h_t'> / T^2: two [T, T] Gram matrices, no [V, d] gradient.
    """
    P = batch.prompt_width
    hidden = response_hidden(model, batch)
    lm_head = model.get_output_embeddings()
    norms = []
    for row in range(hidden.shape[0]):
        n = int(batch.response_mask[row].sum())
        h = hidden[row, :n]
        logits = lm_head(h)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        h = h.to(dtype)
        residual = -torch.softmax(logits.to(dtype) / temperature, dim=-1)
        residual[torch.arange(n), batch.input_ids[row, P:P + n]] += 1.0
        squared = ((residual @ residual.T) * (h @ h.T)).sum() / temperature ** 2
        norms.append(float(squared.clamp(min=0).sqrt()))
    return norms


def pad_across_ranks(parts: list, local_total: float, empty: Callable[[], object]) -> tuple[list, float]:
    """The step's `local_total` summed over ranks (a loss normaliser that must be known before any
    backward), and `parts` padded with `empty()` micro-batches to the busiest rank's count: every rank
    must run as many backward passes, each is a collective under ZeRO."""
    if world()[1] == 1:
        return parts, local_total
    total, most = torch.tensor([local_total], dtype=torch.float64), torch.tensor([len(parts)])
    torch.distributed.all_reduce(total)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return parts + [empty() for _ in range(int(most) - len(parts))], float(total)


def empty_pack(pad_id: int, rows: int = 1) -> Packed:
    """A micro-batch of one-token rows with an all-zero response mask: it contributes nothing."""
    packed = pack([Sample([pad_id], [pad_id], [0.0], FinishReason.STOP)] * rows, pad_id)
    packed.response_mask.zero_()
    return packed
