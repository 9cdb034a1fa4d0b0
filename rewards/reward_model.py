"""A trained reward model as a reward: a frozen `AutoModelForSequenceClassification` with one label.

It scores the prompt messages plus the completion, rendered with the reward model's own chat template
and tokenizer (it may differ from the policy's, so the text is re-tokenised), right-padded, the logit
of the last real token. Where it departs from TRL's GRPOTrainer: TRL renders the whole conversation,
so every completion ends with the template's closing of the turn (SmolLM2: "<|im_end|>\n"), also one
cut off at max_new_tokens. Here the text is what the engine generated: the prompt with the generation
prompt, the completion, and the EOS token only when the policy generated one. That is exactly the
encoding rlpost's reward-model trainer learns from (rlpost.data.response_ids), and where the pad token
is not the EOS token it lets the reward model tell a finished answer from a truncated one (SmolLM2
pads with its EOS, so both pool at the answer's last token). It has the call of a reward function
(rewards/functions.py) and runs in-process on the learner's device, in batches of `batch_size`.
"""
from __future__ import annotations

import torch

from rewards.functions import RewardFunctionError
from rollout.models import load_classifier
from rollout.types import FinishReason, Sample


def engine_texts(tokenizer, prompts: list[list[dict]], completions: list[list[dict]], ended: list[bool]) -> list[str]:
    """prompt (with the generation prompt) + the completion's text (+ EOS where the policy ended it)."""
    eos = tokenizer.eos_token or ""
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            + "".join(m["content"] for m in c) + (eos if e else "") for p, c, e in zip(prompts, completions, ended)]


class ModelReward:
    isolate = False  # a model on the learner's device, not user code

    def __init__(self, name: str, spec: str, weight: float = 1.0, batch_size: int = 8,
                 device: torch.device | str = "cpu"):
        self.name, self.spec, self.weight, self.batch_size, self.device = name, spec, weight, batch_size, device
        self.model, self.tokenizer = load_classifier(spec)  # its pad token is the tokenizer's: the last real token pools
        if self.model.config.num_labels != 1:
            raise RewardFunctionError(f"reward model {spec!r} has {self.model.config.num_labels} labels; a reward "
                                      "model has one (AutoModelForSequenceClassification with num_labels=1)")
        if not self.tokenizer.chat_template:
            raise RewardFunctionError(f"reward model {spec!r}: its tokenizer has no chat template to render "
                                      "prompt + completion with")
        self.model.to(device).eval().requires_grad_(False)

    def texts(self, prompts: list[list[dict]], completions: list[list[dict]], ended: list[bool]) -> list[str]:
        return engine_texts(self.tokenizer, prompts, completions, ended)

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, padding_side="right",
                                 add_special_tokens=False, return_tensors="pt").to(self.device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores

    def __call__(self, kwargs: dict, timeout: float | None = None, samples: list[Sample] | None = None) -> list[float]:
        ended = [s.finish_reason == FinishReason.STOP for s in samples] if samples else [True] * len(kwargs["prompts"])
        return self.score_texts(self.texts(kwargs["prompts"], kwargs["completions"], ended))

    def close(self) -> None:
        pass
