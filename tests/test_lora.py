"""LoRA through peft (docs/lora.md): the adapters train, the reference is the base with adapters
disabled, the rollout engine receives merged weights of the adapted modules only, checkpoints are
peft adapter folders. Expected values come from peft's own model, a separately loaded base, hand
derivations (B = 0 at the start) and float64 forwards."""
import copy
import functools
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env
from rlpost.batch import head_outputs, pack, token_logprobs
from rlpost.config import ConfigError, LoraConfig, load_config
from rollout.types import FinishReason, Group, Sample
from test_streambp import _relative_errors, spec_batch, spec_model, true_float64_norms  # noqa: F401 - fixture


def _samples(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n):
        prompt = torch.randint(10, 1000, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(10, 1000, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        out.append(Sample(prompt, response, [-1.0] * len(response), FinishReason.STOP, reward=float(j % 2),
                          correct=j % 2 == 1))
    return out


def _groups(seed=0):
    samples = _samples(seed)
    return [Group(k, "", "", samples[3 * k:3 * k + 3]) for k in range(2)]


def _learner(*overrides, lora="model.lora.r=4"):
    from rlpost.learner import Learner
    cfg = load_config(None, ["model.name=tiny-random", "train.micro_batch_size=4", "train.lr=1e-2", lora, *overrides])
    torch.manual_seed(0)
    return Learner(cfg.model.name, cfg.train, lora=cfg.model.lora), cfg


def _step(learner, cfg):
    from rlpost.build import make_objective
    objective = make_objective(cfg, learner, pad_id=2)
    groups = _groups()
    return objective, learner.train_step(objective.micro_batches(groups, objective.advantages(groups), learner.version),
                                         objective.head, objective.loss)


def _logp(model, batch):
    with torch.no_grad():
        return token_logprobs(model, batch, 1.0)[0]


# --- the start, the reference, the gradient ------------------------------------------------------------

def test_b_is_zero_at_the_start_so_the_policy_is_the_base_bitwise():
    """peft starts B at 0 (A random): W x + s B A x adds exact zeros, so the LoRA policy's log-probs equal
    those of the base model loaded on its own, bit for bit."""
    from rollout.models import load_model
    learner, _ = _learner()
    adapters = {n: p for n, p in learner.model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert all(float(p.detach().abs().max()) == 0.0 for n, p in adapters.items() if ".lora_B." in n)
    assert all(float(p.detach().abs().max()) > 0.0 for n, p in adapters.items() if ".lora_A." in n)
    batch = pack(_samples(), pad_id=2)
    assert torch.equal(_logp(learner.model, batch), _logp(load_model("tiny-random").eval(), batch))


def test_gradients_reach_the_adapters_only():
    """Only A and B are in the optimizer. With B = 0, d loss / d A = B^T (...) = 0 at the first step,
    so the first step moves B and leaves A (and every base weight) exactly where they were."""
    learner, cfg = _learner("grpo.beta=0")
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    optimized = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
    trainable = [p for p in learner.model.parameters() if p.requires_grad]
    assert optimized == {id(p) for p in trainable} and len(trainable) == 2 * 7 * 2  # A, B x 7 linears x 2 layers
    _step(learner, cfg)
    for name, p in learner.model.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == (".lora_B." in name), name


def test_the_disabled_adapter_reference_equals_a_loaded_base_copy_bitwise():
    """After a step the policy has moved; the reference made of the learner's own model with peft's
    adapters disabled gives the log-probs of a separately loaded base, bit for bit, and leaves the
    policy (adapters enabled, trainable) as it was."""
    from rlpost.build import frozen_models
    from rlpost.lora import AdapterView
    from rlpost.objectives.grpo import GRPO
    from rollout.models import load_model
    learner, cfg = _learner("grpo.beta=0.1")
    _step(learner, cfg)
    reference = frozen_models(GRPO, cfg, learner)["reference"]
    assert isinstance(reference, AdapterView)  # no second copy of the weights
    batch = pack(_samples(1), pad_id=2)
    policy_before = _logp(learner.model, batch)
    base = _logp(load_model("tiny-random").eval(), batch)
    assert torch.equal(_logp(reference, batch), base)
    assert not torch.equal(policy_before, base)
    assert torch.equal(_logp(learner.model, batch), policy_before)
    assert all(p.requires_grad == (".lora_" in n) for n, p in learner.model.named_parameters())


def test_kl_is_zero_and_dpo_sees_what_a_loaded_reference_gives_at_the_first_step():
    """At step 1 the policy is the base (B = 0): GRPO's k3 KL to the disabled-adapter reference is
    exactly 0 per token (exp(0) - 0 - 1), and DPO's loss and implicit rewards are bit for bit those of
    full fine-tuning against a separately loaded reference (the same policy and reference numbers)."""
    learner, cfg = _learner("grpo.beta=0.1")
    _, stats = _step(learner, cfg)
    assert stats["kl"].total == 0.0 and stats["kl"].weight > 0
    runs = {}
    for lora in ("model.lora.r=4", "model.lora=null"):
        learner, cfg = _learner("algorithm=dpo", lora=lora)
        runs[lora] = _step(learner, cfg)[1]
    with_lora, full = runs.values()
    assert with_lora["loss"] == full["loss"] and with_lora["rewards/margins"] == full["rewards/margins"]
    assert with_lora["rewards/margins"].weight > 0 and with_lora["grad_norm"] > 0


# --- what the rollout engine receives ------------------------------------------------------------------

# float64 re-association: two orders of the same sums of at most a few thousand terms differ by about
# n eps |terms| (eps = 2.2e-16), under 1e-12 relative here; a missing or misplaced term (a wrong merge, a
# lost gradient path) moves results by >= 1e-4 relative in these batches. 1e-10 relative sits between,
# the same bound StreamBP's own float64 tests use (tests/test_streambp.py).
REL64 = 1e-10


def _float32_bound(model, batch):
    """How far a float32 forward of `model` may land from another float32 forward of the same maths in
    another order: 4x its own distance from the float64 forward (at least 64 ulps of the largest
    log-prob), since both land within rounding distance of the exact result."""
    truth = _logp(copy.deepcopy(model).double(), batch.to("cpu")).float()
    floor = 64 * torch.finfo(torch.float32).eps * float(truth.abs().max())
    return 4 * max(float((_logp(model, batch) - truth).abs().max()), floor)


def _random_adapters(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def test_merged_sync_equals_the_peft_forward(true_float64_norms):
    """float64: a plain copy of the base with the synced weights W + (alpha / r) B A loaded into the
    modules the sync names gives the peft model's log-probs to float64 rounding (W x + s B A x and
    (W + s B A) x differ by re-association only: REL64); the sync names the
    adapted modules and nothing else, and its tensors are peft's own merge_and_unload weights."""
    from rlpost import lora
    from rollout.hf_engine import HFEngine
    base = spec_model(0)
    model = lora.wrap(copy.deepcopy(base), LoraConfig(r=3, alpha=6.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    _random_adapters(model)
    merged = {f"{path}.weight": lora.merged_weight(layer).double() for path, layer in lora.adapted_modules(model)}
    assert sorted(merged) == sorted(f"model.layers.{i}.{m}.weight" for i in range(2)
                                    for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    peft_merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert all(torch.equal(t, peft_merged[name]) for name, t in merged.items())
    plain = copy.deepcopy(base)
    HFEngine.load_weights(type("E", (), {"model": plain})(), merged.items(), 1)
    batch = spec_batch()
    truth = _logp(model, batch)
    scale = float(truth.abs().max())
    assert float((_logp(plain, batch) - truth).abs().max()) <= REL64 * scale
    assert float((_logp(base, batch) - truth).abs().max()) > 1e4 * REL64 * scale  # the adapters matter


def test_the_learner_syncs_the_adapted_modules_merged():
    """The learner's weight sync, applied to the hf engine's own copy of the base, makes that copy's
    log-probs those of the learner's peft model within float32 re-association (_float32_bound)."""
    from rlpost import lora
    from rollout.hf_engine import HFEngine
    from rollout.models import load_model
    learner, _ = _learner("model.lora.target_modules=[q_proj, v_proj, up_proj]")
    _random_adapters(learner.model, scale=0.02)
    named = list(learner.named_weights())
    assert [n for n, _ in named] == [f"{p}.weight" for p, _ in lora.adapted_modules(learner.model)] and len(named) == 6
    engine = HFEngine(load_model("tiny-random"), learner_tokenizer())
    engine.load_weights(named, 1)
    batch = pack(_samples(2), pad_id=2)
    policy = _logp(learner.model, batch)
    assert float((_logp(engine.model, batch) - policy).abs().max()) <= _float32_bound(learner.model, batch)


def learner_tokenizer():
    from rollout.models import load_tokenizer
    return load_tokenizer("tiny-random")


# --- StreamBP -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [5, 37])
def test_streambp_is_exact_with_adapters_in_float64(chunk, true_float64_norms):
    """Loss and every adapter gradient under StreamBP equal plain autograd to REL64 (float64, relative
    norm per tensor), with random A and B (so both get a gradient) on every linear layer; the base gets none."""
    from rlpost import lora
    from rlpost.streambp import streamed_decoder
    from test_streambp import grpo_objective
    model = lora.wrap(spec_model(0), LoraConfig(r=2, alpha=4.0))
    _random_adapters(model, scale=0.2)
    batch = spec_batch()
    objective = grpo_objective("dapo", 0.0)
    out = {}
    for name, decoder in (("autograd", None), ("streambp", functools.partial(streamed_decoder, chunk_size=chunk))):
        model.zero_grad()
        kwargs = {} if decoder is None else {"decoder": decoder}
        logp = head_outputs(model, batch, lambda lg, y, c: {"logp": torch.log_softmax(lg, -1).gather(-1, y[..., None])[..., 0]},
                            chunk_size=8, **kwargs)["logp"]
        loss = objective(logp, batch, None)
        loss.backward()
        out[name] = float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads, streamed = out["autograd"][1], out["streambp"][1]
    assert grads.keys() == streamed.keys() and all(".lora_" in n for n in grads) and len(grads) == 28
    errors = _relative_errors(out["streambp"], out["autograd"])
    assert max(errors.values()) <= REL64, max(errors, key=errors.get)
    assert all(float(g.abs().max()) > 0 for g in grads.values())


# --- configuration errors ------------------------------------------------------------------------------

def test_bad_lora_settings_are_one_clear_line():
    from rlpost.learner import Learner
    with pytest.raises(ConfigError, match=r"model\.lora\.r: .*greater than or equal to 1"):
        load_config(None, ["model.lora.r=0"])
    cfg = load_config(None, ["model.name=tiny-random", "model.lora.target_modules=[q_proj, qkv_proj]"])
    with pytest.raises(ConfigError) as missing:
        Learner(cfg.model.name, cfg.train, lora=cfg.model.lora)
    message = str(missing.value)
    assert "model.lora.target_modules" in message and "'qkv_proj'" in message and "q_proj" in message and "down_proj" in message
    cfg = load_config(None, ["model.name=tiny-random", "model.lora.target_modules=[input_layernorm]"])
    with pytest.raises(ConfigError, match=r"model\.lora: peft cannot put LoRA adapters on this llama model .*not supported"):
        Learner(cfg.model.name, cfg.train, lora=cfg.model.lora)
    cfg = load_config(None, ["model.name=tiny-random", "model.lora.target_modules=[q_proj, lm_head]"])
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules: 'lm_head' is tied to the input embeddings"):
        Learner(cfg.model.name, cfg.train, lora=cfg.model.lora)
    with pytest.raises(ConfigError, match=r"model\.lora\.dropout must be 0 with train\.backward=streambp"):
        load_config(None, ["model.lora.dropout=0.1", "train.backward=streambp"])
    assert load_config(None, ["model.lora.r=16"]).model.lora == LoraConfig(r=16)  # any recipe takes it


def test_cli_bad_target_module_is_exit_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlpost.cli", "train", "configs/grpo_math.yaml", "--no-progress",
                           "--set", "model.name=tiny-random", "--set", f"run.output_dir={tmp_path}",
                           "--set", "model.lora.target_modules=[attention]"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rlpost train")]
    assert len(lines) == 1 and "no module named 'attention'" in lines[0] and "Traceback" not in proc.stderr


# --- real runs: resume, checkpoints, export, eval ---------------------------------------------------------

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6", "eval.num_prompts=4",
         "eval.pass_k=1", "train.micro_batch_size=4", "checkpoint.every=1", "checkpoint.keep_last=5",
         "grpo.dynamic_sampling=false", "data.arithmetic.train_size=50", "data.arithmetic.test_size=10",
         "reward.format_weight=0.5", "model.lora.r=4", "model.lora.alpha=8", "train.lr=1e-2"]


def _grpo(run_dir, steps, model, *extra, resume=None):
    from rlpost.trainer import train
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", [*SMALL, f"model.name={model}", f"run.output_dir={run_dir}",
                                                             f"train.max_steps={steps}", *extra])
    return train(cfg, resume=resume, show_progress=False)


def _adapter(run_dir, step):
    from safetensors.torch import load_file
    return load_file(run_dir / "checkpoints" / f"step_{step}" / "hf" / "adapter_model.safetensors")


def test_resume_is_exact_and_the_checkpoint_is_a_peft_adapter(tmp_path, digit_model):
    """2 steps + resume + 1 == 3 steps, bit for bit (adapters, and so the optimizer state that moved
    them); beta > 0, so the disabled-adapter reference is in every step. The checkpoint holds the
    adapters only (no base weight in hf/ or deepspeed/) and PeftModel.from_pretrained on the base
    reproduces the learner's policy bit for bit."""
    from peft import PeftModel
    from rollout.models import load_model
    from rlpost.metrics import read_metrics
    _grpo(tmp_path / "a", 3, digit_model, "grpo.beta=0.05", "eval.at_start=false")
    _grpo(tmp_path / "b", 2, digit_model, "grpo.beta=0.05", "eval.at_start=false")
    _grpo(tmp_path / "b", 3, digit_model, "grpo.beta=0.05", "eval.at_start=false",
          resume=str(tmp_path / "b" / "checkpoints" / "step_2"))
    a, b = _adapter(tmp_path / "a", 3), _adapter(tmp_path / "b", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], _adapter(tmp_path / "b", 2)[k]) for k in a)  # step 3 moved them
    assert {k.rsplit(".lora_", 1)[1] for k in a} == {"A.weight", "B.weight"}
    rows = {r["step"]: r for r in read_metrics(tmp_path / "a") if "loss" in r}
    assert rows[1]["kl"] == 0.0 and rows[3]["kl"] > 0  # B = 0 at step 1: the policy is the reference
    assert all(r["weight_sync_s"] > 0 for r in rows.values())
    step = tmp_path / "a" / "checkpoints" / "step_3"
    base_bytes = sum(p.numel() * 4 for p in load_model(digit_model).parameters())
    assert sum(f.stat().st_size for f in step.rglob("*") if f.is_file() and "tokenizer" not in f.name) < base_bytes / 4
    policy = PeftModel.from_pretrained(load_model(digit_model), str(step / "hf")).eval()
    hand = load_model(digit_model).eval()
    with torch.no_grad():  # the same policy by hand: W x + (alpha / r) B A x on every adapted module
        for key, A in a.items():
            if key.endswith("lora_A.weight"):
                path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                hand.get_submodule(path).weight += (a[path.join(("base_model.model.", ".lora_B.weight"))] @ A) * 2.0
    batch = pack(_samples(3), pad_id=2)
    assert float((_logp(policy, batch) - _logp(hand, batch)).abs().max()) <= _float32_bound(policy, batch)


def test_export_merge_eval_and_eval_of_the_adapter_checkpoint(tmp_path, digit_model):
    """`rlpost export CHECKPOINT --merge OUT` writes a plain HF folder (no adapter file) whose weights
    are peft's merge_and_unload of the checkpoint's adapter, bit for bit; `rlpost eval` on the adapter checkpoint
    reproduces the trainer's final eval exactly (the trainer's engine held W + s B A merged the same way)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from rollout.models import load_model
    summary = _grpo(tmp_path / "run", 2, digit_model, "eval.at_start=false")
    out = tmp_path / "merged"
    run = lambda *args: subprocess.run([sys.executable, "-m", "rlpost.cli", *args], cwd=REPO, capture_output=True,
                                       text=True, timeout=600, env=subprocess_env())
    proc = run("export", str(tmp_path / "run"), "--merge", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    peft = PeftModel.from_pretrained(load_model(digit_model), str(tmp_path / "run" / "checkpoints" / "step_2" / "hf"))
    expected = peft.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)
    proc = run("eval", "configs/grpo_math.yaml", "--checkpoint", str(tmp_path / "run"),
               *[x for s in SMALL + [f"model.name={digit_model}"] for x in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["accuracy"] == summary["eval_after"]["accuracy"]
    assert result["response_length"] == summary["eval_after"]["response_length"]
    assert run("export", str(tmp_path / "run"), "--merge", str(out)).returncode == 2  # not over a non-empty folder


# --- ZeRO stages and backward modes (every objective: tests/test_lora_objectives.py) --------------------


ZERO_SCRIPT = """
import json, sys, torch
sys.path.insert(0, "tests")
from rlpost.build import make_objective
from rlpost.config import load_config
from rlpost.learner import Learner
from test_lora import _groups
cfg = load_config(None, ["model.name=tiny-random", "train.zero_stage=%d", "train.backward=%s", "algorithm=%s",
                         "grpo.beta=0.1", "train.micro_batch_size=4", "train.lr=1e-2", "train.adam_eps=1.0",
                         "train.streambp_chunk_size=5", "model.lora.r=4", "model.lora.alpha=8"])
torch.manual_seed(0)
learner = Learner(cfg.model.name, cfg.train, lora=cfg.model.lora)
objective = make_objective(cfg, learner, pad_id=2)
stats = []
for step in range(2):  # step 2: the policy has moved, so the disabled-adapter reference is not the policy
    groups = _groups(step)
    out = learner.train_step(objective.micro_batches(groups, objective.advantages(groups), learner.version),
                             objective.head, objective.loss)
    stats.append({"grad_norm": out["grad_norm"], "loss": out["loss"]})
torch.save(dict(learner.trained_weights()), sys.argv[1])
print(json.dumps(stats))
"""


@pytest.mark.parametrize("objective", ["grpo", "dpo"])
def test_zero_stages_and_backward_modes_agree_with_lora(objective, tmp_path):
    """Two steps with LoRA (GRPO with beta 0.1 / DPO: both use the disabled-adapter reference) under ZeRO
    0, 2, 3 and with checkpointing / StreamBP: the same losses and gradient norms (rel 1e-4: float32
    summation order, as for full fine-tuning) and the same adapters. AdamW with eps = 1 moves a weight
    by lr g / (|g| + 1) at step 1 (slope <= 1 in g) and by at most about twice that sensitivity at step 2
    (the second-moment term changes the same way); with gradients equal to 1e-4 of the norm the
    adapters may differ by 3 lr 1e-4 norm, plus a rounding of w - update per step (|w| < 1: 2 ulp(1))."""
    cases = [(0, "autograd"), (2, "autograd"), (3, "autograd"), (3, "streambp")]
    cases += [(0, "checkpointing")] if objective == "grpo" else []
    out = {}
    for stage, backward in cases:
        path = tmp_path / f"{stage}-{backward}.pt"
        proc = subprocess.run([sys.executable, "-c", ZERO_SCRIPT % (stage, backward, objective), str(path)], cwd=REPO,
                              capture_output=True, text=True, env=subprocess_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[stage, backward] = json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(path)
    base_stats, base = out[0, "autograd"]
    norm = max(s["grad_norm"] for s in base_stats)
    tolerance = 3 * 1e-2 * 1e-4 * norm + 2 * 2 * 2.0 ** -23
    moved = max(float(w.abs().max()) for k, w in base.items() if ".lora_B." in k)  # B starts at 0
    assert moved > 100 * tolerance, (moved, tolerance)
    for key, (stats, weights) in out.items():
        for s, b in zip(stats, base_stats):
            assert s["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), key
            assert s["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), key
        assert weights.keys() == base.keys(), key
        for name, w in weights.items():
            assert float((w - base[name]).abs().max()) <= tolerance, (key, name)
