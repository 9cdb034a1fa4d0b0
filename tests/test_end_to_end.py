"""The CLI on tiny-random: train 2 steps with checkpoints, resume for a 3rd, eval and plot; and exact resume."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, deepspeed_launcher, subprocess_env

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
         "eval.num_prompts=4", "eval.pass_k=2", "train.micro_batch_size=4", "checkpoint.every=1",
         "grpo.dynamic_sampling=false", "train.lr=1e-4", "reward.format_weight=0.5", "data.arithmetic.train_size=50", "data.arithmetic.test_size=10"]


def rlpost(*args):
    cmd = [sys.executable, "-m", "rlpost.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def sets(*pairs):
    return [x for p in pairs for x in ("--set", p)]


def test_cli_train_checkpoint_resume_eval_plot(tmp_path, digit_model):
    run = tmp_path / "run"
    base = ["train", "configs/grpo_math.yaml", "--no-progress",
            *sets(*SMALL, f"model.name={digit_model}", f"run.output_dir={run}")]
    out = rlpost(*base, *sets("train.max_steps=2"))
    assert "held-out accuracy before" in out and "step_2" in out
    latest = run / "checkpoints" / "latest"
    assert latest.resolve().name == "step_2"
    out = rlpost(*base, *sets("train.max_steps=3", "grpo.beta=0.04"), "--resume", str(latest))
    assert latest.resolve().name == "step_3"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_2", "step_3"]  # keep_last=2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert any(r.get("grad_norm", 0) > 0 for r in rows), "rewards never varied: nothing was trained"
    # grpo.beta=0.04 only after the resume: the KL is logged (and positive: the policy has moved) only at step 3
    assert "kl" not in steps[0] and "kl" not in steps[1] and steps[2]["kl"] > 0
    # A checkpoint of another model is refused with one line, before anything is loaded or written.
    wrong = subprocess.run([sys.executable, "-m", "rlpost.cli", *base, *sets("model.name=tiny-random"),
                            "--resume", str(latest)], cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=subprocess_env())
    assert wrong.returncode == 2 and "was trained from model" in wrong.stderr, wrong.stderr[-2000:]
    assert latest.resolve().name == "step_3"
    # The HF folder loads with plain transformers.
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(latest / "hf")
    assert model.config.num_hidden_layers == 2
    # `rlpost eval` and the trainer's final eval are one path: same checkpoint, same config, same numbers
    # (greedy, and pass@2 from a seeded sampler).
    result = json.loads(rlpost("eval", "configs/grpo_math.yaml", "--checkpoint", str(latest), *sets(*SMALL)))
    final_eval = [r for r in rows if r["step"] == 3 and "eval/accuracy" in r][-1]
    assert result["accuracy"] == final_eval["eval/accuracy"] and result["pass@2"] == final_eval["eval/pass@2"]
    assert result["num_prompts"] == 4
    assert rlpost("plot", str(run)).strip().endswith("curves.png")
    assert (run / "curves.png").stat().st_size > 10_000


def _overrides(run_dir, steps, model, sampler="uniform", *extra):
    from rlpost.config import load_config
    return load_config(REPO / "configs" / "grpo_math.yaml",
                       [*SMALL, f"model.name={model}", f"run.output_dir={run_dir}", f"train.max_steps={steps}",
                        "eval.at_start=false", f"curriculum.sampler={sampler}", "curriculum.init_rollouts=2", *extra])


@pytest.mark.parametrize("sampler", ["uniform", "cures"])
def test_resume_is_exact(tmp_path, digit_model, sampler):
    """2 steps + resume + 1 step gives bit-identical weights to 3 uninterrupted steps (so the same
    prompts were sampled: the sampler state, CurES posteriors included, survives the checkpoint)."""
    from rlpost.trainer import train
    from safetensors.torch import load_file

    train(_overrides(tmp_path / "a", 3, digit_model, sampler), show_progress=False)
    train(_overrides(tmp_path / "b", 2, digit_model, sampler), show_progress=False)
    train(_overrides(tmp_path / "b", 3, digit_model, sampler), resume=str(tmp_path / "b" / "checkpoints" / "latest"), show_progress=False)
    a = load_file(tmp_path / "a" / "checkpoints" / "step_3" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step_3" / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    step_2 = load_file(tmp_path / "b" / "checkpoints" / "step_2" / "hf" / "model.safetensors")
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], step_2["model.layers.0.mlp.up_proj.weight"])


def test_two_ranks_with_the_deepspeed_launcher(tmp_path, digit_model):
    """2 CPU ranks, ZeRO-2: ranks with no informative group still join every collective (no hang).
    run.seed=1: its step 1 has one informative group of the two (checked below); at seed 0 the
    first three steps have none or both."""
    run = tmp_path / "run"
    cmd = [str(deepspeed_launcher()), "--num_gpus", "2", "--module", "rlpost.cli", "train",
           "configs/grpo_math.yaml", "--no-progress",
           *sets(*SMALL, f"model.name={digit_model}", f"run.output_dir={run}", "train.max_steps=3",
                 "train.zero_stage=2", "grpo.dynamic_sampling=true", "run.seed=1")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "checkpoints" / "latest").resolve().name == "step_3"
    # The run trained: the saved weights moved away from the initial model wherever an update happened.
    from safetensors.torch import load_file
    from rlpost.metrics import read_metrics
    updates = [r for r in read_metrics(run) if "grad_norm" in r]
    final = load_file(run / "checkpoints" / "step_3" / "hf" / "model.safetensors")
    initial = load_file(f"{digit_model}/model.safetensors")
    moved = any(not torch.equal(final[k], initial[k]) for k in initial)
    assert updates and moved and all(torch.isfinite(torch.tensor(r["grad_norm"])) for r in updates)
    # one group per rank and step: informative_groups 0.5 is a step where one rank's only group was
    # dropped (all rewards equal) while the other's trained, so that rank joined with no micro-batch
    steps = [r for r in read_metrics(run) if "informative_groups" in r]
    assert all(r["groups"] == 2 for r in steps)
    assert any(r["informative_groups"] == 0.5 and "grad_norm" in r for r in steps), steps


def test_streambp_trains_like_autograd(tmp_path, digit_model):
    """Same seed, same config, train.backward autograd vs streambp: the same loss and gradient-norm
    curve up to float noise (the rollouts coincide because the weights do)."""
    from rlpost.metrics import read_metrics
    from rlpost.trainer import train

    curves = {}
    for backward in ("autograd", "streambp"):
        cfg = _overrides(tmp_path / backward, 3, digit_model, "uniform", "checkpoint.every=0", "grpo.beta=0.04",
                         f"train.backward={backward}", "train.streambp_chunk_size=4")
        train(cfg, show_progress=False)
        curves[backward] = [(r["reward"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / backward)
                            if "reward" in r]
    assert len(curves["autograd"]) == 3
    # float32 sums in another order: ~1e-6 relative, so rel 1e-4. Step 1's loss is ~0 by construction
    # (ratios 1, equal-length responses, advantages summing to 0 in each group): only its rounding
    # residue, < 1e-6, is left, and its gradient norm carries that step. The later losses are O(0.1),
    # where rel 1e-4 is what is compared.
    assert sum(abs(loss) > 1e-2 for _, loss, _ in curves["autograd"]) >= 2
    for (reward_a, loss_a, norm_a), (reward_s, loss_s, norm_s) in zip(curves["autograd"], curves["streambp"]):
        assert reward_s == reward_a
        assert loss_s == pytest.approx(loss_a, rel=1e-4, abs=1e-6)
        assert norm_s == pytest.approx(norm_a, rel=1e-4)


def test_april_trains_checkpoints_and_resumes_its_buffer(tmp_path, digit_model):
    """rollout.scheduler=april on the hf engine: steps train on finished groups, unfinished ones
    wait in the buffer, the buffer is saved with the checkpoint and served first after resume."""
    from rlpost.checkpoint import load_trainer_state
    from rlpost.metrics import read_metrics

    run = tmp_path / "run"
    base = ["train", "configs/grpo_math.yaml", "--no-progress",
            *sets(*SMALL, f"model.name={digit_model}", f"run.output_dir={run}", "eval.at_start=false",
                  "rollout.scheduler=april", "rollout.tokens_per_step=2", "grpo.off_policy=mask_stale")]
    rlpost(*base, *sets("train.max_steps=2"))
    state = load_trainer_state(run / "checkpoints" / "latest")
    buffered = state["source"]["april"]["buffer"]
    assert len(buffered) == 2  # N' - B groups wait (N' = 2B = 4)
    rlpost(*base, *sets("train.max_steps=3"), "--resume", str(run / "checkpoints" / "latest"))
    rows = [r for r in read_metrics(run) if "april/groups_finished" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["april/groups_finished"] == 2 for r in rows)
    assert rows[0]["april/stale_fraction"] == 0.0  # nothing can be stale in the first step
    assert all(0.0 <= r["rollout_tail_s"] <= r["rollout_s"] for r in rows)
    assert sum(r["reward"] for r in rows) > 0  # the responses' text reached the verifier
    # The resumed run equals 3 uninterrupted steps bit for bit: its step 3 started from the saved
    # buffer (and sampler / RNG state), not from fresh prompts.
    whole = tmp_path / "whole"
    rlpost(*[a.replace(str(run), str(whole)) for a in base], *sets("train.max_steps=3"))
    from safetensors.torch import load_file
    resumed, uninterrupted = (load_file(r / "checkpoints" / "step_3" / "hf" / "model.safetensors") for r in (run, whole))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    step_2 = load_file(run / "checkpoints" / "step_2" / "hf" / "model.safetensors")
    assert any(not torch.equal(resumed[k], step_2[k]) for k in resumed)  # and step 3 changed the weights
    assert [r["reward"] for r in read_metrics(whole) if "reward" in r] == [r["reward"] for r in rows]


@pytest.mark.parametrize("sampler_kind", ["uniform", "cures"])
def test_april_rollout_decodes_resumed_responses_whole(digit_model, sampler_kind):
    """A response generated in pieces (aborted, recycled, resumed) is scored on the text of all its
    tokens, not on the empty text of the pending sample it started as. With CurES the groups APRIL
    returns keep the ragged sizes the sampler allocated."""
    from rlpost.build import RunData, make_source
    from rlpost.config import load_config
    from rlpost.data import load_prompt_sets
    from rollout.engine import make_engine
    from rollout.models import load_tokenizer

    cfg = load_config(REPO / "configs" / "grpo_math.yaml", [*SMALL, f"model.name={digit_model}",
                                                            "rollout.tokens_per_step=2", "rollout.scheduler=april",
                                                            f"curriculum.sampler={sampler_kind}",
                                                            "curriculum.tau=10"])  # near-uniform picks: mixed p
    tokenizer = load_tokenizer(digit_model)
    train_set, _ = load_prompt_sets(cfg.data, tokenizer, 0)
    engine = make_engine("hf", digit_model, tokenizer, tokens_per_step=2)
    source = make_source(cfg, engine, RunData(train_set), tokenizer, reward=lambda groups: None, keep=None)
    sampler = source.sampler
    for prompt_id in range(len(train_set)):  # estimated accuracies from 0 to 1: different k_i
        sampler.update(prompt_id, [j < 5 * (prompt_id % 5) for j in range(20)])
    allocated = []
    next_batch = sampler.next_batch

    def recording(n):
        ids, sizes = next_batch(n)
        allocated.extend(sizes)
        return ids, sizes
    sampler.next_batch = recording
    returned, recycled = [], 0
    for version in range(3):
        groups, stats = source.next_groups(version)
        returned += [len(g.samples) for g in groups]
        for s in (s for g in groups for s in g.samples):
            assert s.text == tokenizer.decode(s.response_ids, skip_special_tokens=True)
            assert s.response_ids  # every member generated something
        recycled += stats["april/groups_recycled"]
    assert recycled > 0  # some groups were aborted, kept and resumed: the case this test is about
    assert set(returned) <= set(allocated)
    if sampler_kind == "cures":
        assert len(set(allocated)) > 1 and len(set(returned)) > 1  # ragged groups went through APRIL
