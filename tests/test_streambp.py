"""StreamBP is exact: loss and every parameter gradient equal plain autograd (ALGORITHMS.md §7.8)."""
import copy
import functools

import numpy as np
import pytest
import torch

from rlpost.algorithms import dpo, grpo
from rlpost.batch import _head_chunk, hf_decoder, logprob_head, pack, token_logprobs
from rlpost.streambp import chunk_bounds, streamed_decoder
from rollout.types import FinishReason, Sample


@pytest.fixture
def true_float64_norms(monkeypatch):
    """transformers' RMSNorm computes in float32 whatever the model dtype, so a float64 model is not
    float64 throughout and two exact orderings of the same sums differ at 1e-8. For the float64
    checks the norm runs in the input's dtype, so only summation order separates the two paths."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for norm in (modeling_llama.LlamaRMSNorm, modeling_mistral.MistralRMSNorm, modeling_qwen2.Qwen2RMSNorm,
                 modeling_qwen3.Qwen3RMSNorm):
        monkeypatch.setattr(norm, "forward", forward)


def spec_model(seed: int, dtype=torch.float64, family: str = "llama"):
    """The spec's tiny model: 2 layers, d=16, 4 heads over 2 KV heads (GQA), vocabulary 50; in the
    llama layout or another family StreamBP supports (qwen2: q/k/v biases; qwen3: per-head q/k norms)."""
    import transformers
    torch.manual_seed(seed)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    cfg = config_class(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, head_dim=4,
                       attn_implementation="sdpa")
    model = model_class(cfg).to(dtype)
    with torch.no_grad():  # biases and norm weights away from their 0 / 1 init, so mistakes show
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def spec_batch(vocab: int = 50, seed: int = 1):
    """4 sequences, 37 columns: left-padded prompts (4-7 tokens), right-padded responses (9-30)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for p, r in [(7, 30), (4, 25), (6, 9), (5, 30)]:
        samples.append(Sample(torch.randint(3, vocab, (p,), generator=g).tolist(),
                              torch.randint(3, vocab, (r,), generator=g).tolist(), [0.0] * r, FinishReason.STOP))
    batch = pack(samples, pad_id=0)
    assert batch.input_ids.shape[1] == 37 and (batch.attention_mask == 0).any()
    return batch


def grpo_objective(aggregation: str, beta: float, ratio_level: str = "token"):
    def objective(logp, batch, ref_logp):
        g = torch.Generator().manual_seed(3)  # float64 draws, so every dtype sees the same numbers
        mask = batch.response_mask.to(logp.dtype)
        advantages = torch.randn(logp.shape[0], generator=g, dtype=torch.float64).to(logp)
        noise = 0.2 * torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp)
        logp_old = logp.detach() + noise  # ratios away from 1: some tokens are clipped
        token_loss, _ = grpo.grpo_token_loss(logp, logp_old, advantages, mask, eps_low=0.2, eps_high=0.28,
                                             beta=beta, logp_ref=ref_logp, ratio_level=ratio_level)
        return grpo.aggregate(token_loss, mask, aggregation, grad_accum_steps=2, max_completion_length=30,
                              global_tokens=float(mask.sum()) * 2)
    return objective


def dpo_objective(logp, batch, ref_logp):
    """Rows (0, 1) and (2, 3) are (chosen, rejected) pairs."""
    mask = batch.response_mask.to(logp.dtype)
    seq, ref = dpo.sequence_logps(logp, mask), dpo.sequence_logps(ref_logp, mask)
    return dpo.dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=0.1)


OBJECTIVES = {f"grpo-{agg}-beta{beta}": grpo_objective(agg, beta)
              for agg in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.1)}
OBJECTIVES["gspo-sequence-ratio"] = grpo_objective("grpo", 0.0, "sequence")
OBJECTIVES["dpo"] = dpo_objective


