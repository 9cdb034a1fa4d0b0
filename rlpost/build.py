"""Components from the config: the one place that maps config values to classes, so the trainer
itself has no branch per method, scheduler, sampler or data kind."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from rlpost.batch import pack
from rlpost.config import Config, ConfigError
from rlpost.curriculum import CuresSampler, ShardSampler, UniformSampler
from rlpost.data import PromptSet, ResponseSet, load_prompt_sets, load_response_groups
from rlpost.evaluate import PairwiseEval, run_eval
from rlpost.objectives import objective_class
from rollout.engine import make_engine, resolve_engine
from rollout.models import load_model
from rollout.source import AprilSource, AsyncSource, DatasetSource, RoundSource, SyncSource
from rollout.types import SamplingParams, UserError, world


@dataclass
class RunData:
    """Prompts to generate from (sync / april), or fixed responses (dataset), with their held-out part."""
    train_prompts: PromptSet | None = None
    test_prompts: PromptSet | None = None
    responses: ResponseSet | None = None

    def summary(self) -> dict:
        if self.responses is not None:
            r = self.responses
            return {"train_rows": len(r.train), "held_out_rows": len(r.held_out), "skipped_rows": r.skipped,
                    "truncated_rows": r.truncated}
        return {"train_prompts": len(self.train_prompts), "test_prompts": len(self.test_prompts),
                "skipped_rows": self.train_prompts.skipped + self.test_prompts.skipped,
                "prompts_too_long": self.train_prompts.too_long + self.test_prompts.too_long}


def load_data(cfg: Config, tokenizer) -> RunData:
    if cfg.rollout.scheduler == "dataset":
        return RunData(responses=load_response_groups(cfg.data, tokenizer, cfg.run.seed))
    train, test = load_prompt_sets(cfg.data, tokenizer, cfg.run.seed)
    return RunData(train, test)


class NoEngine:
    """The dataset source generates nothing: no second copy of the model, no weight sync."""
    version = 0

    def generate(self, prompts, params):
        raise RuntimeError("rollout.scheduler=dataset has no rollout engine")

    def load_weights(self, named_tensors, version: int) -> None:
        self.version = version

    def close(self) -> None:
        pass


class FixedPolicy:
    """An engine whose weights stay those it was loaded with: for objectives that train another model
    than the one that samples (an implicit PRM learns from a fixed policy's samples)."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def load_weights(self, named_tensors, version: int) -> None:
        pass


def make_rollout_engine(cfg: Config, tokenizer, learner, data: RunData):
    """The engine in this process (placement colocated; with rollout.shared_model on the learner's own
    module), or the rollout workers' pool (workers)."""
    r = cfg.rollout
    device = learner.engine.device
    if r.scheduler == "dataset":
        return NoEngine()
    kind = resolve_engine(r.engine)
    trains_the_sampler = getattr(objective_class(cfg), "trains_the_sampler", True)
    shared = r.shared_model
    if shared is None:  # wherever it works: the same run bit for bit (tests/test_shared_engine.py), one copy less
        shared = kind == "hf" and r.placement == "colocated" and trains_the_sampler and learner.zero_stage != 3
    if shared:
        if not trains_the_sampler:
            raise ConfigError(f"rollout.shared_model=true: algorithm={cfg.algorithm} samples from a fixed policy, "
                              f"not the model it trains; use rollout.shared_model=false")
        if learner.zero_stage == 3:
            raise ConfigError("rollout.shared_model=true: under ZeRO-3 the learner holds a shard of each weight; "
                              "use rollout.shared_model=false (a whole copy receives the weights each step)")
        from rollout.hf_engine import SharedHFEngine
        return SharedHFEngine(learner.model, tokenizer, max_batch_size=r.max_batch_size, tokens_per_step=r.tokens_per_step,
                              share_prompts=r.share_prompts)
    longest = max(data.train_prompts.longest(), data.test_prompts.longest())
    options = {"max_batch_size": r.max_batch_size, "tokens_per_step": r.tokens_per_step, "share_prompts": r.share_prompts,
               **cfg.vllm_options(longest)}
    if r.placement == "workers":
        from rollout.workers import WorkerPool, worker_specs
        cores = os.cpu_count() or 2
        threads = r.worker_threads or max(1, cores // (r.workers + 1))
        if device.type == "cpu":  # the learner and the workers split the cores instead of fighting over them
            torch.set_num_threads(r.learner_threads or max(1, cores - r.workers * threads))
        try:
            engine = WorkerPool(worker_specs(kind, cfg.model.name, r.worker_devices, r.workers, threads, options,
                                             cfg.run.seed), timeout_s=r.worker_timeout_s, restart=r.restart_workers)
        except UserError as e:
            raise ConfigError(str(e)) from None
    else:
        engine = make_engine(kind, cfg.model.name, tokenizer, device, seed=cfg.run.seed, **options)
    return engine if trains_the_sampler else FixedPolicy(engine)


def make_sampler(cfg: Config, num_prompts: int):
    """curriculum.sampler over `num_prompts` prompts. APRIL on several ranks streams each rank's own
    share of the prompts (prompt k belongs to rank k % world): a ShardSampler around the sampler."""
    rank, world_size = world()
    if cfg.rollout.scheduler == "april" and world_size > 1:
        ids = list(range(num_prompts))[rank::world_size]
        if not ids:
            raise ConfigError(f"{num_prompts} training prompts cannot be shared by {world_size} ranks")
        return ShardSampler(_sampler(cfg, len(ids)), ids)
    return _sampler(cfg, num_prompts)


def _sampler(cfg: Config, num_prompts: int):
    c = cfg.curriculum
    if c.sampler == "cures":
        return CuresSampler(num_prompts, cfg.run.seed, cfg.rollout.group_size, c.tau_mode, c.tau, c.allocation,
                            c.k_min, init_rollouts=c.init_rollouts)
    return UniformSampler(num_prompts, cfg.run.seed, cfg.rollout.group_size)


def make_source(cfg: Config, engine, data: RunData, tokenizer, reward, keep, learner=None):
    """rollout.scheduler: sync | april (prompts from the curriculum's sampler, answers from `engine`) |
    dataset (fixed responses, rows in uniform epochs); with rollout.placement=workers the workers' async
    source. An objective that trains in rounds (APO) gets new groups only on the first step of each
    round. A sampler that wants per-response gradient norms (CurES's grad_norm allocation) gets them
    from `learner` (an extra forward)."""
    r = cfg.rollout
    params = SamplingParams(r.max_new_tokens, r.temperature, r.top_p)
    try:
        if r.scheduler == "dataset":
            groups = data.responses.train
            source = DatasetSource(groups, UniformSampler(len(groups), cfg.run.seed), r.prompts_per_step)
        else:
            sampler = make_sampler(cfg, len(data.train_prompts))
            grad_norms = None
            if sampler.wants_grad_norms and learner is not None:
                def grad_norms(samples):
                    return learner.head_gradient_norms(pack(samples, tokenizer.pad_token_id), r.temperature)
            common = (engine, sampler, data.train_prompts, params, r.prompts_per_step, reward)
            if r.scheduler == "april":
                workers = r.placement == "workers"  # then async when max_staleness > 0 (rollout/april.py)
                source = AprilSource(*common, tokenizer, submit_groups=r.april_submit_groups, keep=keep,
                                     grad_norms=grad_norms, max_staleness=r.max_staleness if workers else None,
                                     keep_running=workers and r.max_staleness > 0, max_waves=r.april_max_waves)
            elif r.placement == "workers":
                source = AsyncSource(*common, max_staleness=r.max_staleness, seed=cfg.run.seed, grad_norms=grad_norms)
            else:
                source = SyncSource(*common, grad_norms, seed=cfg.run.seed if r.seed_requests else None)
    except UserError as e:
        raise ConfigError(str(e)) from None
    rounds = getattr(objective_class(cfg), "steps_per_round", None)
    return RoundSource(source, rounds(cfg)) if rounds and rounds(cfg) > 1 else source


def model_head(cfg: Config) -> str:
    """What the learner trains: "lm" (a causal LM, every method but one) or "score" (a reward model)."""
    return getattr(objective_class(cfg), "model_head", "lm")


def frozen_models(cls: type, cfg: Config, learner) -> dict[str, torch.nn.Module]:
    """The frozen models objective `cls` asks for, each once, in eval mode on the learner's device. With
    LoRA the learner decides which are made of its own base instead of a second copy (the reference
    when it is the initial policy, APO's snapshots of the policy, LoRA teachers on the same base)."""
    snapshots = getattr(cls, "policy_snapshots", ())
    out = {}
    for name, spec in cls.frozen_models(cfg).items():
        view = learner.frozen_view(spec, snapshot=name in snapshots)
        out[name] = view if view is not None else load_model(spec).to(learner.engine.device).eval()
    return out


def make_objective(cfg: Config, learner, pad_id: int):
    """The objective of `algorithm:` with its frozen models. `learner.trained_weights()` gives the
    policy's current trained tensors (APO snapshots them at round starts)."""
    cls = objective_class(cfg)
    return cls(cfg, frozen_models(cls, cfg, learner), pad_id, learner.trained_weights)


def make_verifier(cfg: Config, data: RunData):
    """What decides `correct`: the math verifier, or the user's reward functions and reward models
    (which then are the whole outcome reward). The functions are imported and checked first, before
    any model loads; the reward models load frozen on the learner's device."""
    r = cfg.reward
    if not r.user_scorers:
        from rewards.math import MathReward
        return MathReward(timeout_s=r.timeout_s, format_weight=r.format_weight)
    from functools import partial

    from rlpost.data import prompt_messages
    from rlpost.learner import device
    from rewards.functions import FunctionRewards, RewardFunction, check_signature
    from rewards.reward_model import ModelReward
    problems, names = data.train_prompts.problems, iter(r.scorer_names())
    columns = sorted({k for p in problems + data.test_prompts.problems for k in p.columns})
    scorers = []
    for f in r.functions or []:
        scorers.append(RewardFunction(next(names), f.fn, f.weight, f.isolate))
        check_signature(scorers[-1].fn, f.fn, columns)
    for m in r.models or []:
        scorers.append(ModelReward(next(names), _model_path(m.model), m.weight, m.batch_size, device()))
    return FunctionRewards(scorers, problems, partial(prompt_messages, cfg=cfg.data),
                           correct_from=r.correct_from or scorers[0].name, threshold=r.correct_threshold,
                           on_error=r.on_error, timeout_s=r.timeout_s, max_new_tokens=cfg.rollout.max_new_tokens,
                           overlong=r.overlong_penalty, overlong_cache=r.overlong_cache)


def _model_path(spec: str) -> str:
    """A model spec, or an rlpost checkpoint (run dir, step dir, `latest`): its `hf/` folder."""
    from pathlib import Path

    from rlpost.checkpoint import STATE_FILE, resolve_checkpoint
    path = Path(spec).expanduser()
    if (path / STATE_FILE).is_file() or (path / "checkpoints" / "latest").is_symlink():
        return str(resolve_checkpoint(path) / "hf")
    return spec


def make_rewards(cfg: Config, verifier):
    """The rewards step: the verifier's outcome reward, or the reward functions (see make_verifier)."""
    from rewards.outcome import OutcomeReward
    return verifier if cfg.reward.user_scorers else OutcomeReward(
        verifier, max_new_tokens=cfg.rollout.max_new_tokens, overlong_penalty=cfg.reward.overlong_penalty,
        overlong_cache=cfg.reward.overlong_cache)


def make_dense_rewards(cfg: Config, pad_id: int):
    """Dense token rewards on the kept groups: with prime.coef > 0, PRIME's implicit PRM, trained
    online (a second Learner); otherwise nothing."""
    from rlpost.prime import NoDense, PrimeDense
    if cfg.prime.coef == 0:
        return NoDense()
    from rlpost.learner import Learner
    from rlpost.objectives.implicit_prm import ImplicitPRM
    prm_train = cfg.prime.train or cfg.train.model_copy(update={"lr": 1e-6})
    learner = Learner(cfg.prime.model or cfg.model.name, prm_train, lora=cfg.model.lora)
    prm = ImplicitPRM(cfg, frozen_models(ImplicitPRM, cfg, learner), pad_id)
    return PrimeDense(learner, prm, cfg.prime.update, prm_train.micro_batch_size)


def make_evaluator(cfg: Config, engine, data: RunData, verifier, policy: torch.nn.Module | None, device,
                   pad_id: int, learner=None) -> Callable[[], dict]:
    """eval.kind: accuracy (`engine` generates on held-out prompts, `verifier` scores) | pairwise
    (`policy`'s implicit-reward ranking of held-out preference pairs) | none (an empty result). The
    trainer and `rlpost eval` both evaluate through here; the trainer passes its `learner`, whose base
    is the pairwise reference under LoRA (no copy loaded)."""
    if cfg.eval.kind == "none":
        return lambda: {}
    if cfg.eval.kind == "pairwise":
        if not data.responses.held_out:
            raise ConfigError("eval.kind=pairwise needs held-out pairs: set data.held_out or data.test_source")
        reference = getattr(getattr(cfg, cfg.algorithm, None), "reference", None) or cfg.model.name
        if model_head(cfg) == "score":  # a reward model ranks pairs by its own score: no reference
            reference = None
        view = learner.frozen_view(reference) if learner is not None and reference is not None else None
        return PairwiseEval(policy, reference, data.responses.held_out[:cfg.eval.num_prompts], pad_id,
                            cfg.train.micro_batch_size, device, reference_model=view)
    return lambda: run_eval(engine, data.test_prompts, verifier, cfg)
