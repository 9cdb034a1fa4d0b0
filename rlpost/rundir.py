"""The run directory: one live run at a time, and the error a run stops with."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from rollout.types import UserError, world


class RunError(RuntimeError):
    """A run that cannot go on (repeated non-finite steps, a failing engine). The CLI prints it as one
    line (exit 1); the full traceback is in the run dir's error.log; the checkpoints are intact."""


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One live run per run directory: a second `rlpost train` into it is refused, instead of two runs
    interleaving their checkpoints. An OS lock (flock), so a killed run never leaves it held."""
    # before torch.distributed starts, a launcher's rank is only in the environment
    rank = world()[0] if world()[1] > 1 else int(os.environ.get("RANK", "0"))
    if rank != 0:  # rank 0 holds the lock for the whole job
        yield
        return
    with open(run_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise UserError(f"{run_dir} is in use by a live run (pid {owner}); wait for it or use another "
                            f"run.output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
