"""A trained reward model as a reward: a frozen `AutoModelForSequenceClassification` with one label.

It scores what TRL's GRPOTrainer scores: the prompt messages plus the completion, rendered with the
reward model's own chat template and tokenizer (it may differ from the policy's, so the text is
re-tokenised), right-padded, the logit of the last real token. It has the call of a reward function
(rewards/functions.py) and runs in-process on the learner's device, in batches of `batch_size`.
"""
from __future__ import annotations

import torch

from rewards.functions import RewardFunctionError
from rollout.models import load_classifier


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

    def texts(self, prompts: list[list[dict]], completions: list[list[dict]]) -> list[str]:
        return [self.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, padding_side="right",
                                 add_special_tokens=False, return_tensors="pt").to(self.device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores

    def __call__(self, kwargs: dict, timeout: float | None = None) -> list[float]:
        return self.score_texts(self.texts(kwargs["prompts"], kwargs["completions"]))

    def close(self) -> None:
        pass
