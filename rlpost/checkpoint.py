"""Atomic checkpoints: `checkpoints/step_N/{hf/, deepspeed/, trainer_state.pt}` plus a `latest` symlink.

A checkpoint is written to a hidden temp dir and renamed into place; `latest` is switched with an
atomic symlink replace. A crash mid-save leaves the previous checkpoints and `latest` untouched.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rollout.types import UserError

STATE_FILE = "trainer_state.pt"


class CheckpointError(UserError):
    pass


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(run_dir: Path, step: int, learner, tokenizer, trainer_state: dict, keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
    is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    learner.save(tmp, tokenizer)  # collective under ZeRO: every rank takes part
    _barrier()
    if is_main:
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
        if final.exists():  # re-saving a step after a resume: the new one replaces it only once complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        link = root / ".latest.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(final.name, link)
        os.replace(link, root / "latest")
        _prune(root, keep_last, keep=final)
    _barrier()
    return final


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for old in steps[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir (or the `latest` link, or a run dir) -> the resolved step dir; clear error otherwise."""
    path = Path(path)
    if (path / "checkpoints" / "latest").exists():
        path = path / "checkpoints" / "latest"
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    path = path.resolve()
    if not (path / STATE_FILE).is_file() or not (path / "hf" / "config.json").is_file():
        raise CheckpointError(f"{path} is not an rlpost checkpoint (expected {STATE_FILE} and hf/config.json)")
    return path


def load_trainer_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, weights_only=False)
