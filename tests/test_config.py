import subprocess
import sys

import pytest

from rlpost.config import ConfigError, load_config

from conftest import REPO, subprocess_env


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_validate():
    for path in (REPO / "configs").glob("*.yaml"):
        load_config(path)


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", ["train.max_steps=3", "grpo.beta=0.04", "data.system_prompt=null"])
    assert cfg.train.max_steps == 3 and cfg.grpo.beta == 0.04 and cfg.data.system_prompt is None


@pytest.mark.parametrize("text,overrides,needle", [
    ("train:\n  lr: 1e-5\n  learning_rate: 3\n", [], "train.learning_rate: unknown key"),
    ("train:\n  max_steps: many\n", [], "train.max_steps: Input should be a valid integer"),
    ("grpo:\n  aggregation: mean\n", [], "grpo.aggregation"),
    ("", ["rollout.group_size=1"], "rollout.group_size"),
    ("", ["nonsense.key=1"], "nonsense: unknown key"),
    ("", ["train.max_steps"], "--set expects key=value"),
    ("train: [1, 2]\n", [], "train: Input should be a valid dictionary"),
    ("a: b: c\n", [], "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("args,needle", [
    (["train", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "configs/grpo_math.yaml", "--set", "train.lr=fast"], "train.lr"),
    (["train", "configs/grpo_math.yaml", "--resume", "/nonexistent/ckpt"], "checkpoint not found"),
    (["plot", "/nonexistent/run"], "no metrics.jsonl"),
])
def test_cli_user_errors_exit_2_with_one_line(args, needle):
    proc = subprocess.run([sys.executable, "-m", "rlpost.cli", *args], cwd=REPO, capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_vllm_settings_are_config_keys():
    """vLLM's context length follows the prompt limit and the longest generation unless set; the GPU
    memory share and the CPU KV cache are keys too (StreamBP's long responses need a long context)."""
    from rlpost.config import load_config
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", ["data.max_prompt_tokens=300", "rollout.max_new_tokens=4000",
                                                            "eval.max_new_tokens=5000"])
    assert cfg.vllm_options() == {"max_model_len": 5300, "gpu_memory_utilization": 0.3, "cpu_kv_cache_gib": None}
    # where the prompts are loaded, the job's longest one replaces the limit (never above it)
    assert cfg.vllm_options(longest_prompt=40)["max_model_len"] == 5040
    assert cfg.vllm_options(longest_prompt=400)["max_model_len"] == 5300
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", ["rollout.vllm_max_model_len=9000",
                                                            "rollout.vllm_gpu_memory_utilization=0.5"])
    assert cfg.vllm_options()["max_model_len"] == 9000 and cfg.vllm_options()["gpu_memory_utilization"] == 0.5
