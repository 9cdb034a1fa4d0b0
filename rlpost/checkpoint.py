"""Atomic checkpoints: `checkpoints/step_N/{hf/, deepspeed/, trainer_state.pt}` plus a `latest` symlink.
`hf/` is a plain HF model folder, or with LoRA (model.lora) the adapter in peft's format
(adapter_config.json + adapter_model.safetensors); `rlpost export --merge` turns it into a plain folder.

A checkpoint is written to a hidden temp dir and renamed into place; `latest` is switched with an
atomic symlink replace. At every moment `latest` resolves to a complete checkpoint, so a kill at any
point leaves the previous checkpoints and `latest` usable. Re-saving a step that exists (after a
resume from an earlier one): `latest` first points at the complete temp dir, then the old step is
removed and the temp dir renamed into its place, then `latest` points at it again; a kill between
the rename and the switch leaves `latest -> .step_N.tmp`, which `resolve_checkpoint` follows to
`step_N` (the same, complete directory under its final name).

The trainer state is loaded with `torch.load(weights_only=True)`: only tensors, numbers, strings,
lists, tuples and dicts, so a checkpoint from someone else can never run code on load (a pickle with
a `__reduce__` is refused with one line). RNG states are stored in that form.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rlpost.metrics import gather
from rollout.models import is_model_folder
from rollout.types import UserError, world

STATE_FILE = "trainer_state.pt"


class CheckpointError(UserError):
    pass


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (e.g. no space left); nothing that existed before was touched."""


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(trainer_state: dict) -> None:
    """Each rank's own generators as saved (its rollouts sampled from them), when the world size is
    the one that saved them; else every rank gets rank 0's (a resume on another world size is not
    exact anyway)."""
    rank, world_size = world()
    ranks = trainer_state.get("rng_ranks") or []
    set_rng_state(ranks[rank] if len(ranks) == world_size else trainer_state["rng"])


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _point_latest(root: Path, name: str) -> None:
    link = root / ".latest.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(name, link)
    os.replace(link, root / "latest")


def save_checkpoint(run_dir: Path, step: int, learner, tokenizer, trainer_state: dict, keep_last: int,
                    extra_learners: dict | None = None) -> Path:
    """`learner` under hf/ and deepspeed/; each of `extra_learners` (PRIME's PRM) the same under its name."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
    is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if is_main:
        for stale in root.glob(".step_*.tmp"):  # left by a run killed mid-save; never what `latest` resolves to
            if stale != tmp and not (root / "latest").resolve() == stale.resolve():
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    rngs = gather(rng_state())  # every rank's generators (a collective)
    try:
        learner.save(tmp, tokenizer)  # collective under ZeRO: every rank takes part
        for name, other in (extra_learners or {}).items():
            (tmp / name).mkdir(exist_ok=True)
            other.save(tmp / name, tokenizer)
        _barrier()
        if is_main:
            torch.save({**trainer_state, "step": step, "rng": rngs[0], "rng_ranks": rngs}, tmp / STATE_FILE)
    except OSError as e:  # disk full, quota, ...: drop the partial copy, keep everything that was there
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint step {step} ({e.strerror or e}); the earlier "
                                   f"checkpoints and `latest` are intact") from None
    if is_main:
        if final.exists():  # re-saving a step after a resume: never leave `latest` on a half-removed dir
            _point_latest(root, tmp.name)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _point_latest(root, final.name)
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
    if (path / "checkpoints" / "latest").is_symlink():
        path = path / "checkpoints" / "latest"
    if path.is_symlink() and not path.exists():  # `latest -> .step_N.tmp` after a kill mid-re-save
        target = Path(os.readlink(path))
        renamed = path.parent / target.name.removeprefix(".").removesuffix(".tmp")
        if target.name.startswith(".step_") and renamed.exists():
            path = renamed
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    path = path.resolve()
    hf = path / "hf"
    if not (path / STATE_FILE).is_file() or not is_model_folder(hf):
        raise CheckpointError(f"{path} is not an rlpost checkpoint (expected {STATE_FILE} and hf/config.json, "
                              f"or hf/adapter_config.json for LoRA)")
    return path


def load_trainer_state(path: Path) -> dict:
    """The trainer state, loaded without ever running code from the file."""
    file = Path(path) / STATE_FILE
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file}: refusing to load it: it holds objects other than tensors and plain data, "
                              f"and loading them could run code ({reason[:160]})") from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{file}: not a readable trainer state ({str(e).splitlines()[0][:160]})") from None


# Keys whose change would make a resumed run a different run (refused); everything else (max_steps,
# eval and checkpoint cadence, lr, engine, backward mode, ...) may change on resume.
RUN_IDENTITY = ("algorithm", "model.", "data.", "run.seed", "rollout.group_size", "rollout.scheduler", "curriculum.")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume(state: dict, config: dict, resume_dir: Path) -> None:
    """Refuse a resume whose config changes what the run is, naming every differing key."""
    saved_model, model = state["config"]["model"]["name"], config["model"]["name"]
    if saved_model != model:
        raise CheckpointError(f"{resume_dir} was trained from model {saved_model!r}, but model.name is {model!r}")
    saved, now = _flat(state["config"]), _flat(config)
    differ = sorted(k for k in saved.keys() | now.keys()
                    if k.startswith(RUN_IDENTITY) and saved.get(k) != now.get(k))
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise CheckpointError(f"{resume_dir}: this config changes what the run is, so it cannot resume it "
                                   f"({changes}); start a new run directory instead")
