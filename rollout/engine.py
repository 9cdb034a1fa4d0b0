"""The contract every rollout engine meets, and the factory that picks one from the config.

A batch engine only needs `generate` and `load_weights`. Engines that can also serve a stream of
requests (vLLM) add `add_request` / `step` / `abort`, which the APRIL scheduler uses to take finished
groups while others still run.
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch

from rlpost.errors import UserError
from rollout.types import Sample, SamplingParams


@runtime_checkable
class RolloutEngine(Protocol):
    version: int  # policy version of the loaded weights; stamped on every sampled token

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """One Sample per prompt (repeat a prompt G times for a group)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the weights in place (HF parameter names) and set `version`."""


@runtime_checkable
class StreamingEngine(RolloutEngine, Protocol):
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def step(self) -> list[tuple[str, Sample]]:
        """Advance all running requests; return the ones that finished in this step."""

    def abort(self, request_id: str) -> Sample:
        """Stop a running request and return what it generated so far (FinishReason.ABORT)."""


def make_engine(kind: str, model: torch.nn.Module, tokenizer, **kwargs) -> RolloutEngine:
    """`hf` is the transformers engine; `auto` falls back to it while this build has no vLLM engine."""
    if kind in ("hf", "auto"):
        from rollout.hf_engine import HFEngine
        return HFEngine(model, tokenizer, **kwargs)
    raise UserError(f"rollout.engine: {kind!r} is not available in this build yet (choose hf or auto)")
