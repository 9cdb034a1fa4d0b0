"""StreamBP (ALGORITHMS.md §7): exact backprop through the decoder, streamed along the sequence.

The forward keeps only each layer's input hidden states. The backward walks the layers in reverse;
for each layer it recomputes the output one chunk of rows [a, e) at a time (causality: only keys
and values of rows [0, e) are needed) and back-propagates that chunk's share of the output
gradient. So at any moment one chunk's activations are alive, never a [T, T] mask or the full
activations of a layer. The vocabulary head is chunked separately (rlpost/batch.py). Unlike the
reference, which re-projects keys/values of the prefix for every chunk, a layer's keys/values
are projected once per backward and kept while that layer is processed (see _layer_backward).

Because the streaming happens inside one autograd Function, the objective can be anything built
on the returned hidden states: token-level (GRPO) or sequence-level (DPO) losses get the exact
gradient without special cases, and DeepSpeed sees one ordinary backward per micro-batch. Each
parameter receives its gradient once per micro-batch (earlier chunks are summed locally, the
last chunk delivers the sum), so ZeRO's per-parameter reduction hooks fire once, as with autograd.

Supported: decoder layers of the llama / mistral / qwen2 / qwen3 families as transformers ships
them (pre-norm attention with rotary embeddings and a gated MLP), no attention dropout, no
sliding window shorter than the sequence.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model: torch.nn.Module, seq_len: int | None = None) -> None:
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"StreamBP supports model types {', '.join(SUPPORTED_MODEL_TYPES)}, not {cfg.model_type!r}")
    if getattr(cfg, "attention_dropout", 0.0):
        raise ValueError("StreamBP needs attention_dropout = 0 (dropout would have to be replayed per chunk)")
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window is not None and seq_len is not None and seq_len > window:
        raise ValueError(f"StreamBP does not implement sliding-window attention (window {window} < {seq_len} tokens)")


def chunk_bounds(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """Row ranges [a, e) of the chunks; the last one may be shorter."""
    return [(a, min(a + chunk_size, length)) for a in range(0, length, chunk_size)]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def layer_keys_values(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The layer's normed input [N, L, d] and rotated keys / values [N, kv_heads, L, head_dim]."""
    attn = layer.self_attn
    n, length, _ = x.shape
    normed = layer.input_layernorm(x)
    k = attn.k_proj(normed).view(n, length, -1, attn.head_dim)
    if hasattr(attn, "k_norm"):  # qwen3 normalises each head before the rotation
        k = attn.k_norm(k)
    v = attn.v_proj(normed).view(n, length, -1, attn.head_dim).transpose(1, 2)
    return normed, _rotate(k.transpose(1, 2), cos[:, :length], sin[:, :length]), v


