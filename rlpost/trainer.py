"""The training loop, the same for every method. One step:

    source    -> this step's groups (sync / APRIL rollouts of sampled prompts, or fixed responses)
    rewards   -> each sample's verdict (`correct`) and shaped reward
    objective -> which groups train (its filter), then dense token rewards on them (from a process
                 reward model trained online, where configured), their advantages, micro-batches
                 with the frozen models' forwards
    learner   -> backward over the micro-batches, one optimizer step
    sync      -> new weights into the rollout engine
    then metrics, eval, checkpoint

What a method is lives elsewhere: its objective (rlpost/objectives/, chosen by `algorithm:`), its
source (rollout/source.py, `rollout.scheduler`), its prompt sampler (rlpost/curriculum.py). The
components are built from the config in rlpost/build.py.
"""
from __future__ import annotations

import contextlib
import random
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from rlpost import checkpoint as ckpt
from rlpost.build import (load_data, make_dense_rewards, make_evaluator, make_objective, make_rewards,
                          make_rollout_engine, make_source, make_verifier, model_head)
from rlpost.config import Config, dump_config
from rlpost.learner import Learner
from rlpost.metrics import MetricsLogger, Stats, gather, over_ranks, progress_bar, resolve
from rlpost.rundir import RunError, run_lock
from rewards.functions import RewardError
from rollout.models import load_tokenizer
from rollout.types import Group, UserError, tail_wait_s, world
from rollout.workers import WorkerFailure


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_metrics(groups: list[Group], train_stats: Stats, timing: dict[str, float]) -> dict:
    """The step's numbers from every rank's groups (sample means over the whole job), the pooled
    train stats and the slowest rank's timings."""
    samples = [s for g in groups for s in g.samples]
    if not samples:  # a step that trains on earlier samples (APO inside a round)
        return {"step_s": timing["step_s"], **resolve(train_stats)}
    tokens = sum(len(s.response_ids) for s in samples)
    informative = [len({s.reward for s in g.samples}) > 1 for g in groups]
    return {
        "groups": float(len(groups)),
        "reward": sum(s.reward for s in samples) / len(samples),
        "accuracy": sum(bool(s.correct) for s in samples) / len(samples),
        "response_length": tokens / len(samples),
        "truncated": sum(s.truncated for s in samples) / len(samples),
        "informative_groups": sum(informative) / len(informative),
        "rollout_tokens_per_s": tokens / max(timing["rollout_s"], 1e-9),
        "tokens_per_s": tokens / max(timing["step_s"], 1e-9),
        **timing,
        **resolve(train_stats),
    }


def train(cfg: Config, resume: str | None = None, show_progress: bool = True) -> dict:
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        try:
            with contextlib.ExitStack() as cleanup:  # worker processes stop however the run ends
                cleanup.callback(torch.set_num_threads, torch.get_num_threads())  # workers split the cores
                return _train(cfg, run_dir, resume, show_progress, cleanup)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - one line for the user, the traceback in error.log
            log = run_dir / "error.log"
            with contextlib.suppress(OSError):  # the disk may be what failed
                log.write_text(traceback.format_exc())
            latest = run_dir / "checkpoints" / "latest"
            where = f"resume with --resume {latest}" if latest.is_symlink() else "no checkpoint was written yet"
            first = str(e).splitlines()[0] if str(e) else ""
            ours = isinstance(e, (RunError, ckpt.CheckpointWriteError, RewardError, WorkerFailure))  # one clear line
            message = first if ours else f"{type(e).__name__}: {first}"
            raise RunError(f"{message} ({where}; traceback in {log})") from e