def loss_and_grads(model, reference, objective, batch, decoder, logits_chunk, micro_batches=1):
    """Loss and parameter gradients; with micro_batches=2 the rows are split and gradients accumulate."""
    model.zero_grad()
    with torch.no_grad():
        ref_logp, _ = token_logprobs(reference, batch, 0.7)
    total = 0.0
    rows = torch.arange(batch.input_ids.shape[0]).chunk(micro_batches)
    for idx in rows:
        part = type(batch)(batch.input_ids[idx], batch.attention_mask[idx], batch.position_ids[idx],
                           batch.response_mask[idx], batch.prompt_width)
        logp, _ = token_logprobs(model, part, 0.7, chunk_size=logits_chunk, decoder=decoder)
        loss = objective(logp, part, ref_logp[idx])
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(got, expected, rtol, atol):
    loss, grads = got
    loss_ref, grads_ref = expected
    assert loss == pytest.approx(loss_ref, rel=rtol, abs=atol)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_exact_in_float64(objective, true_float64_norms):
    model, reference = spec_model(0), spec_model(1)
    batch = spec_batch()
    expected = loss_and_grads(model, reference, OBJECTIVES[objective], batch, hf_decoder, logits_chunk=37)
    for layer_chunk in (1, 5, 37):       # 5 does not divide 37
        for logits_chunk in (1, 8):
            got = loss_and_grads(model, reference, OBJECTIVES[objective], batch,
                                 functools.partial(streamed_decoder, chunk_size=layer_chunk), logits_chunk)
            assert_same(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_exact_on_other_model_families(family, true_float64_norms):
    model, reference = spec_model(0, family=family), spec_model(1, family=family)
    batch = spec_batch()
    expected = loss_and_grads(model, reference, OBJECTIVES["grpo-dapo-beta0.1"], batch, hf_decoder, 37)
    got = loss_and_grads(model, reference, OBJECTIVES["grpo-dapo-beta0.1"], batch,
                         functools.partial(streamed_decoder, chunk_size=5), 8)
    assert_same(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("objective", ["grpo-dapo-beta0.1", "dpo"])
def test_exact_with_gradient_accumulation(objective, true_float64_norms):
    model, reference = spec_model(0), spec_model(1)
    batch = spec_batch()
    expected = loss_and_grads(model, reference, OBJECTIVES[objective], batch, hf_decoder, 37, micro_batches=2)
    got = loss_and_grads(model, reference, OBJECTIVES[objective], batch,
                         functools.partial(streamed_decoder, chunk_size=5), 8, micro_batches=2)
    assert_same(got, expected, rtol=1e-10, atol=1e-12)


def _relative_errors(got, expected) -> dict[str, float]:
    """||g - g_ref|| / ||g_ref|| per parameter tensor, and the loss's relative error under "loss"."""
    errors = {name: float((got[1][name].cpu().double() - g.cpu().double()).norm() / g.double().norm().clamp(min=1e-30))
              for name, g in expected[1].items()}
    errors["loss"] = abs(got[0] - expected[0]) / max(abs(expected[0]), 1e-30)
    return errors


def _smollm2_slice(layers: int = 2):
    from rollout.models import load_model
    model = load_model("smollm2-135m-instruct")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    return model


@functools.cache
def _real_pair(which: str):
    """(policy, reference) in float32: tiny-random or a 2-layer slice of SmolLM2. The reference is the
    policy plus noise, so the KL and DPO terms are live."""
    from rollout.models import load_model
    make = (lambda: load_model("tiny-random")) if which == "tiny-random" else _smollm2_slice
    model, reference = make(), make()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, reference


def _copies(which: str, dtype):
    model, reference = _real_pair(which)
    return copy.deepcopy(model).to(dtype), copy.deepcopy(reference).to(dtype)


REAL = ["tiny-random", "smollm2-2-layer-slice"]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("which", REAL)
def test_exact_in_float64_on_real_architectures(which, objective, true_float64_norms):
    """Every objective, layer chunks of 5 and 16 rows (neither divides the 37 columns) and 37 (one
    chunk): the gradients equal autograd's to 1e-10 in relative norm per parameter tensor."""
    model, reference = _copies(which, torch.float64)
    batch = spec_batch(vocab=model.config.vocab_size)
    expected = loss_and_grads(model, reference, OBJECTIVES[objective], batch, hf_decoder, 8)
    for chunk in (5, 16, 37):
        got = loss_and_grads(model, reference, OBJECTIVES[objective], batch,
                             functools.partial(streamed_decoder, chunk_size=chunk), 8)
        errors = _relative_errors(got, expected)
        assert max(errors.values()) <= 1e-10, f"chunk {chunk}: {max(errors, key=errors.get)} {max(errors.values()):.1e}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("which", REAL)
def test_exact_in_float32_on_real_architectures(which, objective, device, true_float64_norms):
    """float32 (on CPU, and on a GPU when there is one), layer chunks of 16 and 24 rows (neither
    divides the 37 columns): StreamBP's loss and every gradient tensor are as close to the float64
    result as autograd's own float32 run is, within a factor of 4.

    Why this bound and not a fixed one: how far a float32 gradient lands from the exact one depends
    on the CPU's kernels (summation order, FMA, SIMD width), and the k3 KL gradient, (1 - exp(ref -
    logp)) with the reference near the policy, amplifies rounding of the log-probs: on one EPYC
    StreamBP and autograd differed by 1.4e-5 on `embed_tokens`, on another by 2.6e-5, where a fixed
    1e-5 passed on the first and failed on the second. What the test must tell apart is "StreamBP
    computes the same sums, rounded in another order" (its error is of the size of autograd's own,
    whatever the machine) from "StreamBP computes something else" (a lost chunk, a wrong mask: errors
    of order 1, i.e. 1e5 x larger). Two float32 evaluations of the same sums each land within e of
    the truth; reordering can at most double the accumulated rounding of each term, so 2e from each
    side plus headroom for the amplification gives 4x. The floor, 64 float32 ulps (7.6e-6), covers a
    tensor that autograd happens to get almost exactly right (a lucky rounding is not a property of the
    method). That StreamBP is exact, not just close, is proven in float64 above (1e-10).

    Below 16 rows per chunk the float32 forward takes other CPU attention kernels, whose log-probs
    round differently; the float64 tests cover small chunks."""
    floor = 64 * torch.finfo(torch.float32).eps
    model, reference = (m.to(device) for m in _copies(which, torch.float32))
    batch, objective = spec_batch(vocab=model.config.vocab_size), OBJECTIVES[objective]
    truth = loss_and_grads(*_copies(which, torch.float64), objective, batch, hf_decoder, 8)
    batch = batch.to(device)
    autograd = loss_and_grads(model, reference, objective, batch, hf_decoder, 8)
    autograd_error = _relative_errors(autograd, truth)
    for chunk in (16, 24):
        streamed = loss_and_grads(model, reference, objective, batch,
                                  functools.partial(streamed_decoder, chunk_size=chunk), 8)
        streamed_error = _relative_errors(streamed, truth)
        for name, error in streamed_error.items():
            assert error <= 4 * max(autograd_error[name], floor), \
                f"chunk {chunk}, {name}: StreamBP {error:.2e} from float64, autograd {autograd_error[name]:.2e}"


def test_lm_head_chunking_spec_numbers():
    """§7.8: token-mean CE with the global normaliser, in chunks of 2 positions, equals the full loss;
    averaging per-chunk means (a per-chunk normaliser) does not."""
    rng = np.random.default_rng(0)
    H = torch.tensor(rng.normal(size=(6, 3)), requires_grad=True)
    W = torch.tensor(rng.normal(size=(3, 5)))
    y = torch.tensor(rng.integers(0, 5, size=6))
    mask = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.float64)
    head = torch.nn.Linear(3, 5, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(W.T)

    def loss_of(chunk):
        logp = _head_chunk(head, logprob_head(1.0), H[chunk], y[chunk], chunk)["logp"]
        return -(logp * mask[chunk]).sum() / 5.0

    full = loss_of(slice(0, 6))
    dW_full, dH_full = torch.autograd.grad(full, [head.weight, H])
    chunks = [slice(a, e) for a, e in chunk_bounds(6, 2)]
    chunked = sum(loss_of(c) for c in chunks)
    dW_chunked, dH_chunked = torch.autograd.grad(chunked, [head.weight, H])
    assert float(full) == pytest.approx(2.989778, abs=1e-6)
    assert float(chunked) == pytest.approx(2.989778, abs=1e-6)
    assert (dW_chunked - dW_full).abs().max() < 1e-15 and (dH_chunked - dH_full).abs().max() < 1e-15
    per_chunk_means = [float(loss_of(c)) * 5.0 / float(mask[c].sum()) for c in chunks]
    assert sum(per_chunk_means) / len(per_chunk_means) == pytest.approx(3.393744, abs=1e-6)


def test_dpo_gradient_factor():
    """§7.8: beta 0.1, c = (-20 - -24) - (-21 - -23) = 2 -> dL/dc = -0.045017."""
    chosen = torch.tensor([-20.0], dtype=torch.float64, requires_grad=True)
    loss = dpo.dpo_loss(chosen, torch.tensor([-21.0]), torch.tensor([-24.0]), torch.tensor([-23.0]), beta=0.1)
    (grad,) = torch.autograd.grad(loss, chosen)  # dc/d chosen = 1
    assert float(grad) == pytest.approx(-0.045017, abs=1e-6)


def test_attention_work_of_the_chunk_schedule(monkeypatch):
    """§7.4 / §7.8, T=8, C=4: what the attention is actually handed. Every call gets one chunk's
    queries and the keys / values of its prefix only, with a mask of that [C, e] block: (4 queries,
    4 keys) then (4, 8) for each of the 2 layers, in the forward and again in the backward (the
    recomputation): 16 + 32 = 48 score entries per layer and pass, against 64 for the full matrix.
    A decoder that runs unchunked (plain autograd) or attends to the full K/V fails here."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):  # transformers' sdpa path calls this name too
        calls.append((q.shape[-2], k.shape[-2], v.shape[-2], None if attn_mask is None else tuple(attn_mask.shape[-2:])))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    model = spec_model(0)
    ids = torch.randint(3, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    hidden = streamed_decoder(model, ids, torch.ones_like(ids), torch.arange(8).expand(2, 8), chunk_size=4)
    forward = list(calls)
    calls.clear()
    hidden.pow(2).sum().backward()
    per_layer = [(4, 4, 4, (4, 4)), (4, 8, 8, (4, 8))]  # (queries, keys, values, mask) per chunk
    assert forward == per_layer * 2, forward
    assert calls == per_layer * 2, calls
    assert sum(q * k for q, k, _, _ in per_layer) == 48
    assert chunk_bounds(37, 5)[-1] == (35, 37)


def _peak_bytes(fn) -> int:
    """Peak CPU memory allocated by torch while `fn` runs, above what was allocated when it started:
    the running sum of the profiler's allocation (+) and free (-) records, in time order."""
    from torch.autograd.profiler import MEMORY_EVENT_NAME
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == MEMORY_EVENT_NAME and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


def test_streambp_peaks_far_below_autograd_in_memory():
    """§7.1 / §7.4: StreamBP keeps each layer's input and one chunk's activations; autograd keeps all
    activations of all layers. Model: 4 layers, d = 64, d_ff = 256, 1 sequence of T = 1024, chunks of
    C = 64, float32, no padding. Per layer autograd stores the norm outputs, q/k/v, attention output,
    residuals [T, d] and the gate / up / activation / product [T, d_ff]: >= 10 T d + 4 T d_ff floats
    = 6.8 MB, 27 MB for the 4 layers. StreamBP's peak: the 4 layer inputs (4 T d floats, 1 MB), and
    for the layer being back-propagated about ten [T, d]-sized buffers (its normed input, keys,
    values and their gradients, d_x, d_out: ~2.6 MB) plus one chunk's activations (C / T = 1/16 of
    a layer, < 0.5 MB): ~4-5 MB. So StreamBP must peak below half of autograd's (a predicted factor
    of 5-6, so ~2.5x headroom); a decoder that does not stream does not."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=1024, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(3, 50, (1, 1024), generator=torch.Generator().manual_seed(0))
    mask, positions = torch.ones_like(ids), torch.arange(1024).unsqueeze(0)
    probe = torch.randn(1, 1024, 64, generator=torch.Generator().manual_seed(1))

    def step(decoder):
        model.zero_grad(set_to_none=False)  # gradient buffers exist before measuring: same for both
        (decoder(model, ids, mask, positions) * probe).sum().backward()

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    autograd = _peak_bytes(lambda: step(hf_decoder))
    streamed = _peak_bytes(lambda: step(functools.partial(streamed_decoder, chunk_size=64)))
    assert autograd > 20e6, f"autograd peaked at {autograd / 1e6:.1f} MB: the measurement missed the activations"
    assert streamed < autograd / 2, f"StreamBP {streamed / 1e6:.1f} MB, autograd {autograd / 1e6:.1f} MB"
