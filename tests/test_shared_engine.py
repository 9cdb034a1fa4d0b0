"""rollout.shared_model: the hf engine generates from the learner's own module (rollout/hf_engine.py
SharedHFEngine). The weights it generates with after a step are the learner's by construction, so a
run must be the copy run (a second copy that receives the weights) bit for bit; and the default (null)
takes it exactly where it works."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from rlpost.config import ConfigError, load_config

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6", "eval.num_prompts=4",
         "eval.pass_k=1", "train.micro_batch_size=4", "grpo.dynamic_sampling=false", "train.lr=1e-3",
         "reward.format_weight=0.5", "data.arithmetic.train_size=50", "data.arithmetic.test_size=10", "rollout.engine=hf",
         "grpo.beta=0.04"]


def _run(tmp_path, name, model, *extra):
    from rlpost.metrics import read_metrics
    from rlpost.trainer import train
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", [*SMALL, f"model.name={model}", "train.max_steps=3",
                                                           f"run.output_dir={tmp_path / name}", *extra])
    summary = train(cfg, show_progress=False)
    hf = tmp_path / name / "checkpoints" / "step_3" / "hf"
    weights = load_file(hf / ("adapter_model.safetensors" if (hf / "adapter_config.json").is_file() else "model.safetensors"))
    return summary, weights, [r for r in read_metrics(tmp_path / name) if "reward" in r]


@pytest.mark.parametrize("lora", [[], ["model.lora.r=4", "train.lr=1e-2"]], ids=["full", "lora"])
def test_generating_from_the_learners_module_is_the_copy_run_bit_for_bit(tmp_path, digit_model, lora):
    copy_summary, copy_weights, copy_rows = _run(tmp_path, "copy", digit_model, "rollout.shared_model=false", *lora)
    shared_summary, shared_weights, shared_rows = _run(tmp_path, "shared", digit_model, "rollout.shared_model=true", *lora)
    assert copy_weights.keys() == shared_weights.keys()
    assert all(torch.equal(copy_weights[k], shared_weights[k]) for k in copy_weights)
    for key in ("reward", "response_length", "loss", "kl"):
        assert [r[key] for r in shared_rows] == [r[key] for r in copy_rows], key
    assert shared_summary["eval_after"] == copy_summary["eval_after"]  # the evaluation generates from it too
    assert copy_weights and any(not torch.equal(copy_weights[k], torch.zeros_like(copy_weights[k])) for k in copy_weights)


def test_shared_model_settings_that_cannot_work_are_one_clear_line(digit_model):
    for bad, needle in [(["rollout.engine=vllm"], "rollout.engine=hf"),
                        (["rollout.placement=workers"], "rollout.placement=colocated")]:
        with pytest.raises(ConfigError, match="rollout.shared_model=true"):
            load_config(REPO / "configs" / "grpo_math.yaml", ["rollout.shared_model=true", *bad])
    from rlpost.build import make_rollout_engine
    from rlpost.learner import Learner
    from rollout.models import load_tokenizer
    cfg = load_config(REPO / "configs" / "prm_math.yaml", [f"model.name={digit_model}", "rollout.shared_model=true"])
    learner = Learner(digit_model, cfg.train)
    with pytest.raises(ConfigError, match="samples from a fixed policy"):
        make_rollout_engine(cfg, load_tokenizer(digit_model), learner, None)
    # and where it works, the engine holds no weights of its own: it is the learner's module
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", [f"model.name={digit_model}", "rollout.shared_model=true"])
    engine = make_rollout_engine(cfg, load_tokenizer(digit_model), learner, None)
    assert engine.model is learner.model
    from rollout.types import SamplingParams
    for mode in (True, False):  # generation runs in eval mode and leaves the learner's mode as it was
        learner.model.train(mode)
        assert len(engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0))) == 1
        assert learner.model.training == mode


def test_the_default_shares_the_module_exactly_where_it_works(digit_model):
    """rollout.shared_model null: the learner's module on the hf engine, colocated, for an objective that
    trains its sampler; a copy for a fixed-policy objective (the implicit PRM) and under ZeRO-3; and
    the settings where sharing cannot work load without a word (vllm, workers)."""
    from rlpost.build import load_data, make_rollout_engine
    from rlpost.learner import Learner
    from rollout.hf_engine import HFEngine, SharedHFEngine
    from rollout.models import load_tokenizer
    tokenizer = load_tokenizer(digit_model)
    for bad in (["rollout.engine=vllm"], ["rollout.placement=workers"]):
        assert load_config(REPO / "configs" / "grpo_math.yaml", bad).rollout.shared_model is None
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", [f"model.name={digit_model}"])
    learner = Learner(digit_model, cfg.train)
    engine = make_rollout_engine(cfg, tokenizer, learner, None)
    assert isinstance(engine, SharedHFEngine) and engine.model is learner.model
    cfg = load_config(REPO / "configs" / "prm_math.yaml", [f"model.name={digit_model}"])
    engine = make_rollout_engine(cfg, tokenizer, learner, load_data(cfg, tokenizer))
    assert not isinstance(engine.engine, SharedHFEngine) and engine.engine.model is not learner.model
    learner.zero_stage = 3  # what make_rollout_engine reads of a ZeRO-3 learner
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", [f"model.name={digit_model}"])
    engine = make_rollout_engine(cfg, tokenizer, learner, load_data(cfg, tokenizer))
    assert type(engine) is HFEngine and engine.model is not learner.model


def test_engine_auto_falls_back_to_hf_in_one_line_where_vllm_is_missing(digit_model, monkeypatch, capsys):
    """rollout.engine=auto: vLLM where it imports; elsewhere the hf engine (and so, by the default
    above, the learner's own module), said in one line on stderr, once per engine built."""
    from rlpost.build import make_rollout_engine
    from rlpost.learner import Learner
    from rollout import vllm_engine
    from rollout.engine import resolve_engine
    from rollout.hf_engine import SharedHFEngine
    from rollout.models import load_tokenizer
    for kind in ("hf", "vllm"):  # what was asked for is taken as asked, without a word
        assert resolve_engine(kind) == kind
    monkeypatch.setattr(vllm_engine, "available", lambda: True)
    assert resolve_engine("auto") == "vllm"
    monkeypatch.setattr(vllm_engine, "available", lambda: False)
    assert capsys.readouterr().err == ""
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", [f"model.name={digit_model}", "rollout.engine=auto"])
    learner = Learner(digit_model, cfg.train)
    engine = make_rollout_engine(cfg, load_tokenizer(digit_model), learner, None)
    assert isinstance(engine, SharedHFEngine) and engine.model is learner.model
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlpost:")]  # not transformers'
    assert len(said) == 1 and "rollout.engine=auto" in said[0] and "hf engine" in said[0]
