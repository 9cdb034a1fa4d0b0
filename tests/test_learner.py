"""The learner and the loss path on a real (tiny) model."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env
from rlpost.batch import head_outputs, pack, token_logprobs
from rlpost.config import load_config
from rlpost.objectives.grpo import GRPO
from rollout.types import FinishReason, Group, Sample


def _groups(seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = []
    for k, size in enumerate([3, 4, 2]):  # ragged groups
        samples = []
        for j in range(size):
            prompt = torch.randint(10, 1000, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
            response = torch.randint(10, 1000, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            samples.append(Sample(prompt, response, [-1.0] * len(response), FinishReason.STOP, reward=float((j + k) % 2)))
        groups.append(Group(prompt_id=k, prompt="", answer="", samples=samples))
    return groups


@pytest.mark.parametrize("aggregation", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_micro_batch_split_on_a_real_model(aggregation):
    """dapo is invariant to the micro-batch split on a real model; the other aggregations are defined per
    micro-batch, so they must at least run and give finite gradients."""
    from rollout.models import load_model
    model = load_model("tiny-random", dtype=torch.float64)
    results = []
    for size in (9, 4, 1):
        cfg = load_config(None, [f"train.micro_batch_size={size}", f"grpo.aggregation={aggregation}", "grpo.beta=0.1"])
        model.zero_grad()
        objective = GRPO(cfg, {"reference": load_model("tiny-random", dtype=torch.float64)}, pad_id=2)
        groups = _groups()
        micro_batches = objective.micro_batches(groups, objective.advantages(groups), version=0)
        total = 0.0
        for mb in micro_batches:
            loss, _ = objective.loss(mb, head_outputs(model, mb.packed, objective.head(mb)))
            loss.backward()
            total += loss.item()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert torch.isfinite(grads).all() and grads.abs().sum() > 0
        results.append((total, grads))
    if aggregation == "dapo":
        for total, grads in results[1:]:
            assert total == pytest.approx(results[0][0], rel=1e-10)
            assert torch.allclose(grads, results[0][1], rtol=1e-8, atol=1e-12)


def test_chunked_head_equals_full_logits():
    from rollout.models import load_model
    model = load_model("tiny-random")
    samples = [s for g in _groups() for s in g.samples]
    batch = pack(samples, pad_id=2)
    chunked, _ = token_logprobs(model, batch, temperature=0.7, chunk_size=3)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits
    P, T = batch.prompt_width, batch.response_mask.shape[1]
    full = torch.log_softmax(logits[:, P - 1:P - 1 + T] / 0.7, -1).gather(-1, batch.input_ids[:, P:, None]).squeeze(-1)
    mask = batch.response_mask.bool()
    assert torch.allclose(chunked[mask], full[mask], atol=1e-5)


STEP_SCRIPT = """
import json, sys, torch
from rlpost.config import load_config
from rlpost.learner import Learner
from rlpost.objectives.grpo import GRPO
sys.path.insert(0, "tests")
from test_learner import _groups
cfg = load_config(None, ["model.name=tiny-random", "train.zero_stage=%d", "train.micro_batch_size=4", "train.lr=1e-3",
                         "train.backward=%s", "train.streambp_chunk_size=5"])
learner = Learner(cfg.model.name, cfg.train)
groups = _groups()
if "%s" == "dpo":  # pairs from the verdicts, reference = the initial model
    from rlpost.objectives.dpo import DPO
    from rollout.models import load_model
    for g in groups:
        for s in g.samples:
            s.correct = s.reward > 0.5
    objective = DPO(cfg, {"reference": load_model("tiny-random")}, pad_id=2)
else:
    objective = GRPO(cfg, {}, pad_id=2)
stats = learner.train_step(objective.micro_batches(groups, objective.advantages(groups), 0), objective.head, objective.loss)
weights = dict(learner.named_weights())
print(json.dumps({"grad_norm": stats["grad_norm"], "q": weights["model.layers.0.self_attn.q_proj.weight"][:4, :4].tolist()}))
"""


@pytest.mark.parametrize("objective", ["grpo", "dpo"])
def test_zero_stages_agree(objective):
    """ZeRO 0, 2 and 3 take the same step from the same micro-batches (grads accumulate, not overwrite),
    with autograd and with StreamBP (whose parameters get their gradient once per micro-batch), for
    GRPO's token-level loss and DPO's sequence-level one."""
    out = {}
    for stage, backward in ((0, "autograd"), (2, "autograd"), (3, "autograd"), (2, "streambp"), (3, "streambp")):
        proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT % (stage, backward, objective)], cwd=REPO, capture_output=True,
                              text=True, env=subprocess_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[stage, backward] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = out[0, "autograd"]
    for key, result in out.items():
        assert result["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-4), key
        assert torch.allclose(torch.tensor(result["q"]), torch.tensor(base["q"]), atol=1e-6), key


SYNC_SCRIPT = """
import json, sys
from rlpost.config import load_config
from rlpost.learner import Learner
cfg = load_config(None, ["model.name=tiny-random", "train.zero_stage=3", "train.deepspeed_config=%s"])
learner = Learner(cfg.model.name, cfg.train)
params = dict(learner.model.named_parameters())
gathered, shapes_ok = [], True
for name, tensor in learner.named_weights(bucket_params=%d):
    gathered.append(sum(p.numel() > 0 for p in params.values()))  # a partitioned ZeRO-3 parameter is empty here
    shapes_ok &= tensor.numel() == params[name].ds_numel
print(json.dumps({"params": len(params), "yielded": len(gathered), "max_gathered": max(gathered),
                  "shapes_ok": bool(shapes_ok)}))
"""


def test_zero3_weight_sync_gathers_one_bucket_at_a_time(tmp_path):
    """The weights sent to the rollout engine come out whole, but under ZeRO-3 only one bucket of
    parameters is gathered at any moment, never the whole model."""
    config = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-c", SYNC_SCRIPT % (path, 600)], cwd=REPO, capture_output=True,
                          text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["yielded"] == out["params"] and out["shapes_ok"]
    assert out["max_gathered"] <= 3 < out["params"]  # 600 elements: at most a few small tensors together
