"""The GRPO loop. One step:

    prompts -> G samples each -> rewards -> group advantages (drop zero-variance groups)
            -> micro-batched clipped-surrogate loss and backward -> optimizer step
            -> new weights into the rollout engine -> metrics, eval, checkpoint
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlpost import checkpoint as ckpt
from rlpost.algorithms import grpo
from rlpost.batch import Packed, pack, padded, token_logprobs
from rlpost.config import Config, ConfigError, dump_config
from rlpost.curriculum import CuresSampler, UniformSampler
from rlpost.data import PromptSet, load_prompt_sets
from rlpost.evaluate import evaluate
from rlpost.learner import Learner, world
from rlpost.metrics import MetricsLogger, progress_bar
from rlpost.models import load_model, load_tokenizer
from rewards.math import MathReward
from rollout.april import AprilScheduler, pending_group
from rollout.engine import StreamingEngine, make_engine
from rollout.types import FinishReason, Group, Sample, SamplingParams, tail_wait_s


@dataclass
class MicroBatch:
    packed: Packed
    advantages: torch.Tensor          # [N]
    loss_mask: torch.Tensor           # [N, T]
    behaviour_logp: torch.Tensor      # [N, T] log-probs stored at sampling time
    ref_logp: torch.Tensor | None     # [N, T] when grpo.beta > 0
    temperature: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# The pieces of one step

def make_sampler(cfg: Config, num_prompts: int):
    c = cfg.curriculum
    if c.sampler == "cures":
        return CuresSampler(num_prompts, cfg.run.seed, cfg.rollout.group_size, c.tau_mode, c.tau, c.allocation, c.k_min)
    return UniformSampler(num_prompts, cfg.run.seed, cfg.rollout.group_size)


def rollout(engine, prompts: PromptSet, prompt_ids: list[int], group_sizes: list[int], cfg: Config) -> list[Group]:
    """group_sizes[k] samples for prompt prompt_ids[k], all generated in one engine call."""
    r = cfg.rollout
    requests = [prompts.prompt_ids[i] for i, k in zip(prompt_ids, group_sizes) for _ in range(k)]
    samples = iter(engine.generate(requests, SamplingParams(r.max_new_tokens, r.temperature, r.top_p)))
    return [Group(prompt_id=i, prompt=prompts.problems[i].question, answer=prompts.problems[i].answer,
                  samples=[next(samples) for _ in range(k)]) for i, k in zip(prompt_ids, group_sizes)]


def make_april(engine, cfg: Config) -> AprilScheduler:
    if not isinstance(engine, StreamingEngine):
        raise ConfigError(f"rollout.scheduler=april needs a streaming engine; {type(engine).__name__} is not one")
    if world()[1] > 1:
        raise ConfigError("rollout.scheduler=april runs on one rank in this build (each rank would need its own "
                          "buffer and prompt stream)")
    r = cfg.rollout
    return AprilScheduler(engine, r.prompts_per_step, r.april_submit_groups, max_new_tokens=r.max_new_tokens,
                          params=SamplingParams(r.max_new_tokens, r.temperature, r.top_p))


def april_rollout(april: AprilScheduler, sampler, prompts: PromptSet, version: int,
                  tokenizer) -> tuple[list[Group], dict]:
    """B finished groups from the APRIL scheduler; fresh groups come from the sampler (CurES sizes them).
    A resumed response was generated in pieces, so its text is decoded here from all its token ids."""
    def fresh(n: int) -> list[Group]:
        ids, sizes = sampler.next_batch(n)
        return [pending_group(i, prompts.problems[i].question, prompts.problems[i].answer, prompts.prompt_ids[i], k)
                for i, k in zip(ids, sizes)]

    groups, stats = april.rollout(fresh, version)
    for sample in (s for g in groups for s in g.samples):
        sample.text = tokenizer.decode(sample.response_ids, skip_special_tokens=True)
    return groups, {f"april/{k}": v for k, v in stats.items()}


def score(groups: list[Group], reward_fn: MathReward, cfg: Config) -> None:
    samples = [s for g in groups for s in g.samples]
    rewards = reward_fn([s.text for s in samples], [g.answer for g in groups for _ in g.samples],
                        [not s.truncated for s in samples])
    if cfg.grpo.overlong_penalty:
        lengths = torch.tensor([len(s.response_ids) for s in samples])
        penalty = grpo.overlong_penalty(lengths, cfg.rollout.max_new_tokens, cfg.grpo.overlong_cache).tolist()
        rewards = [r + p for r, p in zip(rewards, penalty)]
    for sample, reward in zip(samples, rewards):
        sample.reward = reward


def update_sampler(sampler, groups: list[Group], cfg: Config, grad_norms_fn=None) -> None:
    """Feed every scored rollout to the sampler (with per-response gradient norms when the allocation
    needs them). All ranks see all outcomes, so their samplers stay identical."""
    outcomes = []
    for g in groups:
        norms = grad_norms_fn(g.samples) if grad_norms_fn is not None else None
        outcomes.append((g.prompt_id, [s.reward > cfg.curriculum.correct_threshold for s in g.samples], norms))
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, outcomes)
        outcomes = [o for rank_outcomes in everyone for o in rank_outcomes]
    for prompt_id, correct, norms in outcomes:
        sampler.update(prompt_id, correct, norms)


def difficulty_pass(engine, sampler, prompts: PromptSet, reward_fn: MathReward, cfg: Config, grad_norms_fn) -> dict:
    """CurES initialisation: N_min rollouts of every training prompt with the current model. Real cost."""
    start, n = time.time(), cfg.curriculum.init_rollouts
    rank, world_size = world()
    ids = list(range(len(prompts)))[rank::world_size]
    groups = rollout(engine, prompts, ids, [n] * len(ids), cfg)
    score(groups, reward_fn, cfg)
    update_sampler(sampler, groups, cfg, grad_norms_fn)
    tokens = sum(len(s.response_ids) for g in groups for s in g.samples)
    return {"init/rollouts": float(len(prompts) * n), "init/tokens": float(tokens * world_size),
            "init/seconds": time.time() - start}


def make_micro_batches(groups: list[Group], cfg: Config, pad_id: int, reference=None,
                       current_version: int = 0) -> tuple[list[MicroBatch], float]:
    """Advantages over (ragged) groups, then fixed-size micro-batches. Returns them and N_glob, the
    loss-token total of the whole batch, known before any backward (dapo needs it). With
    off_policy=mask_stale, tokens sampled before `current_version` carry no loss (nor count in N_glob).

    With several ranks, every rank must run the same number of backward passes (each one is a
    collective under ZeRO), so ranks with fewer micro-batches get empty ones (all-zero loss mask)."""
    samples = [s for g in groups for s in g.samples]
    rewards = torch.tensor([s.reward for s in samples])
    advantages = (grpo.group_advantages(rewards, [len(g.samples) for g in groups], cfg.grpo.scale_rewards)
                  if samples else torch.zeros(0))
    keep_mask = [not (cfg.grpo.mask_truncated and s.truncated) for s in samples]
    size = cfg.train.micro_batch_size
    micro_batches = []
    for start in range(0, len(samples), size):
        chunk = samples[start:start + size]
        packed = pack(chunk, pad_id)
        keep = torch.tensor(keep_mask[start:start + size], dtype=torch.float32).unsqueeze(-1)
        loss_mask = packed.response_mask * keep
        if cfg.rollout.off_policy == "mask_stale":
            versions = padded([s.versions for s in chunk], packed.response_mask.shape[1])
            loss_mask = grpo.off_policy_mask(loss_mask, versions, current_version)
        ref_logp = None
        if reference is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(reference, packed, cfg.rollout.temperature)[0].float()
        micro_batches.append(MicroBatch(
            packed=packed, advantages=advantages[start:start + size], loss_mask=loss_mask,
            behaviour_logp=padded([s.logprobs for s in chunk], packed.response_mask.shape[1]),
            ref_logp=ref_logp, temperature=cfg.rollout.temperature))
    global_tokens = sum(float(mb.loss_mask.sum()) for mb in micro_batches)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        tokens = torch.tensor([global_tokens], dtype=torch.float64)
        most = torch.tensor([len(micro_batches)])
        torch.distributed.all_reduce(tokens)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        global_tokens = float(tokens)
        while len(micro_batches) < int(most):
            micro_batches.append(_empty_micro_batch(pad_id, cfg.rollout.temperature))
    return micro_batches, global_tokens


def _empty_micro_batch(pad_id: int, temperature: float) -> MicroBatch:
    """A one-token micro-batch that contributes nothing: it only keeps the ranks' collectives in step."""
    packed = pack([Sample([pad_id], [pad_id], [0.0], FinishReason.STOP)], pad_id)
    return MicroBatch(packed=packed, advantages=torch.zeros(1), loss_mask=torch.zeros(1, 1),
                      behaviour_logp=torch.zeros(1, 1), ref_logp=torch.zeros(1, 1), temperature=temperature)


