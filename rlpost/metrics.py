"""Where numbers go: a JSONL file and TensorBoard in the run dir, and a progress bar on the terminal;
and how a step's numbers become the whole job's on several ranks (`gather`, `over_ranks`)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rollout.types import world


@dataclass(frozen=True)
class Mean:
    """A weighted mean that adds up across micro-batches (and ranks): total / weight."""
    total: float
    weight: float

    def __add__(self, other: "Mean") -> "Mean":
        return Mean(self.total + other.total, self.weight + other.weight)

    @property
    def value(self) -> float:
        return self.total / self.weight


# A loss's statistics: a float is summed over micro-batches (the loss itself), a Mean is averaged.
Stats = dict[str, "float | Mean"]


def accumulate(totals: Stats, stats: Stats) -> None:
    for key, value in stats.items():
        value = Mean(float(value.total), float(value.weight)) if isinstance(value, Mean) else float(value)
        totals[key] = totals[key] + value if key in totals else value


def resolve(stats: Stats) -> dict[str, float]:
    """Stats as numbers; a mean over nothing (weight 0) is left out."""
    return {k: (v.value if isinstance(v, Mean) else v) for k, v in stats.items()
            if not (isinstance(v, Mean) and v.weight == 0)}


def gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order: a collective, so every rank must call it."""
    if world()[1] == 1:
        return [obj]
    out: list = [None] * world()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


def over_ranks(stats: Stats, sums: tuple[str, ...] = (), maxes: tuple[str, ...] = ()) -> Stats:
    """One rank's stats -> the job's: Means pool their totals and weights (a mean weighted by samples
    or tokens over all ranks); a float is averaged over the ranks that report it (a loss already
    normalised for DeepSpeed's rank averaging), or summed (`sums`: counts) or maxed (`maxes`: the
    slowest rank's seconds). A collective."""
    everyone = gather(stats)
    out: Stats = {}
    for key in dict.fromkeys(k for s in everyone for k in s):
        values = [s[key] for s in everyone if key in s]
        if isinstance(values[0], Mean):
            out[key] = Mean(sum(v.total for v in values), sum(v.weight for v in values))
        elif key in sums:
            out[key] = float(sum(values))
        elif key in maxes:
            out[key] = float(max(values))
        else:
            out[key] = float(sum(values) / len(values))
    return out


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # a bare machine (the GPU check's): metrics.jsonl only
                print("rlpost: tensorboard is not installed; metrics go to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self._tb is None:
            return
        for key, value in clean.items():
            if isinstance(value, float) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def progress_bar(start: int, total: int, enabled: bool = True) -> tqdm:
    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
