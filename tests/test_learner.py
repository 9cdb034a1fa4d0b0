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
from test_streambp import true_float64_norms  # noqa: F401 - fixture


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


def test_aggregations_by_their_definitions_on_a_real_model(true_float64_norms):
    """Every aggregation (ALGORITHMS.md §1), float64, micro-batches of 9 (one), 4 (4 + 4 + 1) and 1
    row, grad_accum_steps = their number. From the definitions, for the same per-token losses l:
    - dapo, sum(l) / N_tokens, does not depend on the split;
    - bnpo over one micro-batch is that same sum(l) / N_tokens;
    - grpo over one-row micro-batches: each row's token mean / 9, the same as bnpo there;
    - dr_grpo, sum(l) / (rows * L_max) / GA, is sum(l) / (9 L_max) for 9 x 1 and 1 x 9 rows alike,
      i.e. dapo * N_tokens / (9 L_max);
    and grpo over one micro-batch (a mean of row means) differs from bnpo (ragged rows): the
    identities above are not trivially true. Loss and every gradient element, to float64 rounding
    (the norms too run in float64: transformers' own RMSNorm rounds to float32)."""
    from rollout.models import load_model
    model = load_model("tiny-random", dtype=torch.float64)
    reference = load_model("tiny-random", dtype=torch.float64)
    groups = _groups()
    n_tokens = sum(len(s.response_ids) for g in groups for s in g.samples)
    out = {}
    for aggregation in ("dapo", "grpo", "bnpo", "dr_grpo"):
        for size in (9, 4, 1):
            cfg = load_config(None, [f"train.micro_batch_size={size}", f"grpo.aggregation={aggregation}", "grpo.beta=0.1"])
            model.zero_grad()
            objective = GRPO(cfg, {"reference": reference}, pad_id=2)
            micro_batches = objective.micro_batches(groups, objective.advantages(groups), version=0)
            assert len(micro_batches) == {9: 1, 4: 3, 1: 9}[size]
            total = 0.0
            for mb in micro_batches:
                loss, _ = objective.loss(mb, head_outputs(model, mb.packed, objective.head(mb)))
                loss.backward()
                total += loss.item()
            out[aggregation, size] = total, torch.cat([p.grad.flatten() for p in model.parameters()])
    l_max = cfg.rollout.max_new_tokens

    def same(a, b, factor=1.0):
        assert a[0] * factor == pytest.approx(b[0], rel=1e-10)
        torch.testing.assert_close(a[1] * factor, b[1], rtol=1e-8, atol=1e-12)

    for size in (4, 1):
        same(out["dapo", size], out["dapo", 9])
    same(out["bnpo", 9], out["dapo", 9])
    same(out["grpo", 1], out["bnpo", 1])
    same(out["dr_grpo", 1], out["dr_grpo", 9])
    same(out["dapo", 9], out["dr_grpo", 9], factor=n_tokens / (9 * l_max))
    assert abs(out["grpo", 9][0] - out["bnpo", 9][0]) > 1e-3 * abs(out["bnpo", 9][0])
    assert out["dapo", 9][1].abs().sum() > 0


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
cfg = load_config(None, ["model.name=tiny-random", "train.zero_stage=%d", "train.micro_batch_size=4", "train.lr=1e-2",
                         "train.backward=%s", "train.streambp_chunk_size=5", "train.adam_eps=1.0"])
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
torch.save(dict(learner.named_weights()), sys.argv[1])
print(json.dumps({"grad_norm": stats["grad_norm"]}))
"""


@pytest.mark.parametrize("objective", ["grpo", "dpo"])
def test_zero_stages_agree(objective, tmp_path):
    """ZeRO 0, 2 and 3 take the same step from the same micro-batches (grads accumulate, not overwrite),
    with autograd and with StreamBP (whose parameters get their gradient once per micro-batch), for
    GRPO's token-level loss and DPO's sequence-level one. Every weight is compared.

    AdamW runs with eps = 1, so its first step moves a weight by lr * g / (|g| + 1), with slope <= 1
    in g: the weights carry the (clipped) gradient itself, not only its sign. Between two runs the
    gradients differ only by float32 summation order (ZeRO's buckets, StreamBP's chunks), <= 1e-4
    of the clipped norm per element, so the weights may differ by lr * 1e-4 * min(norm, 1) plus one
    rounding of w - update in each run (|w| < 2: 2 ulp(1)). A lost or overwritten micro-batch
    moves the gradient by O(itself): the step moves weights 100x beyond the bound (checked)."""
    from rollout.models import load_model
    out = {}
    for stage, backward in ((0, "autograd"), (2, "autograd"), (3, "autograd"), (2, "streambp"), (3, "streambp")):
        path = tmp_path / f"{stage}-{backward}.pt"
        proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT % (stage, backward, objective), str(path)], cwd=REPO,
                              capture_output=True, text=True, env=subprocess_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[stage, backward] = json.loads(proc.stdout.strip().splitlines()[-1])["grad_norm"], torch.load(path)
    base_norm, base = out[0, "autograd"]
    tolerance = 1e-2 * 1e-4 * min(base_norm, 1.0) + 2 * 2.0 ** -23  # lr 1e-2
    initial = dict(load_model("tiny-random").named_parameters())
    moved = max(float((base[k] - initial[k].detach()).abs().max()) for k in base)
    assert moved > 100 * tolerance, (moved, tolerance)
    for key, (norm, weights) in out.items():
        assert norm == pytest.approx(base_norm, rel=1e-4), key
        assert weights.keys() == base.keys(), key
        for name, w in weights.items():
            diff = float((w - base[name]).abs().max())
            assert diff <= tolerance, (key, name, diff, tolerance)


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


REINIT_SCRIPT = """
import torch
from rlpost.config import load_config
from rlpost.learner import Learner
cfg = load_config(None, ["model.name=tiny-random"])
Learner(cfg.model.name, cfg.train)
torch.distributed.destroy_process_group()  # what vLLM's in-process engine does when it shuts down
Learner(cfg.model.name, cfg.train)
print("second learner ok")
"""


def test_a_second_learner_after_the_default_group_was_destroyed():
    """A second run in one process (a notebook, the test suite) after something else destroyed the
    default process group behind DeepSpeed's back (vLLM's in-process engine does, on shutdown):
    the new learner starts on a fresh group, not DeepSpeed's dead clone of the old one."""
    proc = subprocess.run([sys.executable, "-c", REINIT_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "second learner ok" in proc.stdout
