"""Curves of one or more runs in one PNG: entropy, reward, covariance per step, and reward against entropy.

Reads only `metrics.jsonl`, so it works on finished, running or copied run directories.

Seed groups. Run directories named `<name>_seed<N>` (e.g. `grpo_seed0`, `grpo_seed1`) are one method run
with several seeds: `plot_runs` draws their per-step mean with a shaded min-max band, labelled
`<name> (n seeds)`, over the steps every seed has reached. Other directories are drawn as single curves,
as before. `seed_summary` gives the numbers behind the demo's table (mean and std across seeds of a
metric's average over the first and last fifth of the steps).

Entropy dynamics (issue #26). When a run's metrics hold `dynamics/exact_pred_dH` (the exact first-order
prediction -mean Cov(log pi_old, dz) of megaent.ops.entropy_change) and `dynamics/exact_dH` (measured on the
same positions), the figure gains a third row: both per step, measured against predicted with the y = x
line and each method's correlation, and the older advantage-covariance estimate (`dynamics/pred_dH` vs
`dynamics/dH`) beside it. `dynamics_correlations` gives the per-seed numbers. A run with the entropy
controller on (`controller/target_entropy`) has its target drawn dotted in the entropy panel.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

from megaent.trainer.metrics import read_metrics

# Axis labels with units. Entropy is the token mean of -sum_v p log p in nats; covariance is the token mean of
# (log pi - mean)(A - mean), in nats x advantage units (advantages are group-normalised, so unitless).
STEP = "RL step (one rollout batch)"
ENTROPY = "policy entropy H (nats / token)"
REWARD = "reward R (mean per response)"
COV = "covariance (nats x advantage)"
PANELS = (("entropy/mean", "policy entropy (token mean)", ENTROPY),
          ("reward/mean", "reward (mean over responses)", REWARD),
          ("cov/mean", "Cov(log pi, A) (token mean)", COV),
          ("cov/top_0.02pct", "top-0.02% covariance (mean of the largest)", COV),
          ("response/length_mean", "response length (mean)", "tokens / response"))
DH = "entropy change dH (nats / token per step)"
EXACT = ("dynamics/exact_pred_dH", "dynamics/exact_dH")
ADV_COV = ("dynamics/pred_dH", "dynamics/dH")
SECOND = "dynamics/exact_second"
_SEED_DIR = re.compile(r"^(?P<name>.+)_seed(?P<seed>\d+)$")


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def group_runs(run_dirs: Sequence[str | Path]) -> dict[str, list[Path]]:
    """Group run directories by method: `<name>_seed<N>` -> `<name>`, any other directory -> its own name.

    Keeps the order of first appearance; within a group, directories are sorted by seed. Two different
    directories with the same label (e.g. `a/grpo` and `b/grpo`) stay separate, as `grpo` and `grpo#2`.
    """
    groups: dict[str, list[tuple[int, Path]]] = {}
    for d in map(Path, run_dirs):
        m = _SEED_DIR.match(d.name)
        if m:
            groups.setdefault(m["name"], []).append((int(m["seed"]), d))
            continue
        label, i = d.name, 1
        while label in groups:
            i += 1
            label = f"{d.name}#{i}"
        groups[label] = [(-1, d)]
    return {k: [d for _, d in sorted(v, key=lambda sd: sd[0])] for k, v in groups.items()}


def band(runs: Sequence[list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) of `key` across `runs` (lists of metrics rows), at the steps where every run
    has a value. One run gives mean = min = max = its own curve."""
    per_run = [dict(zip(*_series(rows, key))) for rows in runs]
    steps = sorted(set.intersection(*(set(s) for s in per_run))) if per_run else []
    vals = [[s[step] for s in per_run] for step in steps]
    return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def fifth_means(rows: list[dict], key: str) -> tuple[float, float]:
    """Mean of `key` over the first and over the last fifth of the rows that have it (at least one row each):
    single steps of a small demo are noisy. NaN when no row has the key."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return math.nan, math.nan
    k = max(1, len(vals) // 5)
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std (n - 1; 0 for a single value)."""
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return m, math.sqrt(var)


def seed_summary(run_dirs: Sequence[str | Path], keys: Sequence[str] = ("entropy/mean", "reward/mean")
                 ) -> list[dict]:
    """Per method (see `group_runs`): seeds, steps (fewest of its runs), and for each key the mean and std
    across seeds, and min and max over seeds, of the first- and last-fifth averages (`fifth_means`).

    Returns [{"method", "seeds", "steps", "<key>": {"first": (mean, std), "last": (mean, std),
    "last_min", "last_max"}}].
    """
    out = []
    for method, dirs in group_runs(run_dirs).items():
        rows = [read_metrics(d) for d in dirs]
        entry: dict = {"method": method, "seeds": len(dirs), "steps": min(len(r) for r in rows)}
        for key in keys:
            firsts, lasts = zip(*(fifth_means(r, key) for r in rows))
            entry[key] = {"first": _mean_std(list(firsts)), "last": _mean_std(list(lasts)),
                          "last_min": min(lasts), "last_max": max(lasts)}
        out.append(entry)
    return out