def _train(cfg: Config, run_dir: Path, resume: str | None, show_progress: bool, cleanup: contextlib.ExitStack) -> dict:
    seed_everything(cfg.run.seed)
    resume_dir = ckpt.resolve_checkpoint(resume) if resume else None  # fail before loading any model
    state = ckpt.load_trainer_state(resume_dir) if resume_dir else None
    if state is not None:
        ckpt.check_resume(state, cfg.model_dump(), resume_dir)

    # The components. Nothing below this block knows which method, scheduler or sampler runs.
    tokenizer = load_tokenizer(cfg.model.name)
    data = load_data(cfg, tokenizer)  # prompts to generate from, or fixed responses
    verifier = make_verifier(cfg, data)  # the math verifier or the user's reward functions (checked here)
    cleanup.callback(verifier.close)
    learner = Learner(cfg.model.name, cfg.train, model_head(cfg), cfg.model.lora)  # a causal LM or reward model; LoRA or not
    engine = make_rollout_engine(cfg, tokenizer, learner, data)  # in this process, or rollout workers
    cleanup.callback(engine.close)
    objective = make_objective(cfg, learner, tokenizer.pad_token_id)
    rewards = make_rewards(cfg, verifier)
    dense = make_dense_rewards(cfg, tokenizer.pad_token_id)  # a reward model trained online, or nothing
    source = make_source(cfg, engine, data, tokenizer, rewards, objective.keep, learner)
    evaluator = make_evaluator(cfg, engine, data, verifier, learner.model, learner.engine.device, tokenizer.pad_token_id,
                               learner)
    rank, _ = world()
    is_main = rank == 0
    summary: dict = data.summary()
    start_step = 0
    if state is not None:
        try:
            source.load_state_dict(state["source"])
        except (KeyError, ValueError) as e:
            raise ckpt.CheckpointError(f"{resume_dir}: its rollout-source state does not fit this config ({e})") from None
        objective.load_state_dict(state["objective"])
        learner.load(resume_dir)
        for name, other in dense.learners.items():  # the dense rewards' own model (prm/)
            other.load(resume_dir / name)
        learner.version = start_step = state["step"]
        summary = state["summary"]
        ckpt.restore_rng(state)
        engine.load_weights(learner.named_weights(), learner.version)
    if is_main:
        dump_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, enabled=is_main)

    def evaluate(step: int) -> dict:
        result = evaluator()
        logger.log(step, {f"eval/{k}": v for k, v in result.items()})
        return result

    if start_step == 0:
        if cfg.eval.at_start:
            summary["eval_before"] = evaluate(0)
        if warm_up := source.warm_up():  # CurES's difficulty pass; nothing for the other samplers
            summary["init_pass"] = warm_up
            logger.log(0, warm_up)
    bar = progress_bar(start_step, cfg.train.max_steps, enabled=show_progress and is_main)
    run_start, last_checkpoint, bad_steps = time.time(), None, 0
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        t0 = time.time()
        try:
            groups, rollout_stats = source.next_groups(learner.version)  # (APRIL and CurES score early)
            rollout_s = time.time() - t0
            rewards(groups)
        except RewardError as e:  # a reward function failed under reward.on_error=raise
            raise RewardError(f"step {step}: {e}") from e
        sampler_stats = source.observe(groups)

        train_groups = [g for g in groups if objective.keep(g)]
        dense(train_groups)  # token rewards on the kept groups, and their model's one update
        advantages = objective.advantages(train_groups)
        micro_batches = objective.micro_batches(train_groups, advantages, learner.version)
        train_stats: Stats = {"skipped_update": 1.0}
        if micro_batches:  # empty on every rank when no group is kept
            train_stats = learner.train_step(micro_batches, objective.head, objective.loss)
            t_sync = time.time()
            engine.load_weights(learner.named_weights(), learner.version)
            train_stats["weight_sync_s"] = time.time() - t_sync

        bad_steps = bad_steps + 1 if train_stats.get("nonfinite") else 0
        if bad_steps >= cfg.train.max_bad_steps:
            raise RunError(f"{bad_steps} consecutive steps (up to step {step}) had a non-finite loss or gradient; "
                           f"stopped (train.max_bad_steps). The weights were not updated by them")

        # The whole job's numbers (collectives: every rank computes them, rank 0 logs them)
        timing = {"rollout_s": rollout_s, "rollout_tail_s": tail_wait_s([s for g in groups for s in g.samples], t0),
                  "step_s": time.time() - t0}
        metrics = step_metrics([g for part in gather(groups) for g in part], over_ranks(train_stats),
                               over_ranks(timing, maxes=tuple(timing)))
        metrics.update(sampler_stats)  # computed from every rank's outcomes already
        verifier_counts = {f"reward/{k}": float(v) for k, v in verifier.pop_counters().items()}
        metrics.update(over_ranks({**objective.metrics(), **rewards.metrics(), **dense.metrics(), **rollout_stats,
                                   **verifier_counts},
                                  sums=source.summed + tuple(verifier_counts), maxes=source.maxed))
        logger.log(step, metrics)
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.max_steps:
            evaluate(step)
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("reward", "accuracy", "loss", "tokens_per_s") if k in metrics}
                        | ({"skipped": "nan/inf"} if bad_steps else {}))
        bar.update(1)
        if step == cfg.train.max_steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            trainer_state = {"source": source.state_dict(), "objective": objective.state_dict(),
                             "summary": summary, "config": cfg.model_dump()}
            last_checkpoint = ckpt.save_checkpoint(run_dir, step, learner, tokenizer, trainer_state,
                                                   cfg.checkpoint.keep_last, extra_learners=dense.learners)
    bar.close()

    summary["eval_after"] = evaluate(cfg.train.max_steps)
    summary["train_wall_s"] = time.time() - run_start
    summary["checkpoint"] = str(last_checkpoint) if last_checkpoint else None
    logger.close()
    return summary