def make_loss_fn(cfg: Config, num_micro_batches: int, global_tokens: float):
    g = cfg.grpo

    def loss_fn(mb: MicroBatch, logp: torch.Tensor, entropy: torch.Tensor):
        mask = mb.loss_mask.to(logp.device)
        # One update per rollout: pi_old is the current policy, so the ratio is 1 with a live gradient.
        token_loss, stats = grpo.grpo_token_loss(
            logp, logp.detach(), mb.advantages.to(logp.device), mask, eps_low=g.eps_low, eps_high=g.eps_high,
            beta=g.beta, logp_ref=None if mb.ref_logp is None else mb.ref_logp.to(logp.device),
            ratio_level=g.ratio_level)
        if cfg.rollout.off_policy == "tis":  # reweight by min(pi / pi_behaviour, C): stale tokens sampled elsewhere
            token_loss = token_loss * grpo.truncated_importance_weight(
                logp, mb.behaviour_logp.to(logp.device), cfg.rollout.tis_cap)
        loss = grpo.aggregate(token_loss, mask, g.aggregation, grad_accum_steps=num_micro_batches,
                              max_completion_length=cfg.rollout.max_new_tokens, global_tokens=global_tokens,
                              num_processes=world()[1])
        tokens = mask.sum()
        out = {"loss": loss.detach(), "tokens": tokens, "entropy_sum": (entropy * mask).sum(),
               "clip_sum": stats["clip_fraction"] * tokens}
        if "kl" in stats:
            out["kl_sum"] = stats["kl"] * tokens
        return loss, out

    return loss_fn


