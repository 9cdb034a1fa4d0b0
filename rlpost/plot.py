"""`rlpost plot RUN_DIR`: one PNG of training curves from metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

from rollout.types import UserError
from rlpost.metrics import read_metrics

PANELS = [("reward", "reward (train)"), ("eval/accuracy", "held-out accuracy (greedy)"), ("kl", "KL to reference"),
          ("response_length", "response length (tokens)"), ("tokens_per_s", "tokens / s")]


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl (not an rlpost run dir)")
    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [out]
