"""Pack samples into padded tensors, and score response tokens with a chunked log-prob head.

Layout of a packed micro-batch: [left-padded prompt | right-padded response], so that every row's
response starts at column P. The logits that score response token t live at column P - 1 + t.
"""
from __future__ import annotations

import functools
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


PACKED_MAX_TOKENS = 512  # share_prompts packs a micro-batch into one row up to this many real tokens
# (its attention is over the whole row: [L, L] per head and layer, kept for backward on CPU)


def hf_decoder(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, prompt_width: int = 0, share_prompts: bool = False) -> torch.Tensor:
    """The model's own decoder forward (autograd, or HF gradient checkpointing when enabled).

    share_prompts: rows that repeat a prompt (a GRPO group's samples, a preference pair's two answers)
    decode it once (the prompt is the first `prompt_width` columns). A micro-batch of at most
    PACKED_MAX_TOKENS real tokens becomes one row without padding: each distinct prompt, then every
    response, with a mask that lets a token see its own prompt and its own response's earlier tokens
    (`_tree_packed`); a bigger one runs its distinct prompts alone with a KV cache, copies the cache out
    to their rows and runs the responses on it. Either way the whole-row forward's arithmetic (a prompt
    position never sees a response; every response position attends to the same keys and values),
    rounded differently (other matmul shapes); a repeated prompt's gradient is the sum over its rows, as
    in the whole-row backward. Only for plain autograd: HF turns the cache off under gradient
    checkpointing."""
    decoder = model.get_decoder()
    P = prompt_width
    if share_prompts and 0 < P < input_ids.shape[1]:
        # the mask too: a pad id may be a real token
        first, rows = distinct_rows(torch.cat([input_ids[:, :P], attention_mask[:, :P]], 1))
        real = int(attention_mask[first, :P].sum() + attention_mask[:, P:].sum())
        if real <= PACKED_MAX_TOKENS and model.config._attn_implementation in ("sdpa", "eager"):
            return _tree_packed(decoder, input_ids, attention_mask, position_ids, P, first, rows,
                                next(model.parameters()).dtype)
        if len(first) < len(rows):
            prompt = decoder(input_ids=input_ids[first, :P], attention_mask=attention_mask[first, :P],
                             position_ids=position_ids[first, :P], use_cache=True)
            cache = prompt.past_key_values
            cache.batch_select_indices(rows)  # each row's copy of its prompt's keys and values (autograd sums back)
            rest = decoder(input_ids=input_ids[:, P:], attention_mask=attention_mask, position_ids=position_ids[:, P:],
                           past_key_values=cache, use_cache=True)
            return torch.cat([prompt.last_hidden_state[rows], rest.last_hidden_state], 1)
    return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state


def rows_decoder(share_prompts: bool) -> Decoder:
    """hf_decoder laid out as the learner lays out its rows (TrainConfig.shares_prompts): frozen models
    that score what the learner scores (a reference, teachers, APO's snapshots) use it, so that equal
    weights give bit-equal log-probs (an implicit reward of exactly 0 at the start, ratios of exactly 1)."""
    return functools.partial(hf_decoder, share_prompts=share_prompts)