def curriculum_metrics(sampler, groups: list[Group]) -> dict:
    """Where the sampled prompts sit in difficulty, and how many samples carry a learning signal."""
    samples = [s for g in groups for s in g.samples]
    rewards = torch.tensor([s.reward for s in samples])
    advantages = grpo.group_advantages(rewards, [len(g.samples) for g in groups], "none")
    out = {"curriculum/mean_k": len(samples) / len(groups),
           "curriculum/effective_samples": float((advantages.abs() > 1e-8).sum())}
    if isinstance(sampler, CuresSampler):
        p = sampler.accuracy()
        sampled = p[[g.prompt_id for g in groups]]
        out["curriculum/sampled_mid_accuracy"] = float(((sampled > 0.2) & (sampled < 0.8)).double().mean())
        for q in (0.1, 0.5, 0.9):
            out[f"curriculum/p_hat_q{int(q * 100)}"] = float(torch.quantile(p, q))
    return out


def step_metrics(groups: list[Group], kept: list[bool], train_stats: dict, step_start: float, rollout_s: float,
                 step_s: float) -> dict:
    samples = [s for g in groups for s in g.samples]
    tokens = sum(len(s.response_ids) for s in samples)
    out = {
        "reward": sum(s.reward for s in samples) / len(samples),
        "accuracy": sum(s.reward >= 1.0 for s in samples) / len(samples),
        "response_length": tokens / len(samples),
        "truncated": sum(s.truncated for s in samples) / len(samples),
        "informative_groups": sum(kept) / len(kept),
        "rollout_tokens_per_s": tokens / max(rollout_s, 1e-9),
        "tokens_per_s": tokens / max(step_s, 1e-9),
        "rollout_s": rollout_s,
        "rollout_tail_s": tail_wait_s(samples, step_start),
        "step_s": step_s,
    }
    n = train_stats.pop("tokens", 0.0)
    if n:
        out["entropy"] = train_stats.pop("entropy_sum") / n
        out["clip_fraction"] = train_stats.pop("clip_sum") / n
        if "kl_sum" in train_stats:
            out["kl"] = train_stats.pop("kl_sum") / n
    out.update({k: v for k, v in train_stats.items() if not k.endswith("_sum")})
    return out


# ---------------------------------------------------------------------------------------------