def layer_rows(layer: torch.nn.Module, x_rows: torch.Tensor, normed_rows: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
               key_mask: torch.Tensor) -> torch.Tensor:
    """Output rows [start, e) of one decoder layer from its input rows and normed rows [start, e) and
    the keys / values of positions [0, e). A row attends to earlier non-padding positions and to
    itself (so that padding rows stay finite; no real row ever looks at them)."""
    attn = layer.self_attn
    n, rows, _ = x_rows.shape
    end = start + rows
    q = attn.q_proj(normed_rows).view(n, rows, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    q = _rotate(q.transpose(1, 2), cos[:, start:end], sin[:, start:end])
    row_pos = torch.arange(start, end, device=x_rows.device).unsqueeze(1)
    col_pos = torch.arange(end, device=x_rows.device).unsqueeze(0)
    allowed = ((col_pos <= row_pos).unsqueeze(0) & key_mask[:, None, :end]) | (col_pos == row_pos).unsqueeze(0)
    out = F.scaled_dot_product_attention(q, k[:, :, :end], v[:, :, :end], attn_mask=allowed.unsqueeze(1),
                                         scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1])
    h = x_rows + attn.o_proj(out.transpose(1, 2).reshape(n, rows, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class _StreamedLayers(torch.autograd.Function):
    """hidden [N, T, d] -> output of the last decoder layer, with the chunked forward and backward."""

    @staticmethod
    def forward(ctx, hidden, layers, cos, sin, key_mask, chunk_size):
        bounds = chunk_bounds(hidden.shape[1], chunk_size)
        layer_inputs = []
        x = hidden.detach()
        for layer in layers:
            layer_inputs.append(x)
            normed, k, v = layer_keys_values(layer, x, cos, sin)
            x = torch.cat([layer_rows(layer, x[:, a:e], normed[:, a:e], k, v, a, cos, sin, key_mask)
                           for a, e in bounds], dim=1)
        ctx.layers, ctx.layer_inputs, ctx.bounds = layers, layer_inputs, bounds
        ctx.save_for_backward(cos, sin, key_mask)
        return x

    @staticmethod
    def backward(ctx, grad_output):
        cos, sin, key_mask = ctx.saved_tensors
        d_out = grad_output
        for index in reversed(range(len(ctx.layers))):
            layer, x = ctx.layers[index], ctx.layer_inputs[index]
            ctx.layer_inputs[index] = None  # free each stored input as soon as its layer is done
            d_out = _layer_backward(layer, x, d_out, ctx.bounds, cos, sin, key_mask)
        return d_out, None, None, None, None, None


def _layer_backward(layer, x, d_out, bounds, cos, sin, key_mask) -> torch.Tensor:
    """Accumulate the layer's parameter gradients and return d loss / d x.

    Keys and values of the whole layer are computed once with their graph (O(T d), this layer only)
    rather than re-projected for every chunk's prefix, which the reference does: the same gradients
    without the (D + 1) / 2 extra key/value projections. The rest of the layer (queries, attention,
    MLP) is recomputed and back-propagated one chunk of rows at a time; the gradients of the keys,
    values and normed input are summed over chunks, then sent through their projections once."""
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_()
        normed, k, v = layer_keys_values(layer, x_leaf, cos, sin)
    leaves = [t.detach().requires_grad_() for t in (normed, k, v)]
    d_leaves = [torch.zeros_like(t) for t in leaves]
    d_x = torch.zeros_like(x)
    row_params = [p for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.post_attention_layernorm,
                              layer.mlp, getattr(layer.self_attn, "q_norm", None)) if m is not None
                  for p in m.parameters() if p.requires_grad]
    partial: list[torch.Tensor | None] = [None] * len(row_params)  # sums over chunks but the last, >= fp32
    for i, (a, e) in enumerate(bounds):
        with torch.enable_grad():
            x_rows = x[:, a:e].detach().requires_grad_()
            normed_rows, k_prefix, v_prefix = leaves[0][:, a:e], leaves[1][:, :, :e], leaves[2][:, :, :e]
            inputs = [x_rows, *leaves]
            if i < len(bounds) - 1:
                y = layer_rows(layer, x_rows, normed_rows, k_prefix, v_prefix, a, cos, sin, key_mask)
                grads = torch.autograd.grad(y, inputs + row_params, d_out[:, a:e], allow_unused=True)
                for j, g in enumerate(grads[len(inputs):]):
                    if g is not None:
                        partial[j] = (g.to(torch.promote_types(g.dtype, torch.float32)) if partial[j] is None
                                      else partial[j].add_(g))
            else:
                # Last chunk: one real backward delivers this chunk's gradient plus the earlier chunks'
                # sums (d/dp of <p, G> is G), so each parameter's gradient hook fires exactly once.
                with _carry(layer, dict(zip(row_params, partial))) as carried:
                    y = layer_rows(layer, x_rows, normed_rows, k_prefix, v_prefix, a, cos, sin, key_mask)
                outputs = [y] + ([torch.stack(carried).sum()] if carried else [])
                ones = [torch.ones((), dtype=y.dtype, device=y.device)] if carried else []
                torch.autograd.backward(outputs, [d_out[:, a:e]] + ones, inputs=inputs + row_params)
                grads = [t.grad for t in inputs]
        d_x[:, a:e] += grads[0]
        for d, g in zip(d_leaves, grads[1:4]):
            if g is not None:
                d += g
    # Keys, values and the normed input: one backward through the projections and the input norm.
    row_ids = {id(p) for p in row_params}
    kv_params = [p for p in layer.parameters() if p.requires_grad and id(p) not in row_ids]
    torch.autograd.backward([normed, k, v], d_leaves, inputs=[x_leaf, *kv_params])
    return d_x + x_leaf.grad


@contextlib.contextmanager
def _carry(layer: torch.nn.Module, partial: dict[torch.nn.Parameter, torch.Tensor | None]):
    """Collect the terms <p, G_p> while the layer's forward runs. They are formed inside each
    submodule's forward, where ZeRO-3 has the parameter gathered (autograd records its full shape)."""
    carried: list[torch.Tensor] = []

    def hook(module, args):
        for p in module.parameters(recurse=False):
            if partial.get(p) is not None:
                carried.append((p * partial[p].to(p.dtype)).sum())

    handles = [m.register_forward_pre_hook(hook) for m in layer.modules()
               if any(True for _ in m.parameters(recurse=False))]
    try:
        yield carried
    finally:
        for h in handles:
            h.remove()


def streamed_decoder(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, chunk_size: int, prompt_width: int = 0) -> torch.Tensor:
    """Final (normed) hidden states [N, T, d] of the decoder, computed with StreamBP. Under ZeRO-3
    each submodule gathers its own parameters in its forward hooks, as in an ordinary forward.
    prompt_width is not used: StreamBP decodes whole rows (a repeated prompt is decoded per row)."""
    check_supported(model, input_ids.shape[1])
    decoder = model.get_decoder()
    embeds = decoder.embed_tokens(input_ids)
    if torch.is_grad_enabled() and not embeds.requires_grad:
        # frozen embeddings (LoRA): the Function must still be in the graph for the layers' adapters
        embeds = embeds.detach().requires_grad_()
    cos, sin = decoder.rotary_emb(embeds, position_ids)
    hidden = _StreamedLayers.apply(embeds, decoder.layers, cos, sin, attention_mask.bool(), chunk_size)
    return decoder.norm(hidden)
