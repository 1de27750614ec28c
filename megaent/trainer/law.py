"""`megaent fit-law RUN_DIR ...`: does R = -a exp(H) + b, fitted on the start of training, predict the rest?

The paper's use of its law (Cui et al. 2025, arXiv 2505.22617): fit R = -a exp(H) + b on the first
`fit_fraction` of a run's steps, then check the prediction on the steps it never saw and read off
the predicted ceiling R(H=0) = b - a. Per run and pooled over all given runs (e.g. the seeds of a method) this
reports:

- a, b of that early fit and the ceiling b - a, with the mean and a 90% percentile interval over a bootstrap of
  the fitted steps (`bootstrap_fits`: pairs resampled with replacement, refitted);
- the prediction RMSE on the held-out last half of the steps (the steps after the fitted prefix when it
  reaches past the middle) and on all the steps after the prefix;
- R^2 of the fit on all steps (the law's in-sample quality; "pooled" fits every run's points together).

Points are the steps of metrics.jsonl with both entropy/mean and reward/mean, in step order. Prints a rich
table, writes the JSON summary next to the PNG (law.png -> law.json) and the figure: reward vs entropy per
run, fitted steps filled and held-out steps hollow, the early fit drawn from H = 0 with its bootstrap band and
the ceiling at H = 0 with its interval.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from megaent.algorithms.entropy_law import (
    MIN_FIT_POINTS, CeilingInterval, EntropyLawFit, bootstrap_fits, ceiling_interval, fit_count, fit_entropy_law,
    rmse, steps_needed,
)
from megaent.trainer.metrics import read_metrics

DEFAULT_FIT_FRACTION = 0.25
DEFAULT_BOOTSTRAP = 200
LEVEL = 0.9
POOLED = "pooled"


class RunPoints(NamedTuple):
    name: str
    entropy: np.ndarray   # [n] fp64, step order
    reward: np.ndarray    # [n] fp64
    n_fit: int            # the first n_fit points are fitted
    last_start: int       # held-out "last half": points [last_start:], never inside the fitted prefix


class LawFit(NamedTuple):
    """One row of the report: a run, or the pool of all runs."""
    name: str
    steps: int
    fit_steps: int
    full: EntropyLawFit               # on all steps
    early: Optional[EntropyLawFit]    # on the fitted prefix; None when it is too short (see note)
    boot_a: np.ndarray                # [n_used] bootstrap refits of the early fit
    boot_b: np.ndarray
    ceiling: Optional[CeilingInterval]
    rmse_last_half: float
    rmse_rest: float
    held_out_last_half: int
    held_out_rest: int
    note: str
    pooled: bool = False              # the pool of all runs (its name is POOLED; a run dir may be called that too)

    def as_json(self) -> dict:
        def clean(x: float) -> Optional[float]:
            return x if math.isfinite(x) else None

        out = {"run": self.name, "pooled": self.pooled, "steps": self.steps, "fit_steps": self.fit_steps,
               "full_fit": {"a": self.full.a, "b": self.full.b, "r2": self.full.r2, "ceiling": self.full.ceiling},
               "held_out_last_half_steps": self.held_out_last_half, "held_out_rest_steps": self.held_out_rest}
        if self.early is not None:
            out["fit"] = {"a": self.early.a, "b": self.early.b, "r2": self.early.r2, "ceiling": self.early.ceiling}
            out["rmse_last_half"] = clean(self.rmse_last_half)
            out["rmse_rest"] = clean(self.rmse_rest)
        if self.ceiling is not None:
            c = self.ceiling
            out["ceiling_bootstrap"] = {"mean": c.mean, "lo": c.lo, "hi": c.hi, "level": c.level,
                                        "resamples_used": c.n_used}
        if self.note:
            out["note"] = self.note
        return out


def check_fraction(fit_fraction: float) -> None:
    if not (0.0 < fit_fraction < 1.0):
        raise ValueError(f"--fit-fraction {fit_fraction}: must be in (0, 1), the share of each run's first steps "
                         "that the law is fitted on (0.25: the first quarter)")


def run_points(run_dir: str | Path, *, fit_fraction: float = DEFAULT_FIT_FRACTION) -> RunPoints:
    """The (entropy, reward) steps of a run dir's metrics.jsonl, split into the fitted prefix and the rest."""
    rows = [r for r in read_metrics(run_dir) if r.get("entropy/mean") is not None and r.get("reward/mean") is not None]
    rows.sort(key=lambda r: r.get("step", 0))
    h = np.array([r["entropy/mean"] for r in rows], dtype=np.float64)
    r = np.array([r["reward/mean"] for r in rows], dtype=np.float64)
    if h.size < MIN_FIT_POINTS:
        raise ValueError(f"{run_dir}: {h.size} step(s) with entropy/mean and reward/mean in metrics.jsonl; the law "
                         f"needs at least {MIN_FIT_POINTS} (>= {steps_needed(fit_fraction)} to fit on the first "
                         f"{fit_fraction:g} and predict the rest): train longer")
    n_fit = fit_count(h.size, fit_fraction)
    return RunPoints(str(run_dir), h, r, n_fit, max(n_fit, h.size - h.size // 2))


def _analyse(name: str, parts: Sequence[RunPoints], *, fit_fraction: float, n_boot: int,
             seed: Sequence[int], pooled: bool = False) -> LawFit:
    """Early fit on the concatenated fitted prefixes of `parts`, scored on their concatenated held-out steps. For
    a pool the bootstrap resamples all fitted steps together (not per run): the runs are seeds of one law."""
    cat = lambda sl: (np.concatenate([p.entropy[sl(p)] for p in parts]),  # noqa: E731
                      np.concatenate([p.reward[sl(p)] for p in parts]))
    h_all, r_all = cat(lambda p: slice(None))
    h_fit, r_fit = cat(lambda p: slice(None, p.n_fit))
    h_last, r_last = cat(lambda p: slice(p.last_start, None))
    h_rest, r_rest = cat(lambda p: slice(p.n_fit, None))
    full = fit_entropy_law(h_all, r_all)
    base = dict(name=name, pooled=pooled, steps=h_all.size, fit_steps=h_fit.size, full=full, held_out_last_half=h_last.size,
                held_out_rest=h_rest.size)
    if h_fit.size < MIN_FIT_POINTS or np.ptp(h_fit) == 0:
        why = (f"{h_fit.size} fitted step(s) (first {fit_fraction:g} of {h_all.size}); the early fit needs >= "
               f"{MIN_FIT_POINTS} with varying entropy, i.e. >= {steps_needed(fit_fraction)} steps per run at "
               f"--fit-fraction {fit_fraction:g}: train longer or raise --fit-fraction")
        empty = np.zeros(0)
        return LawFit(**base, early=None, boot_a=empty, boot_b=empty, ceiling=None, rmse_last_half=math.nan,
                      rmse_rest=math.nan, note=why)
    early = fit_entropy_law(h_fit, r_fit)
    boot_a, boot_b = bootstrap_fits(h_fit, r_fit, n_boot=n_boot, seed=list(seed))
    ceiling = ceiling_interval(boot_a, boot_b, level=LEVEL) if boot_a.size else None
    return LawFit(**base, early=early, boot_a=boot_a, boot_b=boot_b, ceiling=ceiling,
                  rmse_last_half=rmse(early, h_last, r_last), rmse_rest=rmse(early, h_rest, r_rest), note="")


def fit_runs(run_dirs: Sequence[str | Path], *, fit_fraction: float = DEFAULT_FIT_FRACTION,
             n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> tuple[list[RunPoints], list[LawFit]]:
    """Per-run LawFits, then the pooled one when there are several runs. Run i's bootstrap draws from the
    stream seeded (seed, i), the pool's from (seed, len(run_dirs)): adding a run leaves the others' unchanged."""
    check_fraction(fit_fraction)
    if n_boot < 1:
        raise ValueError(f"--bootstrap {n_boot}: must be >= 1 resample (about 200 gives a stable 90% interval)")
    pts = [run_points(d, fit_fraction=fit_fraction) for d in run_dirs]
    fits = [_analyse(p.name, [p], fit_fraction=fit_fraction, n_boot=n_boot, seed=(seed, i)) for i, p in enumerate(pts)]
    if len(pts) > 1:
        fits.append(_analyse(POOLED, pts, fit_fraction=fit_fraction, n_boot=n_boot, seed=(seed, len(pts)),
                             pooled=True))
    return pts, fits


def summary(fits: Sequence[LawFit], *, fit_fraction: float, n_boot: int, seed: int) -> dict:
    return {"law": "R = -a exp(H) + b", "fit_fraction": fit_fraction,
            "bootstrap": {"resamples": n_boot, "seed": seed, "level": LEVEL},
            "runs": [f.as_json() for f in fits if not f.pooled],
            "pooled": next((f.as_json() for f in fits if f.pooled), None)}


def _fmt(x: float, digits: int = 4) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}f}"


def law_table(fits: Sequence[LawFit], *, fit_fraction: float):
    """A rich Table: one row per run and the pool."""
    from rich.table import Table

    t = Table(title=f"R = -a exp(H) + b fitted on the first {fit_fraction:.0%} of steps; bootstrap {LEVEL:.0%} "
                    "interval of the ceiling", title_justify="left")
    t.add_column("run", overflow="fold")  # a path is folded, never cut to "..." (its tail tells runs apart)
    for col in ("steps", "fit", "a", "b", "RMSE last 50%", "RMSE rest", "R^2 all steps", "ceiling b-a",
                f"bootstrap mean [{LEVEL:.0%}]"):
        t.add_column(col, justify="right", no_wrap=True)
    names = [f.name if f.pooled else Path(f.name).name for f in fits]
    if len(set(names)) < len(names):  # two runs of the same directory name: show the paths as given
        names = [f.name for f in fits]
    pool_next = lambda i: i + 2 == len(fits) and fits[-1].pooled  # noqa: E731  a rule above the pool
    for i, f in enumerate(fits):
        e, c = f.early, f.ceiling
        t.add_row(names[i], str(f.steps), str(f.fit_steps), _fmt(e.a) if e else "-", _fmt(e.b) if e else "-",
                  _fmt(f.rmse_last_half), _fmt(f.rmse_rest), _fmt(f.full.r2, 3), _fmt(e.ceiling) if e else "-",
                  f"{c.mean:.4f} [{c.lo:.4f}, {c.hi:.4f}]" if c else "-", end_section=pool_next(i))
    return t


def build_law_figure(points: Sequence[RunPoints], fits: Sequence[LawFit], *, fit_fraction: float):
    """Reward vs entropy per run (a matplotlib Figure; the caller saves and closes it). Fitted steps filled,
    held-out steps hollow; each run's early fit from H = 0 to its largest H with the 5-95% band of its
    bootstrap refits, the ceiling b - a at H = 0 with its interval; the pool in black when there are several
    runs. A run too short for the early fit shows its full fit, dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megaent.trainer.plots import ENTROPY, REWARD

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    h_max = max(float(p.entropy.max()) for p in points)
    grid = np.linspace(0.0, h_max, 120)
    for i, p in enumerate(points):
        color = f"C{i % 10}"
        ax.scatter(p.entropy[:p.n_fit], p.reward[:p.n_fit], s=16, color=color, gid="law-fitted", label="_nolegend_")
        ax.scatter(p.entropy[p.n_fit:], p.reward[p.n_fit:], s=16, facecolors="none", edgecolors=color, alpha=0.7,
                   gid="law-held-out", label="_nolegend_")
        draw_law_fit(ax, fits[i], grid, color=color)  # fit_runs: fits[i] is points[i]'s
    for f in fits[len(points):]:
        draw_law_fit(ax, f, grid, color="black", linestyle="--")
    # one legend entry each for the two kinds of point, in grey: the colours are the runs'
    ax.scatter([], [], s=16, color="grey", label=f"fitted steps (first {fit_fraction:.0%} of each run)")
    ax.scatter([], [], s=16, facecolors="none", edgecolors="grey", label="held-out steps")
    ax.set_xlabel(ENTROPY)
    ax.set_ylabel(REWARD)
    ax.set_xlim(left=-0.03 * h_max)
    ax.set_title(f"R = -a exp(H) + b fitted on the first {fit_fraction:.0%} of steps, extrapolated to H = 0\n"
                 f"(hollow: held out; star: ceiling b - a with its bootstrap {LEVEL:.0%} interval)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def draw_law_fit(ax, f: LawFit, grid: np.ndarray, *, color, linestyle: str = "-") -> None:
    """Draw one LawFit on a matplotlib Axes: the early fit over `grid` (entropy values, from 0) with the 90% band
    of its bootstrap refits, the ceiling at H = 0 with its interval; the full fit, dotted, when there is no early
    fit. Gids law-fit / law-band / law-ceiling / law-ceiling-interval / law-full-fit name the artists."""
    label = f.name if f.pooled else Path(f.name).name
    if f.early is None:
        ax.plot(grid, f.full.predict(grid), color=color, linestyle=":", gid="law-full-fit",
                label=f"{label}: fit on all steps (too few for the early fit)")
        return
    e, c = f.early, f.ceiling
    ax.plot(grid, e.predict(grid), color=color, linestyle=linestyle, linewidth=1.5, gid="law-fit",
            label=f"{label}: R = -{e.a:.3g} exp(H) + {e.b:.3g}; ceiling {e.ceiling:.3f}"
                  + (f" [{c.lo:.3f}, {c.hi:.3f}]" if c else "") + f"; RMSE last 50% {_fmt(f.rmse_last_half, 3)}")
    if f.boot_a.size:
        curves = -f.boot_a[:, None] * np.exp(grid)[None, :] + f.boot_b[:, None]   # [n_used, grid]
        lo, hi = np.quantile(curves, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0)
        ax.fill_between(grid, lo, hi, color=color, alpha=0.15, linewidth=0, gid="law-band")
    yerr = [[e.ceiling - c.lo], [c.hi - e.ceiling]] if c else None
    bar = ax.errorbar([0.0], [e.ceiling], yerr=yerr, marker="*", markersize=11, color=color, capsize=4,
                      linestyle="none", gid="law-ceiling", label="_nolegend_")
    if c:
        bar.lines[2][0].set_gid("law-ceiling-interval")  # the vertical bar: the bootstrap interval at H = 0


def fit_law_cli(run_dirs: Sequence[str], *, fit_fraction: float = DEFAULT_FIT_FRACTION, out: Optional[str] = None,
                n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> int:
    """Fit, print the table and notes, write PNG (default FIRST_RUN_DIR/entropy_law.png) and its .json."""
    import matplotlib.pyplot as plt
    from rich.console import Console

    points, fits = fit_runs(run_dirs, fit_fraction=fit_fraction, n_boot=n_boot, seed=seed)
    png = Path(out) if out else Path(run_dirs[0]) / "entropy_law.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    js = png.with_suffix(".json")
    js.write_text(json.dumps(summary(fits, fit_fraction=fit_fraction, n_boot=n_boot, seed=seed), indent=1) + "\n")
    fig = build_law_figure(points, fits, fit_fraction=fit_fraction)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    console = Console(highlight=False, markup=False)
    if not console.is_terminal:  # a pipe or log file: no 80-column wrap of the table
        console = Console(highlight=False, markup=False, width=160)
    console.print(law_table(fits, fit_fraction=fit_fraction))
    for f in fits:
        if f.note:
            console.print(f"note: {f.name}: {f.note}", soft_wrap=True)
    console.print(f"{png}\n{js}")
    return 0
