"""Pictures a run leaves behind: the learning curve (sample grids are drawn by `rebel_diffusion.grids`)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402



def save_learning_curve(metrics_path: str | Path, path: str | Path, title: str = "",
                        eval_path: str | Path | None = None) -> None:
    """Plot the training reward's mean +- std per epoch against reward queries from a run's metrics.jsonl, and the
    held-out `eval_*` metrics of eval.jsonl (on a second axis) when given."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    x = np.array([r["reward_queries"] for r in records])
    mean = np.array([r["reward_mean"] for r in records])
    std = np.array([r["reward_std"] for r in records])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, mean, marker="o", label="train reward")
    ax.fill_between(x, mean - std, mean + std, alpha=0.25, label="± std across samples")
    ax.set_xlabel("reward queries")
    ax.set_ylabel("reward (mean per epoch)")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if eval_path is not None:
        # An evaluation after e epochs sits at the reward queries spent by then.
        queries = {r["epoch"] + 1: r["reward_queries"] for r in records} | {0: 0}
        evals = [json.loads(line) for line in Path(eval_path).read_text().splitlines() if line.strip()]
        evals = [e for e in evals if e["epoch"] in queries]
        twin = ax.twinx()
        for key in sorted({k for e in evals for k in e if k.startswith("eval_")}):
            points = [(queries[e["epoch"]], e[key]) for e in evals if key in e]
            twin.plot(*zip(*points), marker="s", linestyle="--", label=f"held-out {key[5:]}")
        twin.set_ylabel("held-out (eval) metrics")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