def train(cfg: Config, resume: str | None = None, show_progress: bool = True) -> dict:
    seed_everything(cfg.run.seed)
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_dir = ckpt.resolve_checkpoint(resume) if resume else None  # fail before loading any model

    tokenizer = load_tokenizer(cfg.model.name)
    train_set, test_set = load_prompt_sets(cfg.data, tokenizer, cfg.run.seed)
    sampler = make_sampler(cfg, len(train_set))
    if resume_dir is not None:  # check that the checkpoint fits this config before loading any model
        state = ckpt.load_trainer_state(resume_dir)
        saved_model = state["config"]["model"]["name"]
        if saved_model != cfg.model.name:
            raise ckpt.CheckpointError(f"{resume_dir} was trained from model {saved_model!r}, "
                                       f"but model.name is {cfg.model.name!r}")
        try:
            sampler.load_state_dict(state["sampler"])
        except (KeyError, ValueError) as e:
            raise ckpt.CheckpointError(f"{resume_dir}: its sampler state does not fit this config ({e})") from None
    learner = Learner(cfg)
    rank, world_size = world()
    is_main = rank == 0
    engine = make_engine(cfg.rollout.engine, cfg.model.name, tokenizer, learner.engine.device,
                         max_batch_size=cfg.rollout.max_batch_size, tokens_per_step=cfg.rollout.tokens_per_step,
                         seed=cfg.run.seed)
    april = make_april(engine, cfg) if cfg.rollout.scheduler == "april" else None
    reference = None
    if cfg.grpo.beta > 0:  # the reference model costs memory and a forward pass; only when used
        reference = load_model(cfg.model.reference or cfg.model.name).to(learner.engine.device).eval()
    reward_fn = MathReward(timeout_s=cfg.reward.timeout_s, format_weight=cfg.reward.format_weight)
    grad_norms_fn = None
    if cfg.curriculum.sampler == "cures" and cfg.curriculum.allocation == "grad_norm":  # an extra forward
        def grad_norms_fn(samples):
            return learner.head_gradient_norms(pack(samples, tokenizer.pad_token_id), cfg.rollout.temperature)
    summary: dict = {"train_prompts": len(train_set), "test_prompts": len(test_set),
                     "skipped_rows": train_set.skipped + test_set.skipped}
    start_step = 0
    if resume_dir is not None:
        learner.load(resume_dir)
        learner.version = start_step = state["step"]
        summary = state["summary"]
        ckpt.set_rng_state(state["rng"])
        if april is not None:
            april.load_state_dict(state.get("april", {"buffer": []}))
        engine.load_weights(learner.named_weights(), learner.version)
    if is_main:
        dump_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, enabled=is_main)
    eval_kwargs = dict(max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                       num_prompts=cfg.eval.num_prompts, pass_k=cfg.eval.pass_k,
                       temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)

    def run_eval(step: int) -> dict:
        result = evaluate(engine, test_set, reward_fn, **eval_kwargs)
        result.update({f"reward_{k}": float(v) for k, v in reward_fn.pop_counters().items()})
        logger.log(step, {f"eval/{k}": v for k, v in result.items()})
        return result

    if start_step == 0 and cfg.eval.at_start:
        summary["eval_before"] = run_eval(0)
    if start_step == 0 and cfg.curriculum.sampler == "cures" and cfg.curriculum.init_rollouts > 0:
        summary["init_pass"] = difficulty_pass(engine, sampler, train_set, reward_fn, cfg, grad_norms_fn)
        logger.log(0, summary["init_pass"])
    bar = progress_bar(start_step, cfg.train.max_steps, enabled=show_progress and is_main)
    run_start, last_checkpoint = time.time(), None
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        t0 = time.time()
        rollout_stats: dict = {}
        if april is not None:
            groups, rollout_stats = april_rollout(april, sampler, train_set, learner.version, tokenizer)
        else:
            prompt_ids, group_sizes = sampler.next_batch(cfg.rollout.prompts_per_step * world_size)
            prompt_ids, group_sizes = prompt_ids[rank::world_size], group_sizes[rank::world_size]
            groups = rollout(engine, train_set, prompt_ids, group_sizes, cfg)
        rollout_s = time.time() - t0
        score(groups, reward_fn, cfg)
        update_sampler(sampler, groups, cfg, grad_norms_fn)

        kept = grpo.informative_groups(torch.tensor([s.reward for g in groups for s in g.samples]),
                                       [len(g.samples) for g in groups])
        train_groups = [g for g, k in zip(groups, kept) if k] if cfg.grpo.dynamic_sampling else groups
        train_stats: dict = {"skipped_update": 1.0}
        micro_batches, global_tokens = make_micro_batches(train_groups, cfg, tokenizer.pad_token_id, reference,
                                                          learner.version)
        if micro_batches:  # empty on every rank when no group had any reward variance
            train_stats = learner.train_step(micro_batches, make_loss_fn(cfg, len(micro_batches), global_tokens))
            t_sync = time.time()
            engine.load_weights(learner.named_weights(), learner.version)
            train_stats["weight_sync_s"] = time.time() - t_sync

        metrics = step_metrics(groups, kept, train_stats, t0, rollout_s, time.time() - t0)
        metrics.update(curriculum_metrics(sampler, groups))
        metrics.update(rollout_stats)
        metrics.update({f"reward/{k}": float(v) for k, v in reward_fn.pop_counters().items()})
        logger.log(step, metrics)
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.max_steps:
            run_eval(step)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
        bar.update(1)
        if step == cfg.train.max_steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            state = {"sampler": sampler.state_dict(), "summary": summary, "config": cfg.model_dump()}
            if april is not None:  # partial samples and prompts not yet trained on
                state["april"] = april.state_dict()
            last_checkpoint = ckpt.save_checkpoint(run_dir, step, learner, tokenizer, state, cfg.checkpoint.keep_last)
    bar.close()

    summary["eval_after"] = run_eval(cfg.train.max_steps)
    summary["train_wall_s"] = time.time() - run_start
    summary["checkpoint"] = str(last_checkpoint) if last_checkpoint else None
    logger.close()
    reward_fn.close()
    return summary