def format_summary(summary: list[dict], keys: Sequence[str] = ("entropy/mean", "reward/mean")) -> str:
    """A plain-text table of `seed_summary`: one row per method, `mean +- std` across seeds, then the range
    (min..max over seeds) of the first key's last-fifth average."""
    head = f"{'method':12s} {'seeds':>5s} {'steps':>5s}"
    for key in keys:
        short = key.split("/")[0]
        head += f" {short + ' first':>15s} {short + ' last':>15s}"
    head += f"  {keys[0].split('/')[0]} last, min..max over seeds"
    lines = [head]
    for e in summary:
        line = f"{e['method']:12s} {e['seeds']:5d} {e['steps']:5d}"
        for key in keys:
            for part in ("first", "last"):
                m, s = e[key][part]
                line += f" {f'{m:.3f} +- {s:.3f}':>15s}"
        line += f"  {e[keys[0]]['last_min']:.3f}..{e[keys[0]]['last_max']:.3f}"
        lines.append(line)
    return "\n".join(lines)


def _draw_band(ax, runs: list[list[dict]], key: str, label: str, **line_kw) -> None:
    steps, mean, lo, hi = band(runs, key)
    if not steps:
        return
    (line,) = ax.plot(steps, mean, label=label, **line_kw)
    if len(runs) > 1:
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)


