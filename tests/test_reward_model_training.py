"""algorithm: reward_model (rlpost/objectives/reward_model.py): its loss is TRL's RewardTrainer loss on
the same rewards (margin and centering included); a tiny reward model learns an easy preference end to
end, and its checkpoint loads with plain transformers, `reward.models` and `rlpost eval-rm` alike,
scoring as the trainer scored."""
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlpost.objectives.reward_model import bradley_terry_loss


def trl_loss(rewards_chosen, rewards_rejected, margin=None, center=None) -> torch.Tensor:
    """TRL's own RewardTrainer.compute_loss, run on a model stub that returns these rewards as logits."""
    from trl import RewardTrainer

    logits = torch.cat([rewards_chosen, rewards_rejected]).unsqueeze(-1)
    model = SimpleNamespace(training=True)
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(center_rewards_coefficient=center),
                              accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
                              _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"attention_mask": torch.ones(len(logits), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(trainer, lambda **kw: SimpleNamespace(logits=logits), inputs)


@pytest.mark.parametrize("margin, center", [(False, None), (True, None), (False, 0.01), (True, 0.5)])
def test_loss_equals_trl(margin, center):
    """float32 on both sides: the same formula in another order agrees to a few ulps of the loss (1e-6 rel)."""
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 3
    m = torch.rand(16, generator=g) if margin else None
    ours = bradley_terry_loss(chosen, rejected, m, center).mean()
    assert float(ours) == pytest.approx(float(trl_loss(chosen, rejected, m, center)), rel=1e-6)


def test_a_tiny_reward_model_learns_and_loads_back(tmp_path, capsys):
    """Chosen replies say "yes", rejected ones "no": 12 steps at lr 1e-3 separate them on held-out
    pairs (accuracy 0.0 with ties at step 0 would be wrong too: a fresh head ranks by chance). The
    checkpoint's hf/ then scores a training row in plain transformers as the trainer scores it."""
    from transformers import AutoModelForSequenceClassification

    from rlpost.batch import pack, sequence_scores
    from rlpost.cli import main
    from rlpost.config import load_config
    from rlpost.build import load_data
    from rlpost.metrics import read_metrics
    from rewards.reward_model import ModelReward
    from rollout.models import load_tokenizer

    rows = [{"prompt": f"Question {i}: is {i} a number?", "chosen": " yes", "rejected": " no", "margin": 0.5}
            for i in range(60)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "rm.yaml"
    config.write_text(f"""
algorithm: reward_model
run: {{output_dir: {tmp_path / 'run'}}}
model: {{name: tiny-random}}
data: {{source: {tmp_path / 'pairs.jsonl'}, held_out: 12}}
rollout: {{scheduler: dataset, prompts_per_step: 8}}
train: {{max_steps: 12, lr: 1.0e-3, micro_batch_size: 16}}
eval: {{kind: pairwise, every: 0}}
checkpoint: {{every: 0}}
""")
    assert main(["train", str(config), "--no-progress"]) == 0, capsys.readouterr().err
    rows = read_metrics(tmp_path / "run")
    final = [r for r in rows if "eval/accuracy" in r][-1]
    assert final["eval/accuracy"] == 1.0 and final["eval/ties"] == 0.0
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 12 and steps[-1]["rewards/accuracies"] == 1.0
    hf = tmp_path / "run" / "checkpoints" / "latest" / "hf"
    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    assert model.config.num_labels == 1
    # a training row, encoded as the dataset source encodes it: plain transformers pools the same token
    tokenizer = load_tokenizer(str(hf))
    data = load_data(load_config(config), tokenizer)
    rows_ = [s for g in data.responses.held_out[:3] for s in g.samples]
    packed = pack(rows_, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = sequence_scores(model, packed)
        plain = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                      position_ids=packed.position_ids).logits[:, 0]
    assert torch.allclose(ours, plain, rtol=1e-5, atol=1e-5)  # one float32 forward each: the same ops
    # reward.models takes the run dir; eval-rm takes the checkpoint as a classifier
    from rlpost.build import _model_path
    rm = ModelReward("rm", _model_path(str(tmp_path / "run")))
    yes, no = rm({"prompts": [[{"role": "user", "content": "Question 3: is 3 a number?"}]] * 2,
                  "completions": [[{"role": "assistant", "content": " yes"}], [{"role": "assistant", "content": " no"}]]})
    assert yes > no  # it learned the preference, and scores it through its chat template too
    pairs = tmp_path / "held.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}: is {i} a number?", "chosen": " yes",
                                         "rejected": " no"}) + "\n" for i in range(100, 104)))
    from rlpost.eval_rm import main as eval_rm
    assert eval_rm(["--classifier", str(tmp_path / "run"), "--pairwise", str(pairs), "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "rm_eval.json").read_text())
    assert report["pairwise"]["accuracy"] == 1.0, report
