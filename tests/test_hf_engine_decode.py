"""The hf engine's decode loop (rollout/hf_engine.py:HFEngine._decode) samples what transformers'
`generate` samples, while dropping finished rows from the batch.

The reference is `generate` itself, configured as the engine was before it had its own loop (a fresh
GenerationConfig, the stop ids as eos, raw logits returned), with top_k=0: given top_k=None,
`generate` fills in its default top-k of 50 (the last test shows the engine does not). On a float32 model whose rows stop at
different steps (six of its 50 tokens stop):
  * greedy and seeded sampling (T = 1, and T = 0.7 with top-p 0.9) give the same tokens, stop reasons
    and lengths: the loop draws its noise for the whole batch at every step, as torch.multinomial does
    for one sample, so the RNG stream is generate's. A token can only differ where two candidates' scores
    are within float32 rounding of each other (the smaller batch's matmuls round otherwise): with 50
    tokens and a few hundred draws that has probability ~1e-4, and the seeds are fixed;
  * the behaviour log-probs equal log softmax(logits / T) of generate's raw logits to float32 rounding
    (relative 1e-5 on values of size ~1-10: ~100 float32 ulps, far below any wrong temperature or a
    log-prob read at the wrong step, O(1e-1));
  * the batch really shrinks: the embedding layer sees fewer rows once rows have stopped.
"""
import pytest
import torch
from transformers import GenerationConfig

from rollout.types import FinishReason, SamplingParams
from test_streambp import spec_model

STOP = [3, 4, 5, 6, 7, 8]


def engine_and_model(tokenizer, share: bool):
    from rollout.hf_engine import HFEngine
    model = spec_model(4, dtype=torch.float32)
    with torch.no_grad():  # sharper distributions, so greedy rows differ from each other
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = STOP
    engine = HFEngine(model, tokenizer, share_prompts=share)
    engine.stop_ids = STOP  # the tokenizer's own eos id is outside this model's 50 tokens
    return engine, model


def reference(model, prompts, params: SamplingParams, pad_id: int):
    """transformers' generate on the same left-padded batch, seeded the same way."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    greedy = params.temperature <= 0
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=not greedy,
                              temperature=None if greedy else params.temperature,
                              top_p=None if greedy else params.top_p, top_k=0, eos_token_id=STOP,
                              pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    new = out.sequences[:, width:]
    scale = 1.0 if greedy else params.temperature
    logps = torch.stack([torch.log_softmax(lg / scale, -1).gather(-1, new[:, t:t + 1]).squeeze(-1)
                         for t, lg in enumerate(out.logits)], 1)
    rows = []
    for row in range(len(prompts)):
        toks = new[row].tolist()
        stop = next((t for t, tok in enumerate(toks) if tok in STOP), None)
        length = len(toks) if stop is None else stop + 1
        rows.append((toks[:length], logps[row, :length], FinishReason.LENGTH if stop is None else FinishReason.STOP))
    return rows


@pytest.mark.parametrize("share", [False, True])
def test_the_engine_samples_what_generate_samples_and_drops_finished_rows(tokenizer, share):
    engine, model = engine_and_model(tokenizer, share)
    prompts = [[10, 11, 12, 13], [20, 21], [30, 31, 32]] * 4  # three prompts, four samples of each
    lengths = set()
    for params in (SamplingParams(max_new_tokens=12, temperature=0.0, seed=0),
                   SamplingParams(max_new_tokens=12, temperature=1.0, seed=3),
                   SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=5)):
        batch_rows = []
        handle = model.get_input_embeddings().register_forward_hook(lambda m, a, o: batch_rows.append(a[0].shape[0]))
        got = engine.generate(prompts, params)
        handle.remove()
        want = reference(model, prompts, params, tokenizer.pad_token_id)
        for sample, (tokens, logps, finish) in zip(got, want):
            assert sample.response_ids == tokens
            assert sample.finish_reason == finish
            diff = (torch.tensor(sample.logprobs) - logps).abs().max()
            assert float(diff) <= 1e-5 * max(1.0, float(logps.abs().max()))
            lengths.add(len(tokens))
        stopped_early = sum(len(t) < params.max_new_tokens for t, _, _ in want)
        if share:  # the shared prefill ran the three distinct prompts first
            assert batch_rows[0] == 3
            batch_rows = batch_rows[1:]
        if stopped_early:  # once rows stopped, the batch the model decodes shrinks
            assert batch_rows[-1] == sum(len(t) == max(len(u) for u, _, _ in want) for t, _, _ in want)
            assert batch_rows == sorted(batch_rows, reverse=True) and batch_rows[-1] < len(prompts)
    assert len(lengths) >= 3  # rows really stopped at different steps


def test_the_engine_samples_the_whole_vocabulary(tokenizer):
    """At T = 1 without top-p the engine samples softmax(logits) over all 49,152 tokens, the
    distribution its behaviour log-probs describe: on tiny-random (nearly uniform logits) almost
    every draw lies outside the 50 most likely tokens, where a top-k of 50 (generate's default when
    given top_k=None) would put none."""
    from rollout.hf_engine import HFEngine
    from rollout.models import load_model
    model = load_model("tiny-random")
    engine = HFEngine(model, tokenizer)
    samples = engine.generate([[5, 9, 14, 3]] * 8, SamplingParams(max_new_tokens=8, temperature=1.0, seed=2))
    outside = total = 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1]
            top50 = logits.topk(50, -1).indices
            outside += sum(int(tok not in top50[t]) for t, tok in enumerate(s.response_ids))
            total += len(s.response_ids)
    assert total >= 32 and outside >= total // 2
