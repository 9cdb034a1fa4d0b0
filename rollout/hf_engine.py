"""Rollout with a transformers model (KV cache, batched, left-padded). Reference engine and fallback.

It samples as transformers' `generate` does (tests/test_hf_engine_decode.py holds it to `generate`
token for token) but with its own decode loop, for two reasons: a row that stops leaves the batch
(`generate` keeps decoding finished rows until the last one stops), and the sampling distribution is
exactly softmax(logits / T) under top-p, the one the behaviour log-probs describe. `generate` given
top_k=None fills in its default top-k of 50, which this engine once sampled under unawares while
logging untruncated log-probs.

It also serves a stream of requests for APRIL (`add_request` / `step` / `abort`): each `step`
generates the next `tokens_per_step` tokens of every running request in one batched call (the
prompt and the tokens so far are re-encoded; there is no cache across steps), and returns the
requests that stopped or used up their budget. vLLM does the same per token with a live cache.
"""
from __future__ import annotations

import time
from typing import Iterable

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from rollout.types import FinishReason, Sample, SamplingParams, distinct_rows


class HFEngine:
    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_size: int = 64, tokens_per_step: int = 8,
                 share_prompts: bool = True):
        self.model = model.eval()
        self.tokens_per_step = tokens_per_step
        self.share_prompts = share_prompts
        self._running: dict[str, tuple[SamplingParams, Sample]] = {}
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.version = 0
        self.pad_id = tokenizer.pad_token_id
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.stop_ids = sorted(set(eos) | {tokenizer.eos_token_id})

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        if params.seed is None:
            return self._generate_all(prompts, params)
        with torch.random.fork_rng(devices=[]):  # a seeded call must not reset the caller's RNG stream
            torch.manual_seed(params.seed)
            return self._generate_all(prompts, params)

    def _generate_all(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        samples: list[Sample] = []
        for start in range(0, len(prompts), self.max_batch_size):
            samples += self._generate_batch(prompts[start:start + self.max_batch_size], params)
        return samples

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        tokens, logps, lengths, stopped, finished_at = self._decode(input_ids, attention_mask, params)
        samples = []
        for row, prompt in enumerate(prompts):
            response = tokens[row, :lengths[row]].tolist()  # the stop token is part of the response
            samples.append(Sample(
                prompt_ids=list(prompt), response_ids=response, logprobs=logps[row, :lengths[row]].tolist(),
                finish_reason=FinishReason.STOP if stopped[row] else FinishReason.LENGTH,
                versions=[self.version] * len(response),
                text=self.tokenizer.decode(response, skip_special_tokens=True), finished_at=finished_at[row]))
        return samples

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams):
        """Sample up to max_new_tokens per row from the left-padded prompts, as transformers' `generate`
        samples (its own temperature and top-p warpers; multinomial as torch draws it for one sample, the
        argmax of probs / Exponential(1) noise over the whole batch), with two differences: a row that
        stops leaves the batch (its cache too), so finished rows cost nothing, and with share_prompts each
        distinct prompt is prefilled once. The noise is drawn for every row of the batch at every step, so
        a row's tokens do not depend on when the others stopped.

        Behaviour log-prob = log softmax(logits / T) of the sampled token, before top-p: the quantity
        the learner computes, so ratios compare like with like. Returns per row (tokens [B, t],
        log-probs [B, t], length, stopped with a stop token, finish time)."""
        device = next(self.model.parameters()).device
        B, steps = len(input_ids), params.max_new_tokens
        greedy = params.temperature <= 0
        scale = 1.0 if greedy else params.temperature
        warpers = LogitsProcessorList()
        if not greedy and params.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(params.temperature))
        if not greedy and params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        tokens = torch.full((B, steps), self.pad_id, dtype=torch.long)
        logps = torch.zeros(B, steps)
        lengths, stopped, finished_at = [steps] * B, [False] * B, [0.0] * B
        stop_ids = torch.tensor(self.stop_ids, device=device)
        mask = attention_mask.to(device)
        cache = self._shared_prefill(input_ids, attention_mask, device) if self.share_prompts else None
        step_ids = input_ids[:, -1:].to(device) if cache is not None else input_ids.to(device)
        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        active = torch.arange(B)  # rows of the batch still decoding, in order
        for t in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            logits = self.model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1].float()
            if greedy:
                chosen = logits.argmax(-1)
            else:
                probs = torch.softmax(warpers(None, logits), dim=-1)
                noise = torch.empty(B, probs.shape[-1], device=device).exponential_()[active.to(device)]
                chosen = (probs / noise).argmax(-1)
            logp = torch.log_softmax(logits / scale, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
            tokens[active, t], logps[active, t] = chosen.cpu(), logp.cpu()
            done = torch.isin(chosen, stop_ids).cpu()
            now = time.time()
            for row in active[done].tolist():
                lengths[row], stopped[row], finished_at[row] = t + 1, True, now
            if t == steps - 1 or bool(done.all()):
                break
            if bool(done.any()):  # finished rows leave the batch
                keep = (~done).nonzero().flatten()
                active, mask, chosen = active[keep], mask[keep.to(device)], chosen[keep.to(device)]
                cache.batch_select_indices(keep.to(device))
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            step_ids = chosen[:, None]
        now = time.time()
        for row in active.tolist():
            if not stopped[row]:
                finished_at[row] = now
        return tokens, logps, lengths, stopped, finished_at

    def _shared_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, device) -> DynamicCache | None:
        """rollout.share_prompts, when rows repeat a prompt (a group's samples): the KV cache of each
        distinct prompt but its last token, computed once and copied out to its rows; `generate` then
        runs from the last prompt token on. Positions as `generate` counts them (from the first real
        token). The same arithmetic as the whole prefill, rounded otherwise (tests/test_shared_prompts.py)."""
        first, rows = distinct_rows(torch.cat([input_ids, attention_mask], 1))
        if len(first) == len(rows) or input_ids.shape[1] < 2:
            return None
        ids, mask = input_ids[first, :-1].to(device), attention_mask[first, :-1].to(device)
        cache = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_select_indices(rows.to(device))
        return cache

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._running:
            raise ValueError(f"request {request_id!r} is already running")
        self._running[request_id] = (params, Sample(list(prompt_ids), [], [], FinishReason.ABORT))

    @torch.no_grad()
    def step(self) -> list[tuple[str, Sample]]:
        if not self._running:
            return []
        ids = list(self._running)
        first = self._running[ids[0]][0]
        chunk = SamplingParams(self.tokens_per_step, first.temperature, first.top_p)
        outs = self._generate_all([s.prompt_ids + s.response_ids for _, s in self._running.values()], chunk)
        finished = []
        for request_id, out in zip(ids, outs):
            params, sample = self._running[request_id]
            budget = params.max_new_tokens - len(sample.response_ids)
            take = min(len(out.response_ids), budget)  # a prefix of a sample is a sample
            sample.response_ids += out.response_ids[:take]
            sample.logprobs += out.logprobs[:take]
            sample.versions += out.versions[:take]
            if out.finish_reason == FinishReason.STOP and len(out.response_ids) <= budget:
                sample.finish_reason = FinishReason.STOP
            elif len(sample.response_ids) >= params.max_new_tokens:
                sample.finish_reason = FinishReason.LENGTH
            else:
                continue
            sample.finished_at = time.time()
            finished.append((request_id, self._finish(request_id)))
        return finished

    def abort(self, request_id: str) -> Sample:
        return self._finish(request_id)  # finish_reason stays ABORT

    def _finish(self, request_id: str) -> Sample:
        _, sample = self._running.pop(request_id)
        sample.text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
        return sample

    def close(self) -> None:
        pass  # everything it holds lives in this process

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"rollout model has no parameter {name!r}")
            params[name].copy_(tensor)
        self.version = version


class SharedHFEngine(HFEngine):
    """The hf engine on the learner's own module (`rollout.shared_model`): no second copy of the
    weights, and nothing to copy after a step, since the learner's update is already in the module it
    generates from (with LoRA: the peft model, adapters on). It generates in eval mode and leaves the
    module in the mode it found it. Under ZeRO 0 / 2 only (ZeRO-3 modules hold shards)."""

    def __init__(self, model: torch.nn.Module, tokenizer, **kwargs):
        training = model.training
        super().__init__(model, tokenizer, **kwargs)
        model.train(training)

    def _in_eval(self, fn, *args):
        training = self.model.training
        self.model.eval()
        try:
            return fn(*args)
        finally:
            self.model.train(training)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        return self._in_eval(super().generate, prompts, params)

    def step(self) -> list[tuple[str, Sample]]:
        return self._in_eval(super().step)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.version = version  # the weights are the learner's own (the tensors are never computed)
