"""`megaent fit-law RUN_DIR ...`: fit R = -a exp(H) + b to a run's (entropy, reward) curve and plot it.

Reads `metrics.jsonl` (entropy/mean, reward/mean per step), prints a, b, R^2, the predicted ceiling b - a and
the early-fit prediction error (fit on the first fraction of steps, RMSE on the rest, as the paper uses the law
to predict late training), writes `entropy_law.json` and a PNG with the points and the fitted curve.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megaent.algorithms import early_fit, fit_entropy_law
from megaent.trainer.metrics import read_metrics


def run_points(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in read_metrics(run_dir) if r.get("entropy/mean") is not None and r.get("reward/mean") is not None]
    return (np.array([r["entropy/mean"] for r in rows], dtype=np.float64),
            np.array([r["reward/mean"] for r in rows], dtype=np.float64))


def fit_run(run_dir: str | Path, *, early_fraction: float = 0.25) -> dict:
    h, r = run_points(run_dir)
    if h.size < 3:
        raise ValueError(f"{run_dir}: only {h.size} steps with entropy and reward in metrics.jsonl; the fit "
                         "needs at least 3 (train longer)")
    fit = fit_entropy_law(h, r)
    out = {"run": str(run_dir), "points": int(h.size), "a": fit.a, "b": fit.b, "r2": fit.r2, "ceiling": fit.ceiling}
    try:
        ef = early_fit(h, r, early_fraction)
        out.update(early_fraction=early_fraction, early_rmse=ef.rmse, early_a=ef.fit.a, early_b=ef.fit.b,
                   early_ceiling=ef.fit.ceiling)
    except ValueError as exc:  # too few points for a split: report the full fit only
        out["early_error"] = str(exc)
    return out


def plot_fits(run_dirs: Sequence[str | Path], fits: Sequence[dict], out: Path) -> Path:
    """Points of each run and its fitted curve from H = 0, the ceiling R(H=0) = b - a marked (draw_law)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megaent.trainer.plots import ENTROPY, REWARD, draw_law

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, d in enumerate(run_dirs):
        h, r = run_points(d)
        color = f"C{i % 10}"
        ax.scatter(h, r, s=12, color=color, alpha=0.6, label=f"{Path(d).name} ({h.size} steps)")
        draw_law(ax, h, r, color=color)
    ax.set_xlabel(ENTROPY)
    ax.set_ylabel(REWARD)
    ax.set_xlim(left=-0.02)
    ax.set_title("entropy-performance law R = -a exp(H) + b (star: ceiling R(H=0) = b - a)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def fit_law_cli(run_dirs: Sequence[str], *, early_fraction: float = 0.25, out: Optional[str] = None) -> int:
    fits = []
    for d in run_dirs:
        f = fit_run(d, early_fraction=early_fraction)
        fits.append(f)
        (Path(d) / "entropy_law.json").write_text(json.dumps(f, indent=1))
        early = (f"early fit on first {early_fraction:.0%}: RMSE {f['early_rmse']:.4f} on the rest, "
                 f"ceiling {f['early_ceiling']:.4f}") if "early_rmse" in f else f["early_error"]
        print(f"{d}: a={f['a']:.4f} b={f['b']:.4f} R^2={f['r2']:.3f} ceiling(b-a)={f['ceiling']:.4f} "
              f"points={f['points']}; {early}")
    png = plot_fits(run_dirs, fits, Path(out) if out else Path(run_dirs[0]) / "entropy_law.png")
    print(png)
    return 0
