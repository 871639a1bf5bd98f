"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard events and loss.png."""

from __future__ import annotations

import json
from pathlib import Path

from gpt_jax.rundir import drop_torn_line, read_jsonl


class MetricsLog:
    """metrics.jsonl + TensorBoard events in the run directory (process 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            drop_torn_line(run_dir / "metrics.jsonl")  # a writer that died mid-line
            self.file = open(run_dir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if k not in ("step", "kind") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self):
        if self.enabled:
            self.file.close()
            self.tb.close()


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: train and val loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(run_dir / "metrics.jsonl")
    series = {}
    for r in records:  # later records win: a resumed run rewrites the steps after its checkpoint
        key = "val_loss" if r["kind"] == "eval" else "loss"
        if key in r:
            series.setdefault(r["kind"], {})[r["step"]] = r[key]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, points in series.items():
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], label="val" if kind == "eval" else "train",
                marker="o" if kind == "eval" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
    return run_dir / "loss.png"
