"""Components from the config: the one place that maps config values to classes, so the trainer
itself has no branch per method, scheduler or sampler."""
from __future__ import annotations

import torch

from rlpost.config import Config, ConfigError
from rlpost.curriculum import CuresSampler, UniformSampler
from rlpost.data import PromptSet, load_response_groups
from rlpost.objectives import objective_class
from rollout.models import load_model
from rollout.source import AprilSource, DatasetSource, SyncSource
from rollout.types import SamplingParams, UserError


def make_sampler(cfg: Config, num_prompts: int):
    c = cfg.curriculum
    if c.sampler == "cures":
        return CuresSampler(num_prompts, cfg.run.seed, cfg.rollout.group_size, c.tau_mode, c.tau, c.allocation,
                            c.k_min, init_rollouts=c.init_rollouts)
    return UniformSampler(num_prompts, cfg.run.seed, cfg.rollout.group_size)


def make_source(cfg: Config, engine, prompts: PromptSet, tokenizer, reward, keep, grad_norms=None):
    """rollout.scheduler: sync | april (prompts from the curriculum's sampler, answers from `engine`) |
    dataset (fixed responses from data.source, its rows in uniform epochs)."""
    r = cfg.rollout
    params = SamplingParams(r.max_new_tokens, r.temperature, r.top_p)
    try:
        if r.scheduler == "dataset":
            groups = load_response_groups(cfg.data, tokenizer)
            return DatasetSource(groups, UniformSampler(len(groups), cfg.run.seed), r.prompts_per_step)
        sampler = make_sampler(cfg, len(prompts))
        if r.scheduler == "april":
            return AprilSource(engine, sampler, prompts, params, r.prompts_per_step, reward, tokenizer,
                               submit_groups=r.april_submit_groups, keep=keep, grad_norms=grad_norms)
    except UserError as e:
        raise ConfigError(str(e)) from None
    return SyncSource(engine, sampler, prompts, params, r.prompts_per_step, reward, grad_norms)


def make_objective(cfg: Config, device: torch.device, pad_id: int):
    """The objective of `algorithm:`, with the frozen models it asks for loaded once, in eval mode."""
    cls = objective_class(cfg)
    frozen = {name: load_model(spec).to(device).eval() for name, spec in cls.frozen_models(cfg).items()}
    return cls(cfg, frozen, pad_id)
