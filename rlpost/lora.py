"""LoRA through peft (docs/lora.md): what the learner needs beyond peft's own API.

    wrap(model, cfg, head)   get_peft_model with checked target modules: only the adapters train (and a
                             reward model's new score head, which peft keeps as a trainable copy)
    adapted_modules(model)   (HF module path, peft LoRA layer) of every module that carries an adapter
    merged_weight(layer)     W + (alpha / r) B A, what the rollout engine receives for that module
    AdapterView              the learner's own model with its adapters disabled (peft's disable_adapter):
                             the frozen base, i.e. the initial policy; optionally with the tensors of
                             another LoRA adapter applied on that base (APO's round snapshots, AlignDistil
                             teachers trained with LoRA on the same base). No second copy of the base.

Departures from peft's defaults, and why: the default targets are every linear layer of the decoder
("all-linear"; peft's per-architecture default adapts q and v only, which learns less per parameter
on these tasks), dropout 0 (StreamBP recomputes layers chunk by chunk and must see the same function).
"""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from rlpost.config import ConfigError, LoraConfig
from rollout.models import ADAPTER_CONFIG, adapter_base

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name of the one adapter the learner trains


def wrap(model: torch.nn.Module, cfg: LoraConfig, head: str = "lm") -> torch.nn.Module:
    """The peft model around `model` with LoRA on `cfg.target_modules`; one clear error naming
    model.lora for a module that does not exist or that peft cannot adapt."""
    import peft

    model_type = getattr(model.config, "model_type", type(model).__name__)
    if cfg.target_modules != "all-linear":
        _check_targets(model, cfg.target_modules, model_type)
        output_head = model.get_output_embeddings()
        head_path = next((path for path, module in model.named_modules() if module is output_head), None)
        tied = getattr(model.config, "tie_word_embeddings", False)
        if tied and head_path and any(head_path == t or head_path.endswith("." + t) for t in cfg.target_modules):
            raise ConfigError(f"model.lora.target_modules: {head_path!r} is tied to the input embeddings in this "
                              f"{model_type} model; an adapter there would change both (leave it out)")
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=cfg.target_modules, bias="none",
                             task_type="SEQ_CLS" if head == "score" else "CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as e:  # peft's own words: unsupported module or model
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model.lora: peft cannot put LoRA adapters on this {model_type} model "
                          f"(target_modules {cfg.target_modules!r}): {first[:240]}") from None


def _check_targets(model: torch.nn.Module, targets: list[str], model_type: str) -> None:
    """peft matches a name against a module's path or its last components, and silently skips names
    that match nothing as long as one matches: here every name must match a module."""
    paths = [name for name, _ in model.named_modules() if name]
    for target in targets:
        if not any(path == target or path.endswith("." + target) for path in paths):
            linear = sorted({path.rsplit(".", 1)[-1] for path, module in model.named_modules()
                             if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))})
            raise ConfigError(f"model.lora.target_modules: this {model_type} model has no module named {target!r} "
                              f"(modules that can take an adapter: {', '.join(linear[:10])})")


