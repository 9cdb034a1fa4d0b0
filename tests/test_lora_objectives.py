"""LoRA with every objective (docs/lora.md): DPO, APO's adapter snapshots, AlignDistil's LoRA
teachers, the implicit PRM and PRIME, the reward model; each against what a full copy or peft's own
model gives. The shared helpers live in tests/test_lora.py."""
import json

import pytest
import torch

from conftest import REPO
from rlpost.batch import pack
from rlpost.config import load_config
from test_lora import SMALL, _learner, _logp, _random_adapters, _samples, _step
from test_streambp import true_float64_norms  # noqa: F401 - fixture


def _train(config, run_dir, *overrides, resume=None):
    from rlpost.trainer import train
    cfg = load_config(REPO / "configs" / config, [f"run.output_dir={run_dir}", "model.lora.r=4", "model.lora.alpha=8",
                                                   *overrides])
    return cfg, train(cfg, resume=resume, show_progress=False)


def _rows(run_dir):
    from rlpost.metrics import read_metrics
    return [r for r in read_metrics(run_dir) if "loss" in r]


def _preferences(tmp_path, conversational=False):
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": str(a + b), "rejected": str(a + b + 1 + a % 3)}
            for a in range(1, 9) for b in range(1, 4)]
    if conversational:  # the rows scripts/sample_pairs.py writes
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    path = tmp_path / ("conv.jsonl" if conversational else "prefs.jsonl")
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _dpo(tmp_path, name, model, steps, *extra):
    return _train("dpo_hh.yaml", tmp_path / name, f"model.name={model}", f"data.source={_preferences(tmp_path)}",
                  "data.held_out=4", "rollout.prompts_per_step=4", "train.micro_batch_size=4", "train.lr=1e-2",
                  f"train.max_steps={steps}", "checkpoint.every=1", *extra)


def test_dpo_with_lora_ties_every_pair_before_training(tmp_path, digit_model):
    """The pairwise eval's reference is the disabled-adapter base: before training the policy is that
    base bit for bit (B = 0), so every held-out pair is a tie (documented for full fine-tuning too);
    after two steps the adapters have moved and the ties are gone."""
    _, summary = _dpo(tmp_path, "dpo", digit_model, 2)
    assert summary["eval_before"]["ties"] == 1.0 and summary["eval_after"]["ties"] < 1.0
    assert all(r["grad_norm"] > 0 for r in _rows(tmp_path / "dpo"))


def test_apo_snapshots_are_adapter_snapshots(tmp_path, digit_model):
    """Rounds of one step: round 1's reference is pi_0 (start margin 0), round 2 extrapolates from the
    adapter snapshots pi_1 and pi_0 (alpha 0.3: start margin != 0). The objective's checkpoint state
    holds the snapshot as adapter tensors, not a model."""
    from rlpost import checkpoint as ckpt
    _dpo(tmp_path, "apo", digit_model, 2, "algorithm=apo", "apo.steps_per_round=1", "apo.pairs_per_group=1", "apo.alpha=0.3")
    rows = _rows(tmp_path / "apo")
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["round/start_margin"] == 0.0 and rows[1]["round/start_margin"] != 0.0
    latest = ckpt.load_trainer_state(ckpt.resolve_checkpoint(tmp_path / "apo"))["objective"]["latest"]
    assert latest and all(".lora_A." in k or ".lora_B." in k for k in latest)


def test_an_adapter_snapshot_computes_the_policy_it_copied(true_float64_norms):
    """APO's snapshot of the policy (base + a copy of the adapters, applied by forward hooks while peft's
    adapters are off) gives the learner's own log-probs bit for bit: the hooks do peft's operations."""
    learner, cfg = _learner("grpo.beta=0")
    _step(learner, cfg)
    _random_adapters(learner.model, scale=0.05)
    snapshot = learner.frozen_view(cfg.model.name, snapshot=True)
    batch = pack(_samples(5), pad_id=2)
    assert torch.equal(_logp(snapshot, batch), _logp(learner.model, batch))
    _random_adapters(learner.model, seed=1)  # the snapshot is a copy: it does not follow the policy
    assert not torch.equal(_logp(snapshot, batch), _logp(learner.model, batch))


def test_aligndistil_with_lora_teachers_on_the_same_base(tmp_path, digit_model):
    """Two LoRA teachers (DPO and reverse DPO) and a LoRA student on one base: the teachers are adapter
    views on the student's own base (no model copy), each computing what PeftModel.from_pretrained on
    a separately loaded base computes, bit for bit; the student trains, w sits far above its floor."""
    from peft import PeftModel
    from rlpost.build import frozen_models
    from rlpost.lora import AdapterView
    from rlpost.objectives.aligndistil import AlignDistil
    from rollout.models import load_model
    pairs = _preferences(tmp_path, conversational=True)
    teacher = [f"model.name={digit_model}", f"data.source={pairs}", "data.held_out=2", "train.max_steps=2", "train.lr=1e-2"]
    _train("dpo_hh.yaml", tmp_path / "dpo", *teacher)
    _train("dpo_hh.yaml", tmp_path / "rev", *teacher, "data.swap_pairs=true")
    hf = {t: tmp_path / t / "checkpoints" / "latest" / "hf" for t in ("dpo", "rev")}
    student = [f"model.name={digit_model}", "data.arithmetic.word_problems=false", "data.arithmetic.train_size=40",
               "data.arithmetic.test_size=8", "rollout.max_new_tokens=6", f"aligndistil.dpo_model={hf['dpo']}",
               f"aligndistil.reverse_model={hf['rev']}", "train.max_steps=2", "eval.num_prompts=4", "eval.at_start=false"]
    _train("aligndistil_math.yaml", tmp_path / "student", *student)
    rows = _rows(tmp_path / "student")
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    assert all(1.0 < r["distil/w_mean"] <= 2 * 15.0 + 1e-3 for r in rows), rows
    learner, cfg = _learner(f"aligndistil.dpo_model={hf['dpo']}", f"aligndistil.reverse_model={hf['rev']}",
                            "algorithm=aligndistil", f"model.name={digit_model}")
    teachers = frozen_models(AlignDistil, cfg, learner)
    batch = pack(_samples(6), pad_id=2)
    for name, folder in (("dpo", hf["dpo"]), ("reverse", hf["rev"])):
        assert isinstance(teachers[name], AdapterView)
        peft = PeftModel.from_pretrained(load_model(digit_model), str(folder)).eval()
        assert torch.equal(_logp(teachers[name], batch), _logp(peft, batch)), name
    assert not torch.equal(_logp(teachers["dpo"], batch), _logp(teachers["reverse"], batch))


