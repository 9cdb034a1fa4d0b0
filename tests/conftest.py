import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """GSM8K / hh-rlhf live outside the repo; RLPOST_DATA overrides where. Tests using them skip without."""
    candidates = [os.environ.get("RLPOST_DATA"), REPO.parent / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def skip_unless_required(reason: str):
    """Skip, or fail where the environment must be complete: CI (.ci/run) sets RLPOST_REQUIRE_ALL=1,
    so a missing piece of what it installs (the DeepSpeed launcher, vLLM) fails the run instead of
    silently skipping the tests that need it."""
    if os.environ.get("RLPOST_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason} (RLPOST_REQUIRE_ALL=1: required)")
    pytest.skip(reason)


def deepspeed_launcher() -> Path:
    """The `deepspeed` launcher of the environment running the tests (beside its python)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.is_file():
        skip_unless_required(f"deepspeed launcher not found beside {sys.executable}")
    return launcher


@pytest.fixture
def gsm8k_dir() -> Path:
    data = shared_data_dir()
    if data is None or not (data / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("GSM8K data not found (set RLPOST_DATA to the folder holding gsm8k/)")
    return data / "gsm8k"


@pytest.fixture(scope="session")
def tokenizer():
    from rollout.models import load_tokenizer
    return load_tokenizer("tiny-random")


@pytest.fixture(scope="session")
def digit_model() -> str:
    """The `tiny-digits` model (rollout/models.py): its answers to "What is 3 + 4?" are sometimes right,
    so rewards vary inside groups and GRPO really updates."""
    from rollout.models import resolve
    return resolve("tiny-digits")


def subprocess_env() -> dict:
    """The environment for child processes, minus the rendezvous variables that an in-process run
    (rlpost.learner.init_distributed) set in this pytest process: a child must pick its own port."""
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