def _pairs(rows: list[dict], keys: tuple[str, str]) -> tuple[list[float], list[float]]:
    pts = [(r[keys[0]], r[keys[1]]) for r in rows if r.get(keys[0]) is not None and r.get(keys[1]) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def dynamics_correlations(run_dirs: Sequence[str | Path]) -> list[dict]:
    """Per run directory: Pearson correlation over its steps of predicted and measured dH, for the exact
    prediction (`EXACT`) and the advantage-covariance estimate (`ADV_COV`); None where a run has fewer than 3
    such steps. "exact2_corr": the same for the prediction with its second-order term (exact_pred_dH +
    `dynamics/exact_second`), None when a run did not log it.
    Returns [{"method", "run", "exact_corr", "exact2_corr", "adv_cov_corr", "steps"}] in `group_runs` order."""
    from megaent.trainer.dynamics import pearson

    out = []
    for method, dirs in group_runs(run_dirs).items():
        for d in dirs:
            rows = read_metrics(d)
            ex, ad = _pairs(rows, EXACT), _pairs(rows, ADV_COV)
            two = [(r[EXACT[0]] + r[SECOND], r[EXACT[1]]) for r in rows
                   if all(r.get(k) is not None for k in (*EXACT, SECOND))]
            out.append({"method": method, "run": d.name, "exact_corr": pearson(*ex), "adv_cov_corr": pearson(*ad),
                        "exact2_corr": pearson([p[0] for p in two], [p[1] for p in two]), "steps": len(ex[0])})
    return out


def format_dynamics(corrs: list[dict]) -> str:
    """`dynamics_correlations` as the demo's table: one line per run."""
    f = lambda v: "   -  " if v is None else f"{v:+.3f}"  # noqa: E731
    lines = [f"{'run':<20} {'exact':>7} {'exact+2nd':>9} {'adv-cov':>8} {'steps':>5}"]
    lines += [f"{e['run']:<20} {f(e['exact_corr']):>7} {f(e['exact2_corr']):>9} {f(e['adv_cov_corr']):>8} "
              f"{e['steps']:>5}" for e in corrs]
    return "\n".join(lines)


def _has_dynamics(groups: list[tuple[str, list[list[dict]]]]) -> bool:
    return any(r.get(EXACT[0]) is not None for _, runs in groups for rows in runs for r in rows)


def _scatter_pred_meas(ax, groups, keys: tuple[str, str], title: str, xlabel: str) -> None:
    """Measured against predicted dH, one colour per method (all its seeds), the y = x line, r in the legend."""
    from megaent.trainer.dynamics import pearson

    lo, hi = math.inf, -math.inf
    for i, (label, runs) in enumerate(groups):
        xs, ys = _pairs([r for rows in runs for r in rows], keys)
        if not xs:
            continue
        corr = pearson(xs, ys)
        ax.scatter(xs, ys, s=10, alpha=0.6, color=f"C{i % 10}",
                   label=f"{label}: r = {corr:.3f}" if corr is not None else label)
        lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
    if lo < hi:
        ax.plot([lo, hi], [lo, hi], color="k", linewidth=0.8, linestyle="--", gid="identity", label="y = x")
        ax.legend(fontsize=7)
    ax.axhline(0, color="0.7", linewidth=0.5)
    ax.axvline(0, color="0.7", linewidth=0.5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("measured dH (nats / token per step)")
    ax.grid(alpha=0.3)


def _draw_dynamics_row(axes, groups) -> None:
    ax = axes[0]
    for i, (label, runs) in enumerate(groups):
        _draw_band(ax, runs, EXACT[1], f"{label} measured", color=f"C{i % 10}")
        _draw_band(ax, runs, EXACT[0], f"{label} predicted", color=f"C{i % 10}", linestyle="--")
    ax.axhline(0, color="0.7", linewidth=0.5)
    ax.set_title("entropy change per step: measured (solid) vs exact prediction (dashed)", fontsize=10)
    ax.set_xlabel(STEP)
    ax.set_ylabel(DH)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _scatter_pred_meas(axes[1], groups, EXACT, "measured vs exact predicted dH = -Cov(log pi, z' - z)",
                       "predicted dH = -Cov(log pi, dz) (nats / token per step)")
    _scatter_pred_meas(axes[2], groups, ADV_COV, "measured vs advantage-covariance estimate -lr Cov(log pi, A)",
                       "predicted dH = -lr Cov(log pi, A) (nats / token per step)")


def _label(name: str, dirs: list[Path]) -> str:
    if len(dirs) == 1 and not _SEED_DIR.match(dirs[0].name):
        return name
    return f"{name} ({len(dirs)} seed{'s' if len(dirs) > 1 else ''})"


def draw_law(ax, h: Sequence[float], r: Sequence[float], *, color=None, label: str = "") -> Optional[dict]:
    """Fit R = -a exp(H) + b (Cui et al. 2025, Eq. 1) to the points (h, r) and draw the fitted curve from
    H = 0 to the largest H, with the predicted ceiling R(H=0) = b - a marked at H = 0. Returns
    {"a", "b", "r2", "ceiling"}, or None (nothing drawn) with fewer than 3 points or no spread in H."""
    import numpy as np

    from megaent.algorithms.entropy_law import fit_entropy_law

    h_arr, r_arr = np.asarray(h, dtype=np.float64), np.asarray(r, dtype=np.float64)
    if h_arr.size < 3 or np.ptp(h_arr) == 0:
        return None
    fit = fit_entropy_law(h_arr, r_arr)
    grid = np.linspace(0.0, h_arr.max(), 100)
    prefix = f"{label}: " if label else ""
    ax.plot(grid, fit.predict(grid), color=color, linewidth=1.5, gid="law-fit",
            label=f"{prefix}R = -{fit.a:.3g} exp(H) + {fit.b:.3g}, R2 {fit.r2:.2f}, ceiling {fit.ceiling:.3f}")
    ax.plot([0.0], [fit.ceiling], marker="*", markersize=12, color=color, linestyle="none", gid="law-ceiling",
            label="_nolegend_")
    ax.annotate(f"{fit.ceiling:.3f}", (0.0, fit.ceiling), xytext=(8, -3), textcoords="offset points",
                fontsize=7, color=color)
    return {"a": fit.a, "b": fit.b, "r2": fit.r2, "ceiling": fit.ceiling}


def build_figure(run_dirs: Sequence[str | Path]):
    """The 2x3 figure of `plot_runs` (a matplotlib Figure; the caller saves and closes it): five curves per
    step and reward against entropy with the fitted law per method; 3x3 with the entropy-dynamics row when
    any run logged the exact prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(_label(name, dirs), [read_metrics(d) for d in dirs]) for name, dirs in group_runs(run_dirs).items()]
    dyn = _has_dynamics(groups)
    fig, axes = plt.subplots(3 if dyn else 2, 3, figsize=(15, 12 if dyn else 8))
    curve_axes = [axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1], axes[0, 2]]
    for ax, (key, title, ylabel) in zip(curve_axes, PANELS):
        for i, (label, runs) in enumerate(groups):
            _draw_band(ax, runs, key, label, color=f"C{i % 10}")
            if key == "entropy/mean":
                _draw_band(ax, runs, "controller/target_entropy", f"{label} target", color=f"C{i % 10}",
                           linestyle=":")
        ax.set_title(title)
        ax.set_xlabel(STEP)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax = axes[1, 2]
    for i, (label, runs) in enumerate(groups):
        pts = [(r["entropy/mean"], r["reward/mean"]) for rows in runs for r in rows
               if r.get("entropy/mean") is not None and r.get("reward/mean") is not None]
        if pts:
            color = f"C{i % 10}"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, alpha=0.5, color=color)
            draw_law(ax, [p[0] for p in pts], [p[1] for p in pts], color=color, label=label)
    ax.set_title("reward vs entropy, fitted R = -a exp(H) + b\n(star: ceiling R(H=0) = b - a)", fontsize=10)
    ax.set_xlabel(ENTROPY)
    ax.set_ylabel(REWARD)
    ax.set_xlim(left=-0.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")  # the points sit at the right, the ceiling stars at H = 0, top
    axes[0, 0].legend(fontsize=8)
    if dyn:
        _draw_dynamics_row(axes[2], groups)
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: Sequence[str | Path], *, out: Optional[str | Path] = None) -> Path:
    """Write the grid of `build_figure` for `run_dirs` and return the PNG path (default
    FIRST_RUN_DIR/curves.png).

    Label = directory name; `<name>_seed<N>` directories are drawn as one group (mean line, min-max band).
    """
    import matplotlib.pyplot as plt

    fig = build_figure(run_dirs)
    path = Path(out) if out else Path(run_dirs[0]) / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