def test_implicit_prm_and_prime_with_lora(tmp_path, digit_model):
    """The PRM's reference is its own base: r(y) = beta (log pi - log pi_ref) is exactly 0 at step 1
    (B = 0). PRIME's PRM is a second LoRA learner, saved as an adapter under prm/. `rlpost eval-rm
    --prm` takes the adapter checkpoint (its reference named in the checkpoint)."""
    from rlpost.eval_rm import main as eval_rm
    run = tmp_path / "prm"
    _train("prm_math.yaml", run, f"model.name={digit_model}", "data.arithmetic.word_problems=false",
           "data.arithmetic.train_size=40", "data.arithmetic.test_size=8", "rollout.max_new_tokens=6",
           "rollout.prompts_per_step=4", "train.max_steps=2", "train.lr=1e-2", "train.micro_batch_size=8", "eval.num_prompts=2")
    rows = _rows(run)
    assert rows[0]["prm/mean_reward"] == 0.0 and rows[0]["grad_norm"] > 0 and rows[1]["prm/mean_reward"] != 0.0
    steps = tmp_path / "steps.jsonl"
    steps.write_text("\n".join(json.dumps({"problem": f"What is {a} + 1?", "steps": [f"{a} + 1 = {a + 1 + s}"],
                                           "label": -1 if s == 0 else 0}) for a in range(4) for s in (0, 1)))
    assert eval_rm(["--prm", str(run), "--process", str(steps), "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "rm_eval.json").read_text())["process"]
    prime = tmp_path / "prime"
    _train("prime_math.yaml", prime, f"model.name={digit_model}", *[s for s in SMALL if not s.startswith("model.lora")],
           "train.max_steps=2", "grpo.accuracy_range=null", "prime.train.lr=1e-2", "eval.at_start=false")
    step = prime / "checkpoints" / "step_2"
    assert (step / "hf" / "adapter_config.json").is_file() and (step / "prm" / "hf" / "adapter_config.json").is_file()
    assert all("prm/loss" in r for r in _rows(prime))


@pytest.fixture(scope="module")
def lora_reward_model(tmp_path_factory):
    """A LoRA reward model trained 6 steps on "yes" over "no" (tiny-random), its config and summary."""
    tmp_path = tmp_path_factory.mktemp("rm")
    rows = [{"prompt": f"Question {i}: is {i} a number?", "chosen": " yes", "rejected": " no"} for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "rm.yaml"
    config.write_text(f"""
algorithm: reward_model
model: {{name: tiny-random}}
data: {{source: {tmp_path / 'pairs.jsonl'}, held_out: 8}}
rollout: {{scheduler: dataset, prompts_per_step: 8}}
train: {{max_steps: 6, lr: 1.0e-2, micro_batch_size: 16}}
eval: {{kind: pairwise, every: 0}}
checkpoint: {{every: 0}}
""")
    cfg, summary = _train(config, tmp_path / "run")
    return tmp_path, cfg, summary


def test_reward_model_with_lora_learns_and_loads_back(lora_reward_model):
    """A LoRA reward model: adapters plus the new score head (peft keeps a trainable copy) train, the
    checkpoint is an adapter folder, and load_classifier (what reward.models uses) scores held-out
    pairs as the trainer's pairwise eval ranked them: "yes" over "no" on every pair."""
    from rlpost.batch import sequence_scores
    from rlpost.build import _model_path, load_data
    from rollout.models import load_classifier
    tmp_path, cfg, summary = lora_reward_model
    assert summary["eval_after"]["accuracy"] == 1.0
    hf = tmp_path / "run" / "checkpoints" / "latest" / "hf"
    assert (hf / "adapter_config.json").is_file() and not (hf / "config.json").exists()
    model, tokenizer = load_classifier(_model_path(str(tmp_path / "run")))
    assert model.config.num_labels == 1
    data = load_data(cfg, tokenizer)
    pairs = [sorted(g.samples, key=lambda s: not s.correct) for g in data.responses.held_out]  # chosen first
    with torch.no_grad():
        scores = sequence_scores(model.eval(), pack([s for pair in pairs for s in pair], tokenizer.pad_token_id))
    assert len(pairs) == 8 and bool((scores[0::2] > scores[1::2]).all())

def test_eval_rm_classifier_takes_a_lora_reward_model(lora_reward_model):
    from rlpost.eval_rm import main as eval_rm
    tmp_path, _, _ = lora_reward_model
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"Question {i}: is {i} a number?", "chosen": " yes",
                                        "rejected": " no"}) + "\n" for i in range(100, 104)))
    assert eval_rm(["--classifier", str(tmp_path / "run"), "--pairwise", str(held), "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "rm_eval.json").read_text())["pairwise"]["accuracy"] == 1.0