def _tree_packed(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, P: int, first: torch.Tensor, rows: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """The micro-batch as one row: the distinct prompts' real tokens, then every row's real response
    tokens; query a sees key b where both belong to one prompt, b is not later (position ids), and b is
    a prompt token or a token of a's own response. Hidden states come back in the [N, W] layout
    (zeros at padding, which nothing reads)."""
    device, (N, W) = input_ids.device, input_ids.shape
    real = attention_mask.bool()
    prompt_cols, response_cols = real[first, :P], real[:, P:]
    # per packed token: where it comes from (row, column), its prompt, and its response row (-1: prompt)
    row_ids = torch.arange(N, device=device)[:, None].expand(-1, W - P)[response_cols]
    src_row = torch.cat([first[:, None].expand(-1, P)[prompt_cols], row_ids])
    src_col = torch.cat([torch.arange(P, device=device).expand(len(first), -1)[prompt_cols],
                         torch.arange(P, W, device=device).expand(N, -1)[response_cols]])
    prompt_of = torch.cat([torch.arange(len(first), device=device)[:, None].expand(-1, P)[prompt_cols],
                           rows[:, None].expand(-1, W - P)[response_cols]])
    prompt_tokens = int(prompt_cols.sum())  # packed positions [0, prompt_tokens) hold the prompts
    response_of = torch.cat([torch.full((prompt_tokens,), -1, device=device), row_ids])
    positions = position_ids[src_row, src_col]
    sees = ((prompt_of[:, None] == prompt_of[None, :]) & (positions[None, :] <= positions[:, None])
            & ((response_of[None, :] == -1) | (response_of[None, :] == response_of[:, None])))
    mask = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill(~sees, torch.finfo(dtype).min)
    hidden = decoder(input_ids=input_ids[src_row, src_col][None], attention_mask=mask[None, None],
                     position_ids=positions[None]).last_hidden_state[0]
    # back to [N, W]: a row's prompt columns read its prompt's tokens, its response columns its own
    index = torch.full((N, W), len(src_row), dtype=torch.long, device=device)
    packed_at = torch.arange(len(src_row), device=device)
    prompt_index = torch.full((len(first), P), len(src_row), dtype=torch.long, device=device)
    prompt_index[prompt_cols] = packed_at[:prompt_tokens]
    index[:, :P] = prompt_index[rows]
    index[:, P:][response_cols] = packed_at[prompt_tokens:]
    return torch.cat([hidden, hidden.new_zeros(1, hidden.shape[-1])])[index]


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


# The head hook: what a loss computes from the output head, one chunk of response positions at a time.
# (logits [n, V] in >= fp32, target token ids [n], `at` = the chunk's (rows, columns) in the [N, T]
# response layout) -> named per-position tensors [n]. Only real response tokens are scored (never
# padding). A loss over the whole vocabulary (a KL to a teacher's distribution, say) is a HeadFn that
# returns its per-position value: only one chunk's [n, V] ever exists. Side inputs per position (a
# teacher's hidden states [N, T, d]) are indexed by `at` from the micro-batch the HeadFn closes over.
HeadFn = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]


def logprob_head(temperature: float = 1.0) -> HeadFn:
    """log pi(y_t | s_t) at the sampling temperature ("logp"), and the detached entropy ("entropy")."""
    def head(logits: torch.Tensor, targets: torch.Tensor, at) -> dict[str, torch.Tensor]:
        logp_all = torch.log_softmax(logits / temperature, dim=-1)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():  # nothing of it kept for backward
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return {"logp": logp, "entropy": entropy}
    return head


def _head_chunk(lm_head: torch.nn.Module, head: HeadFn, hidden: torch.Tensor, targets: torch.Tensor,
                at) -> dict[str, torch.Tensor]:
    logits = lm_head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    return head(logits, targets, at)


def head_outputs(model: torch.nn.Module, batch: Packed, head: HeadFn, chunk_size: int = 512,
                 decoder: Decoder = hf_decoder) -> dict[str, torch.Tensor]:
    """Run `head` over the real response positions, `chunk_size` at a time, and return its outputs
    laid out [N, T] (zeros at padding).

    A micro-batch of more than one chunk runs the vocabulary head under activation checkpointing, so
    a long response never holds its [T, vocab] logits (only the hidden states are kept for backward,
    each chunk's logits are recomputed there). A micro-batch of one chunk keeps that chunk's
    log-probs for backward instead: the recompute would create the same tensor again at backward, so
    the peak is about the same and one head forward is saved. Every backward mode goes through
    here; `decoder` picks how the hidden states are computed (autograd, HF checkpointing, StreamBP).
    """
    P, T = batch.prompt_width, batch.response_mask.shape[1]
    hidden = response_hidden(model, batch, decoder)
    rows, cols = batch.response_mask.nonzero(as_tuple=True)
    if len(rows) == 0:  # an empty micro-batch (pad_across_ranks) still runs the head: a collective under ZeRO-3
        rows, cols = rows.new_zeros(1), cols.new_zeros(1)
    h, y = hidden[rows, cols], batch.input_ids[:, P:P + T][rows, cols]
    lm_head = model.get_output_embeddings()
    recompute = torch.is_grad_enabled() and len(rows) > chunk_size
    chunks = []
    for start in range(0, len(rows), chunk_size):
        part = slice(start, start + chunk_size)
        args = (lm_head, head, h[part], y[part], (rows[part], cols[part]))
        chunks.append(checkpoint(_head_chunk, *args, use_reentrant=False) if recompute else _head_chunk(*args))
    real = batch.response_mask[rows, cols].bool()  # all true, but the empty micro-batch's stand-in
    out = {}
    for key in chunks[0]:
        flat = torch.cat([c[key] for c in chunks])
        flat = torch.where(real, flat, torch.zeros_like(flat))
        out[key] = flat.new_zeros(len(batch.response_mask), T).index_put((rows, cols), flat)
    return out


def token_logprobs(model: torch.nn.Module, batch: Packed, temperature: float = 1.0, chunk_size: int = 512,
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
