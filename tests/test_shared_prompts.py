"""train.share_prompts: each distinct prompt of a micro-batch decoded once (rlpost/batch.py:hf_decoder),
packed into one row without padding (small micro-batches) or through a copied KV cache (big ones).
The arithmetic is the whole-row forward's, so in float64 (with the norms in float64 too) the log-probs
and every parameter gradient agree to rounding: relative 1e-10 is ~1e5 float64 ulps, far above
reordered sums of a few hundred terms and far below any real difference (a prompt position that saw a
response, a wrong position id, a dropped gradient path: all O(1e-2) or more on this model)."""
import functools

import pytest
import torch

from rlpost import batch as batch_lib
from rlpost.batch import head_outputs, hf_decoder, logprob_head, pack
from rollout.types import FinishReason, Sample
from test_streambp import spec_model, true_float64_norms  # noqa: F401 - fixture

SHARED = functools.partial(hf_decoder, share_prompts=True)


def group_batch(pad_id: int = 0):
    """Two GRPO-like groups (3 and 2 samples of one prompt each) and a lone prompt; prompts of 4-7
    tokens (left padding), ragged responses (right padding)."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 50, (n,), generator=g).tolist() for n in (7, 4, 6)]
    samples = []
    for prompt, lengths in zip(prompts, [(9, 3, 12), (1, 8), (5,)]):
        for r in lengths:
            samples.append(Sample(prompt, torch.randint(3, 50, (r,), generator=g).tolist(), [0.0] * r,
                                  FinishReason.STOP))
    return pack(samples, pad_id)


def logp_and_grads(model, batch, decoder):
    model.zero_grad()
    logp = head_outputs(model, batch, logprob_head(0.7), chunk_size=5, decoder=decoder)["logp"]
    weights = torch.linspace(-1, 1, logp.numel(), dtype=logp.dtype).view_as(logp)
    (logp * weights * batch.response_mask).sum().backward()
    return logp.detach() * batch.response_mask, {n: p.grad.clone() for n, p in model.named_parameters()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture(params=["packed", "cache"])
def path(request, monkeypatch):
    """Both ways of sharing: one packed row (the default for small micro-batches), or the KV cache (a
    micro-batch above PACKED_MAX_TOKENS)."""
    if request.param == "cache":
        monkeypatch.setattr(batch_lib, "PACKED_MAX_TOKENS", 1)
    return request.param


def test_shared_prompts_equal_whole_rows_in_float64(true_float64_norms, path):
    model = spec_model(0)
    batch = group_batch()
    whole_logp, whole_grads = logp_and_grads(model, batch, hf_decoder)
    shared_logp, shared_grads = logp_and_grads(model, batch, SHARED)
    assert relative(shared_logp, whole_logp) < 1e-10
    for name, grad in whole_grads.items():
        assert relative(shared_grads[name], grad) < 1e-10, name


def test_each_distinct_prompt_is_embedded_once(path):
    """Without sharing the decoder embeds 6 rows x 19 columns; packed, one row of the 17 prompt tokens
    (7 + 4 + 6) and the 38 response tokens (9 + 3 + 12 + 1 + 8 + 5); through the cache, 3 prompts x 7
    columns, then the 6 rows' 12 response columns."""
    model = spec_model(0, torch.float32)
    batch = group_batch()
    assert batch.input_ids.shape == (6, 19) and batch.prompt_width == 7
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    head_outputs(model, batch, logprob_head(), decoder=SHARED)
    handle.remove()
    assert seen == ([torch.Size([1, 55])] if path == "packed" else [torch.Size([3, 7]), torch.Size([6, 12])])


def test_a_prompt_that_looks_padded_is_not_merged_with_a_padded_one(true_float64_norms, path):
    """Prompt [0, 5] where 0 is also the pad id, and prompt [5] left-padded to [0, 5]: the same ids,
    other attention masks; they must not share (the mask is part of what makes a prompt)."""
    model = spec_model(1)
    samples = [Sample(p, r, [0.0] * len(r), FinishReason.STOP) for p, r in
               [([0, 5], [7, 8]), ([5], [7, 8]), ([5], [9])]]
    batch = pack(samples, pad_id=0)
    assert torch.equal(batch.input_ids[0, :2], batch.input_ids[1, :2])
    whole, _ = logp_and_grads(model, batch, hf_decoder)
    shared, _ = logp_and_grads(model, batch, SHARED)
    assert relative(shared, whole) < 1e-10
    assert relative(whole[0], whole[1]) > 1e-3  # the two prompts really score differently


def test_no_repeated_prompt_is_packed_or_decodes_whole_rows(path):
    model = spec_model(0, torch.float32)
    samples = [Sample([3 + i, 4], [5, 6], [0.0, 0.0], FinishReason.STOP) for i in range(3)]
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    head_outputs(model, pack(samples, 0), logprob_head(), decoder=SHARED)
    handle.remove()
    assert seen == ([torch.Size([1, 12])] if path == "packed" else [torch.Size([3, 4])])


def engine_samples(model, tokenizer, share: bool, temperature: float):
    from rollout.hf_engine import HFEngine
    from rollout.types import SamplingParams
    engine = HFEngine(model, tokenizer, share_prompts=share)
    prompts = [[5, 9, 14, 3], [22, 7]] * 3 + [[30, 31, 32]]  # two repeated prompts and a lone one
    return engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=temperature, seed=11))


def test_the_hf_engine_prefills_each_distinct_prompt_once(tokenizer, true_float64_norms):
    """rollout.share_prompts: the same tokens and behaviour log-probs as the whole prefill (float64,
    the bound above), greedy and sampled with a seed; and the prefill really ran once per prompt."""
    model = spec_model(2)
    for temperature in (0.0, 1.0):
        whole = engine_samples(model, tokenizer, False, temperature)
        seen = []
        handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
        shared = engine_samples(model, tokenizer, True, temperature)
        handle.remove()
        assert seen[:2] == [torch.Size([3, 3]), torch.Size([7, 1])]  # 3 prompts x 3 columns, then the last column
        assert [s.response_ids for s in shared] == [s.response_ids for s in whole]
        assert len({tuple(s.response_ids) for s in whole[:6:2]}) > 1 or temperature == 0  # sampling varies
        for a, b in zip(shared, whole):  # the engine rounds its log-probs to float32: a few float32 ulps
            assert relative(torch.tensor(a.logprobs, dtype=torch.float64), torch.tensor(b.logprobs, dtype=torch.float64)) < 1e-6