def is_lora_layer(module: torch.nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer
    return isinstance(module, LoraLayer)


def adapted_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(path inside the HF model, e.g. "model.layers.0.self_attn.q_proj", peft LoRA layer) of every
    module with an adapter, in model order."""
    hf_model = model.get_base_model()
    return [(path, module) for path, module in hf_model.named_modules() if is_lora_layer(module)]


def merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W + scale * B A for one LoRA layer (peft's get_delta_weight: scale alpha / r, transposed where
    the base layer stores W transposed), in the weight's dtype."""
    return layer.get_base_layer().weight.data + layer.get_delta_weight(ADAPTER_NAME)


def saved_name(name: str) -> str:
    """A parameter name of the peft model -> the key peft saves it under (the adapter name dropped:
    "...q_proj.lora_A.default.weight" -> "...q_proj.lora_A.weight")."""
    return name.replace(f".{ADAPTER_NAME}.", ".")


class _Applied:
    """A module of the learner's model called under an AdapterView: adapters off, the view's own on."""

    def __init__(self, view: "AdapterView", module: torch.nn.Module):
        self.view, self.module = view, module

    def __call__(self, *args, **kwargs):
        with self.view.applied():
            return self.module(*args, **kwargs)


def _add_lora(A: torch.Tensor, B: torch.Tensor, scale: float, module, args, output):
    """Forward hook: output + B A x * scale, in peft's order of operations (its vanilla LoRA forward),
    cast back to the output's dtype as peft does (a bf16 base with float32 snapshot tensors)."""
    x = args[0].to(A.dtype)
    return output + (F.linear(F.linear(x, A), B) * scale).to(output.dtype)


class AdapterView:
    """A frozen causal LM made of the learner's own weights: its base with the adapters disabled, plus,
    where given, the tensors of another LoRA adapter on that base (keys as peft saves them,
    "<peft path>.lora_A.weight" / ".lora_B.weight", scaled by `scale`). The objectives use it like any
    frozen model (get_decoder, get_output_embeddings, config, parameters() for the device); its own
    tensors, the adapters, are state_dict / load_state_dict / named_parameters (APO rolls its snapshots
    through them). Under ZeRO-3 every base weight is gathered by its module's own hooks, as in a forward
    of the learner."""

    def __init__(self, model: torch.nn.Module, adapters: dict[str, torch.Tensor] | None = None, scale: float = 1.0):
        self.model, self.scale = model, scale
        self.config = model.config
        self.adapters: dict[str, torch.Tensor] = {}
        self.load_state_dict(adapters or {})
        head = model.get_output_embeddings()
        self._head_path = next(path for path, module in model.named_modules() if module is head)

    @classmethod
    def from_folder(cls, model: torch.nn.Module, folder: str | Path) -> "AdapterView":
        """A LoRA adapter saved by peft (adapter_config.json + adapter_model.safetensors) on this base."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        unsupported = [key for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if config.get(key)]
        if config.get("peft_type") != "LORA" or unsupported or config.get("fan_in_fan_out"):
            raise ConfigError(f"{folder}: only plain LoRA adapters can share the learner's base "
                              f"(this one: {config.get('peft_type')}{', ' + ', '.join(unsupported) if unsupported else ''})")
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / r ** 0.5 if config.get("use_rslora") else alpha / r
        return cls(model, load_file(str(folder / ADAPTER_WEIGHTS)), scale)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.adapters)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        modules = dict(self.model.named_modules())
        for key in state:
            path, sep, kind = key.rpartition(".lora_")
            module = modules.get(path)
            if not sep or kind not in ("A.weight", "B.weight"):
                raise ConfigError(f"adapter tensor {key!r}: only LoRA A / B matrices can be applied to the base")
            if module is None:
                raise ConfigError(f"adapter tensor {key!r}: the learner's model has no module {path!r} (another base?)")
            base = module.get_base_layer() if is_lora_layer(module) else module
            if not isinstance(base, torch.nn.Linear):
                raise ConfigError(f"adapter tensor {key!r}: only LoRA on linear layers can be applied to the base")
        self.adapters = {k: v.detach().clone() for k, v in state.items()}

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.adapters.items())

    def parameters(self) -> Iterator[torch.Tensor]:
        return self.model.parameters()

    @contextlib.contextmanager
    def applied(self):
        """While inside: the learner's model computes this view (eval mode, adapters disabled, this
        view's adapters added by forward hooks); afterwards everything is as it was."""
        was_training = self.model.training
        self.model.eval()
        handles = []
        try:
            with self.model.disable_adapter():
                device = next(self.model.parameters()).device
                for key, A in self.adapters.items():
                    if key.endswith(".lora_A.weight"):
                        path = key.removesuffix(".lora_A.weight")
                        B = self.adapters[path + ".lora_B.weight"]
                        hook = functools.partial(_add_lora, A.to(device), B.to(device), self.scale)
                        handles.append(self.model.get_submodule(path).register_forward_hook(hook))
                yield
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)

    def get_decoder(self):
        return _Applied(self, self.model.get_decoder())

    def get_output_embeddings(self):
        """The output head; called under the view only where an adapter touches it (not by default), so
        that a teacher's head inside the student's own forward leaves the student's adapters alone."""
        head = self.model.get_output_embeddings()
        touched = is_lora_layer(head) or any(k.startswith(self._head_path + ".lora_") for k in self.adapters)
        return _Applied(self, head) if touched else head


def same_base(adapter_folder: str | Path, base_path: str) -> bool:
    """Whether a saved adapter was trained on the model at `base_path` (peft records the base's path)."""
    return Path(adapter_base(adapter_folder)).expanduser().resolve() == Path(base_path).expanduser().resolve()
