"""GRPO must not change when the core is reshaped (issue "One loop for every method").

The default 3-step run (sync scheduler, uniform sampler, autograd, tiny digit model) is fingerprinted:
the mean reward, loss and gradient norm of every step, and per weight tensor the float64 norm of
the update (final - initial weights) and a SHA-256 of the final bytes.

- Two runs of the current code must agree bit for bit (same seed, same config).
- `golden/grpo_3step_pre_reshape.json` is the GOLDEN FILE recorded by running this same fingerprint
  on commit a4f0f95, the last commit before the reshaping. On a CPU that rounds like the recording
  machine the bytes match exactly. Machines of this kind differ in float32 kernels (the last bits
  of a matmul differ), so across CPUs the comparison is: the step rewards exactly (they are means
  of 0 / 0.5 / 1 / 1.5 scores; a flipped sample needs a uniform draw within ~1e-7 of a boundary) and
  the update norms within 1e-3 relative. A reshaping mistake (a wrong normaliser, a lost micro-batch,
  a KL term added twice) moves an update norm by a factor, not by 1e-3; float32 rounding over three
  Adam steps moves it by ~1e-6.
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "grpo_3step_pre_reshape.json"


def fingerprint(run_dir: Path, initial_model: str) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlpost.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if "reward" in r]
    final = load_file(run_dir / "checkpoints" / "step_3" / "hf" / "model.safetensors")
    initial = AutoModelForCausalLM.from_pretrained(initial_model).state_dict()
    return {
        "steps": [{"reward": r["reward"], "loss": r["loss"], "grad_norm": r["grad_norm"]} for r in rows],
        "update_norms": {k: float((v.double() - initial[k].double()).norm()) for k, v in sorted(final.items())},
        "sha256": {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                   for k, v in sorted(final.items())},
    }


def run_default(run_dir: Path, model: str) -> dict:
    from test_end_to_end import _overrides

    from rlpost.trainer import train

    train(_overrides(run_dir, 3, model, "uniform", "checkpoint.every=0"), show_progress=False)
    return fingerprint(run_dir, model)


def test_grpo_is_bit_identical_run_to_run_and_matches_the_pre_reshape_golden(tmp_path, digit_model):
    first, second = run_default(tmp_path / "a", digit_model), run_default(tmp_path / "b", digit_model)
    assert first == second, "same seed, same config: two runs must agree bit for bit"

    golden = json.loads(GOLDEN.read_text())
    assert [s["reward"] for s in first["steps"]] == [s["reward"] for s in golden["steps"]]
    if first["sha256"] == golden["sha256"]:
        return  # this CPU rounds like the recording machine: bit-identical to the pre-reshape code
    for name, norm in golden["update_norms"].items():
        assert first["update_norms"][name] == pytest.approx(norm, rel=1e-3), name
    for got, want in zip(first["steps"], golden["steps"]):
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3)
