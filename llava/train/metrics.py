"""Training metrics: one JSON line per logged step (metrics.jsonl) and the loss curve as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.io import atomic_path, atomic_write_text


class MetricsLog:
    """Appends to output/metrics.jsonl; on resume, lines past the resumed step are dropped first so the
    file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is None:
            if path.exists():
                path.unlink()
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict], path: Path, title: str = "training loss") -> Path | None:
    """Loss against step (and a smoothed line) as a PNG; None when there is nothing to plot."""
    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*points)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=1, alpha=0.5, label="loss")
    if len(losses) >= 10:
        window = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
