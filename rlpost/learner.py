"""One trainable model: a DeepSpeed engine (ZeRO 0/2/3, AdamW, clipping) around an HF causal LM.

Built from a model spec and the optimisation config (`train:`), nothing else, so a second trainable
model (PRIME's PRM) is one more `Learner(spec, train_cfg)`. The loss is given per step: for each
micro-batch a head hook (rlpost/batch.HeadFn, run chunk by chunk over the output head inside the
engine's forward) and a function of its outputs.

With `lora` (model.lora) the model is a peft model whose adapters alone train (rlpost/lora.py): the
frozen base it carries is then also the reference (`frozen_view`), the rollout engine receives only
the merged adapted modules, and checkpoints hold the adapters.

Gradient accumulation is owned by the caller (`managed_gradient_accumulation: false`): a step may
have any number of micro-batches (dynamic sampling changes it), each `backward` accumulates, and
`step()` is the boundary. Losses arrive already normalised (see algorithms/grpo.aggregate).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from rlpost.batch import (Decoder, HeadFn, Packed, head_gradient_norms, head_outputs, hf_decoder, rows_decoder,
                          sequence_scores)
from rlpost import lora as lora_lib
from rlpost.config import ConfigError, LoraConfig, TrainConfig
from rlpost.metrics import Stats, accumulate
from rollout.models import is_adapter, load_classifier, load_model
from rollout.types import world
from rlpost.streambp import check_supported, streamed_decoder


def init_distributed() -> None:
    """Single-process runs get a one-rank gloo/nccl group; `deepspeed`/`torchrun` launches set these already."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.distributed.is_initialized():
        # An earlier group in this process may have been destroyed behind DeepSpeed's back (vLLM's
        # in-process engine destroys the default group when it shuts down): its cached clones are dead.
        from deepspeed.utils import groups
        groups._release_process_group_references()  # DeepSpeed 0.19.8's own hook (pinned in pyproject.toml)
        deepspeed.init_distributed(verbose=False)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _deepspeed_config(train: TrainConfig) -> dict:
    path = train.deepspeed_config_path()
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: file not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON ({e})") from None
    ds["gradient_clipping"] = train.max_grad_norm
    if ds.get("zero_optimization", {}).get("stage", 0) == 0 and world()[1] == 1:
        ds["gradient_clipping"] = 0.0  # clipped by the Learner, which then knows the norm (DS drops it at stage 0)
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds["managed_gradient_accumulation"] = False
    ds.pop("train_batch_size", None)
    # bf16 where the hardware has it; on this CPU bf16 is emulated and several times slower than fp32.
    ds["bf16"] = {"enabled": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
    return ds


class HeadPolicy(torch.nn.Module):
    """What DeepSpeed wraps: the HF model, whose forward runs a head hook over the response positions.
    Going through the engine's forward matters: ZeRO counts micro-batches there to accumulate (not
    overwrite) gradients, and ZeRO-3 gathers the head's weights there, recomputed chunks included."""

    def __init__(self, lm: torch.nn.Module, decoder: Decoder = hf_decoder, logits_chunk_size: int = 256):
        super().__init__()
        self.lm = lm
        self.decoder = decoder
        self.logits_chunk_size = logits_chunk_size

    def forward(self, batch: Packed, head: HeadFn) -> dict[str, torch.Tensor]:
        return head_outputs(self.lm, batch, head, self.logits_chunk_size, self.decoder)


class ScorePolicy(HeadPolicy):
    """A reward model's forward: one score per row ({"reward": [N]}), no output-head hook."""

    def forward(self, batch: Packed, head=None) -> dict[str, torch.Tensor]:
        return {"reward": sequence_scores(self.lm, batch, self.decoder)}


def _trainable_entries_only(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook of a LoRA learner's module: only the trainable tensors are state, the frozen base
    comes from the model spec (so a checkpoint holds adapters and their optimizer state only)."""
    trainable = {prefix + name for name, p in module.named_parameters() if p.requires_grad}
    for key in [k for k in state_dict if k not in trainable]:
        del state_dict[key]


def _frozen_entries_not_missing(module: torch.nn.Module, incompatible) -> None:
    """Load post-hook, the other half of the above: a checkpoint without the frozen base is complete,
    one without an adapter tensor is not (torch's strict check reads the list after this hook)."""
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    frozen |= {n for n, _ in module.named_buffers(remove_duplicate=False)}  # not saved either
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]


class _PhaseClock:
    """Seconds per phase, summed over laps; on an accelerator each lap waits for its queued work."""

    def __init__(self, device: torch.device):
        self.sync = getattr(torch, device.type).synchronize if device.type != "cpu" else (lambda: None)
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now


class Learner:
    """`head="lm"`: a causal LM trained through head hooks; `head="score"`: a reward model (a sequence
    classifier with one label, from a causal LM or an earlier reward model), one score per row."""

    def __init__(self, model_spec: str, train: TrainConfig, head: str = "lm", lora: LoraConfig | None = None):
        import deepspeed

        init_distributed()
        ds_config = _deepspeed_config(train)
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        hf_ds_config = None
        if self.zero_stage == 3:
            # Must exist before from_pretrained so the weights are partitioned while loading.
            from transformers.integrations import HfDeepSpeedConfig
            hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 - kept alive by reference below
        if head == "score":
            model = load_classifier(model_spec, num_labels=1, partitioned=True)[0].to(device())
        else:
            model = load_model(model_spec, partitioned=True).to(device())
        decoder = rows_decoder(train.shares_prompts)  # whole rows under checkpointing (no KV cache there)
        if train.backward == "checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif train.backward == "streambp":
            try:
                check_supported(model)
            except ValueError as e:
                raise ConfigError(f"train.backward=streambp: {e}") from None
            decoder = functools.partial(streamed_decoder, chunk_size=train.streambp_chunk_size)
        model.config.use_cache = False
        params = model.parameters()
        if lora is not None:  # only the adapters (and a reward model's new score head) are trainable
            model = lora_lib.wrap(model, lora, head)
            params = [p for p in model.parameters() if p.requires_grad]
        # torch's fused AdamW (TRL's default too): one kernel over all tensors instead of the per-tensor
        # loop torch picks for CPU tensors; the same update, rounded otherwise (main job: clipping +
        # optimizer 0.82 -> 0.40 s a step, docs/benchmarks.md)
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                                      betas=(0.9, 0.99), eps=train.adam_eps, fused=device().type in ("cpu", "cuda"))
        warmup = train.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=(ScorePolicy if head == "score" else HeadPolicy)(model, decoder, train.logits_chunk_size),
            optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config)
        self._hf_ds_config = hf_ds_config
        if lora is not None:  # DeepSpeed's exclude_frozen_parameters misses a tied head (an alias of the embeddings)
            self.engine.module.register_state_dict_post_hook(_trainable_entries_only)
            self.engine.module.register_load_state_dict_post_hook(_frozen_entries_not_missing)
        self.model = self.engine.module.lm  # the HF model (with LoRA: the peft model around it)
        self.spec, self.lora = model_spec, lora
        self.clip_norm = train.max_grad_norm if ds_config["gradient_clipping"] == 0.0 else None
        self.version = 0  # number of optimizer steps taken; stamped on rollout tokens

    def head_gradient_norms(self, batch: Packed, temperature: float) -> list[float]:
        self.engine.eval()
        return head_gradient_norms(self.model, batch.to(self.engine.device), temperature)

    def train_step(self, micro_batches: list, head: Callable[[object], HeadFn],
                   loss_fn: Callable[[object, dict[str, torch.Tensor]], tuple[torch.Tensor, Stats]]) -> Stats:
        """One optimizer step over `micro_batches` (each carrying a `.packed`). For each, `head(mb)` is
        the head hook run inside the forward and `loss_fn(mb, outputs) -> (loss, stats)` the already
        normalised loss; stats add up over micro-batches (rlpost.metrics.Mean for weighted means)."""
        self.engine.train()
        totals: Stats = {}
        finite = True
        clock = _PhaseClock(self.engine.device)  # the learner's seconds: forward (+ loss), backward, optimizer
        for mb in micro_batches:
            outputs = self.engine(mb.packed.to(self.engine.device), head(mb))
            loss, stats = loss_fn(mb, outputs)
            clock.lap("train/forward_s")
            if not torch.isfinite(loss):  # still run a (zero) backward: under ZeRO it is a collective
                finite, loss = False, torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))
            self.engine.backward(loss, scale_wrt_gas=False)
            clock.lap("train/backward_s")
            accumulate(totals, stats)
        norm = None
        if self.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
            finite = finite and bool(torch.isfinite(norm))
        if world()[1] > 1:  # every rank skips, or none
            flag = torch.tensor([0.0 if finite else 1.0], device=self.engine.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            finite = not bool(flag)
        if not finite:  # a non-finite loss or gradient: drop the step, keep the weights and optimizer state
            self._drop_gradients()
            return {**totals, "nonfinite": 1.0, "skipped_update": 1.0, "grad_norm": float("nan")}
        self.engine.step()
        clock.lap("train/optimizer_s")  # with the gradient clipping above
        self.version += 1
        if self.clip_norm is None:
            norm = self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(norm) if norm is not None else float("nan")
        totals["lr"] = self.scheduler.get_last_lr()[0]
        return {**totals, **clock.seconds}

    def _drop_gradients(self) -> None:
        """Forget the accumulated gradients without stepping, as DeepSpeed's own overflow path does:
        parameter grads, and under ZeRO-1/2 the reduced gradient partitions (ZeRO-3 keeps its
        partitions in the parameters' own grad buffers, cleared by zero_grad)."""
        self.engine.zero_grad()
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "averaged_gradients"):
            if hasattr(optimizer, "_release_preflattened_grad_buffers"):
                optimizer._release_preflattened_grad_buffers()
            for key in optimizer.averaged_gradients:
                optimizer.averaged_gradients[key] = None
                if hasattr(optimizer, "all_grad_tensors"):
                    optimizer.all_grad_tensors[key] = None
        for p in self.model.parameters():
            p.grad = None

    @contextlib.contextmanager
    def _gathered(self, params: list[torch.nn.Parameter]):
        if self.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def _bucketed(self, units: list[tuple[str, list[torch.nn.Parameter], Callable]], bucket_params: int):
        """(name, value(*params)) for each (name, params, value) unit, the parameters gathered under
        ZeRO-3 a bounded bucket at a time (about `bucket_params` elements), never the whole model."""
        bucket: list = []
        size = 0
        for i, unit in enumerate(units):
            bucket.append(unit)
            size += sum(getattr(p, "ds_numel", p.numel()) for p in unit[1])
            if size >= bucket_params or i == len(units) - 1:
                with self._gathered([p for _, params, _ in bucket for p in params]):
                    for name, params, value in bucket:
                        yield name, value(*params)
                bucket, size = [], 0

    def named_weights(self, bucket_params: int = 50_000_000) -> Iterator[tuple[str, torch.Tensor]]:
        """What the rollout engine receives, under HF names: every weight (full fine-tuning), or with
        LoRA the merged weight W + (alpha / r) B A of each adapted module only (nothing else changes).
        With ZeRO-3 the shards are gathered a bounded bucket at a time."""
        if self.lora is None:
            units = [(name, [p], lambda p: p.data.float()) for name, p in self.model.named_parameters()]
        else:
            units = [(f"{path}.weight", list(layer.parameters()),
                      lambda *_, layer=layer: lora_lib.merged_weight(layer).float())
                     for path, layer in lora_lib.adapted_modules(self.model)]
        yield from self._bucketed(units, bucket_params)

    def trained_weights(self, bucket_params: int = 50_000_000) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors training changes (APO snapshots them): every weight under its HF name (full
        fine-tuning, = named_weights), or the adapters under the keys peft saves them with."""
        if self.lora is None:
            yield from self.named_weights(bucket_params)
            return
        units = [(lora_lib.saved_name(name), [p], lambda p: p.data.float())
                 for name, p in self.model.named_parameters() if p.requires_grad]
        yield from self._bucketed(units, bucket_params)

    def frozen_view(self, spec: str, snapshot: bool = False) -> "lora_lib.AdapterView | None":
        """With LoRA, a frozen model made of this learner's own base, where `spec` allows it: the base
        itself (spec names the model this learner started from; `snapshot`: with a copy of the current
        adapters, which the caller later overwrites), or a LoRA adapter folder trained on that base.
        None where a copy must be loaded (full fine-tuning, or another model)."""
        if self.lora is None:
            return None
        from rollout.models import resolve
        base = resolve(self.spec)
        path = Path(spec).expanduser()
        if is_adapter(path):
            return lora_lib.AdapterView.from_folder(self.model, path) if lora_lib.same_base(path, base) else None
        if spec != self.spec and (not path.exists() or path.resolve() != Path(base).resolve()):
            return None
        if not snapshot:
            return lora_lib.AdapterView(self.model)
        return lora_lib.AdapterView(self.model, dict(self.trained_weights()), self.lora.alpha / self.lora.r)

    def save(self, directory: Path, tokenizer) -> None:
        """DeepSpeed state (model, optimizer, scheduler) under `deepspeed/` and an HF model under `hf/`;
        with LoRA the trainable tensors only, and `hf/` is the adapter in peft's format."""
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=self.lora is not None)
        hf_dir = directory / "hf"
        if self.lora is not None:
            trainable = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
            with self._gathered([p for _, p in trainable]):
                state = {name: p.data.detach().cpu().clone() for name, p in trainable}
            if world()[0] == 0:  # adapter_config.json + adapter_model.safetensors: PeftModel.from_pretrained loads it
                self.model.save_pretrained(hf_dir, state_dict=state, safe_serialization=True,
                                           save_embedding_layers=False)
        elif self.zero_stage == 3:
            state = {k.removeprefix("lm."): v for k, v in self.engine._zero3_consolidated_16bit_state_dict().items()}
            if world()[0] == 0:
                self.model.save_pretrained(hf_dir, state_dict=state, safe_serialization=True)
        elif world()[0] == 0:
            self.model.save_pretrained(hf_dir, safe_serialization=True)
        if world()[0] == 0:
            tokenizer.save_pretrained(hf_dir)

    def load(self, directory: Path) -> None:
        # with LoRA the saved module state holds the trainable tensors only (the base comes from the spec):
        # strict all the same, every adapter tensor must be there (_frozen_entries_not_missing)
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state in {directory / 'deepspeed'}")
