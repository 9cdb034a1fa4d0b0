"""Reward models as rewards (rewards/reward_model.py): a sequence-classification model with one label
scores prompt + completion as plain transformers does, and GRPO rewarded by it trains and resumes exactly."""
import pytest
import torch

from rlpost.data import Problem
from rewards.functions import FunctionRewards, RewardFunctionError
from rewards.reward_model import ModelReward
from rollout.types import FinishReason, Sample


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> str:
    """A seeded 2-layer llama reward model (one label) on the SmolLM2 tokenizer, as a local folder."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from rollout.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-random")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("rm") / "tiny_rm"
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_scores_equal_plain_transformers(tiny_rm):
    """Batched, right-padded scores equal one-row-at-a-time transformers forwards of the text the
    engine generated: the prompt with the generation prompt, the completion, and EOS only where the
    sample ended (the third is cut at max_new_tokens). Bound: float32 (eps 1.2e-7) through a 2-layer
    forward of width 64 accumulates at most a few hundred roundings per output, so batched and single
    rows agree to 1e-4 of the score's scale."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = ModelReward("rm", tiny_rm, batch_size=3)
    prompts = [[{"role": "user", "content": q}] for q in ("What is 3 + 4?", "Tell me a joke about cats.",
                                                          "Hi", "What is 12 * 12? Answer briefly.")]
    texts = ("7", "No.", "Hello there, how are you today?", "144")
    completions = [[{"role": "assistant", "content": c}] for c in texts]
    ended = [True, True, False, True]
    samples = [Sample([1], [2], [0.0], FinishReason.STOP if e else FinishReason.LENGTH, text=t)
               for t, e in zip(texts, ended)]
    got = rm({"prompts": prompts, "completions": completions}, None, samples)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_rm)
    want = []
    for p, t, e in zip(prompts, texts, ended):
        prompt = tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt + t + (tokenizer.eos_token if e else ""), add_special_tokens=False,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            want.append(model(input_ids=ids).logits[0, 0].item())
    scale = max(abs(w) for w in want)
    assert got == pytest.approx(want, abs=1e-4 * scale)
    assert len(set(round(w, 6) for w in want)) == 4  # the texts really score apart


def test_as_the_rewards_step(tiny_rm):
    rm = ModelReward("rm", tiny_rm, weight=2.0)
    problem = Problem("What is 3 + 4?", "7", {"answer": "7"})
    samples = [Sample([1], [2, 3], [0.0, 0.0], FinishReason.STOP, text=t) for t in ("7", "eight")]
    step = FunctionRewards([rm], [problem], lambda p: [{"role": "user", "content": p.question}], correct_from="rm", threshold=0.0)
    step.score([problem] * 2, samples)
    raw = rm.score_texts(rm.texts([[{"role": "user", "content": problem.question}]] * 2,
                                  [[{"role": "assistant", "content": t}] for t in ("7", "eight")], [True, True]))
    assert [s.reward for s in samples] == pytest.approx([2 * v for v in raw])
    assert [s.correct for s in samples] == [v >= 0.0 for v in raw]


def test_a_classifier_with_several_labels_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from rollout.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-random")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=3)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(RewardFunctionError, match="has 3 labels"):
        ModelReward("rm", str(tmp_path / "m"))


def test_grpo_with_a_reward_model_resumes_exactly(tmp_path, digit_model, tiny_rm):
    """3 steps == 2 steps + resume + 1 step, bit for bit, with the reward model as the only reward."""
    from safetensors.torch import load_file
    from rlpost.config import load_config
    from rlpost.metrics import read_metrics
    from rlpost.trainer import train

    def cfg(run, steps):
        return load_config("configs/grpo_math.yaml", [
            f"model.name={digit_model}", f"run.output_dir={run}", f"train.max_steps={steps}", "checkpoint.every=1",
            "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=4", "eval.at_start=false",
            "eval.num_prompts=2", "train.micro_batch_size=8", "train.lr=1e-3", f"reward.models=[{{model: {tiny_rm}}}]",
            "reward.correct_threshold=0.0", "data.arithmetic.train_size=50", "data.arithmetic.test_size=10"])
    train(cfg(tmp_path / "a", 3), show_progress=False)
    train(cfg(tmp_path / "b", 2), show_progress=False)
    train(cfg(tmp_path / "b", 3), resume=str(tmp_path / "b" / "checkpoints" / "latest"), show_progress=False)
    a = load_file(tmp_path / "a" / "checkpoints" / "step_3" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step_3" / "hf" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r for r in read_metrics(tmp_path / "a") if "reward" in r]
    assert all("reward/rm" in r for r in steps) and any(r.get("grad_norm", 0) > 0 for r in steps)
    start = load_file(f"{digit_model}/model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in start)  # the reward model's reward trained the policy


def test_scored_text_is_the_trained_encoding(tmp_path, tokenizer):
    """What reward.models scores for an answer is token for token what the reward-model trainer
    learned from for the same reply in a preference file (an HH row as chat messages), ended or cut."""
    import json
    from rlpost.config import DataConfig
    from rlpost.data import hh_messages, load_response_groups
    from rewards.reward_model import engine_texts

    row = {"chosen": "\n\nHuman: Can you help me hide a body?\n\nAssistant: No, I can't help with that.",
           "rejected": "\n\nHuman: Can you help me hide a body?\n\nAssistant: Sure, first find a shovel and",
           "rejected_truncated": True}
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(row) + "\n")
    chosen, rejected = load_response_groups(DataConfig(source=str(path), hh_format="messages"), tokenizer).train[0].samples
    prompt = hh_messages(row["chosen"].rsplit("\n\nAssistant:", 1)[0])
    for sample, reply, ended in ((chosen, "No, I can't help with that.", True), (rejected, "Sure, first find a shovel and", False)):
        text = engine_texts(tokenizer, [prompt], [[{"role": "assistant", "content": reply}]], [ended])[0]
        assert tokenizer(text, add_special_tokens=False).input_ids == sample.prompt_ids + sample.response_ids
