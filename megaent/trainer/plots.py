"""Curves of one or more runs in one PNG: entropy, reward, covariance per step, and reward against entropy.

Reads only `metrics.jsonl`, so it works on finished, running or copied run directories.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from megaent.trainer.metrics import read_metrics

PANELS = (("entropy/mean", "policy entropy (token mean)"), ("reward/mean", "reward (mean)"),
          ("cov/mean", "Cov(log pi, A) (token mean)"), ("cov/top_0.02pct", "top-0.02% covariance"))


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs: Sequence[str | Path], *, out: Optional[str | Path] = None) -> Path:
    """Write a 2x3 grid of curves for `run_dirs` (label = directory name) and return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d).name, read_metrics(d)) for d in run_dirs]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    flat = axes.ravel()
    for ax, (key, title) in zip(flat, PANELS):
        for name, rows in runs:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = flat[4]
    for name, rows in runs:
        pts = [(r["entropy/mean"], r["reward/mean"]) for r in rows
               if r.get("entropy/mean") is not None and r.get("reward/mean") is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, label=name)
    ax.set_title("reward vs entropy (R = -a exp(H) + b)")
    ax.set_xlabel("entropy")
    ax.grid(alpha=0.3)
    ax = flat[5]
    for name, rows in runs:
        xs, ys = _series(rows, "response/length_mean")
        if xs:
            ax.plot(xs, ys, label=name)
    ax.set_title("response length (mean tokens)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    flat[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dirs[0]) / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
