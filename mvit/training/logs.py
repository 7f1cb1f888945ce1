"""JSON-lines training log and the end-of-run plot of loss and accuracy curves."""

from __future__ import annotations

import json
import os
from typing import Optional


class JsonLog:
    def __init__(self, path: Optional[str]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, **record) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_after(path: str, step: int) -> None:
    """Drop the records of steps after ``step``, and the run's result: a run resumed from its
    checkpoint at ``step`` logs those steps again (they were logged twice, and plotted twice)."""
    if not os.path.exists(path):
        return
    records = read_jsonl(path)
    kept = [r for r in records if r.get("kind") != "result" and r.get("step", 0) <= step]
    if len(kept) == len(records):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


def plot_curves(log_path: str, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(log_path)
    steps = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["epoch"], r.get("top1", r.get("mAP"))) for r in records if r.get("kind") == "val"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        ax1.plot(*zip(*steps), lw=0.8)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_title("loss")
    if evals:
        ax2.plot(*zip(*evals), marker="o")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation top-1 / mAP (%)")
    ax2.set_ylim(0, 100)
    ax2.set_title("accuracy")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
