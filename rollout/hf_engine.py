"""Rollout with transformers `generate` (KV cache, batched, left-padded). Reference engine and fallback.

It also serves a stream of requests for APRIL (`add_request` / `step` / `abort`): each `step`
generates the next `tokens_per_step` tokens of every running request in one batched call (the
prompt and the tokens so far are re-encoded; there is no cache across steps), and returns the
requests that stopped or used up their budget. vLLM does the same per token with a live cache.
"""
from __future__ import annotations

import time
from typing import Iterable

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from rollout.types import FinishReason, Sample, SamplingParams, distinct_rows


class _FinishClock(StoppingCriteria):
    """Notes when each row of a batched `generate` emits a stop token (stops nothing itself), so
    every sample gets its own finish time although the batch returns at once."""

    def __init__(self, batch_size: int, stop_ids: list[int]):
        self.stop_ids = torch.tensor(stop_ids)
        self.finished_at: list[float | None] = [None] * batch_size

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        stopped = torch.isin(input_ids[:, -1].cpu(), self.stop_ids)
        now = time.time()
        for row in stopped.nonzero().flatten().tolist():
            if self.finished_at[row] is None:
                self.finished_at[row] = now
        return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)


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
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        greedy = params.temperature <= 0
        # A fresh config, so that sampling defaults shipped with the checkpoint (top_k, repetition
        # penalty...) never change the distribution behind our behaviour log-probs.
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else params.temperature, top_p=None if greedy else params.top_p,
            top_k=None, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            output_logits=True, return_dict_in_generate=True)
        clock = _FinishClock(len(prompts), self.stop_ids)
        cache = self._shared_prefill(input_ids, attention_mask, device) if self.share_prompts else None
        out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  past_key_values=cache, generation_config=config,
                                  stopping_criteria=StoppingCriteriaList([clock]))
        done = time.time()
        new_tokens = out.sequences[:, width:].cpu()
        # Behaviour log-prob = log softmax(logits / T) of the sampled token, before top-p: the same
        # quantity the learner computes, so ratios compare like with like. One step at a time keeps
        # memory at [batch, vocab] instead of [batch, steps, vocab].
        scale = 1.0 if greedy else params.temperature
        token_logps = torch.stack([
            torch.log_softmax(step_logits.float() / scale, dim=-1).gather(-1, new_tokens[:, t:t + 1].to(step_logits.device)).squeeze(-1).cpu()
            for t, step_logits in enumerate(out.logits)], dim=1)
        samples = []
        for row, prompt in enumerate(prompts):
            ids = new_tokens[row].tolist()
            stop_at = next((t for t, tok in enumerate(ids) if tok in self.stop_ids), None)
            if stop_at is None:
                finish, length = FinishReason.LENGTH, len(ids)
            else:
                finish, length = FinishReason.STOP, stop_at + 1  # the stop token is part of the response
            response = ids[:length]
            samples.append(Sample(
                prompt_ids=list(prompt), response_ids=response, logprobs=token_logps[row, :length].tolist(),
                finish_reason=finish, versions=[self.version] * length,
                text=self.tokenizer.decode(response, skip_special_tokens=True),
                finished_at=clock.finished_at[row] or done))
        return samples

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
