"""Where numbers go: a JSONL file and TensorBoard in the run dir, and a progress bar on the terminal."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


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


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
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
