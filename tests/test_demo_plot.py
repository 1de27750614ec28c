"""`megaent plot` seed groups and the demo's seed table (megaent/trainer/plots.py).

Compares against numpy statistics computed here on synthetic metrics.jsonl files (random curves, some runs
shorter, some rows missing a key), and checks that the PNG is written for grouped, ungrouped and mixed runs,
that every panel has labelled axes, that the reward-vs-entropy panel draws the law fitted by
megaent.algorithms.entropy_law with its ceiling b - a at H = 0, and that the CLI verb works on a shell glob
that also matches the runs' .log files. No training; runs in a few seconds:

    OMP_NUM_THREADS=1 python -m pytest tests/test_demo_plot.py -q
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megaent.algorithms.entropy_law import fit_entropy_law
from megaent.trainer.plots import band, build_figure, fifth_means, format_summary, group_runs, plot_runs, \
    seed_summary

KEYS = ("entropy/mean", "reward/mean", "cov/mean", "cov/top_0.02pct", "response/length_mean")


def _write_run(d: Path, values: np.ndarray, *, drop: dict[int, str] | None = None) -> list[dict]:
    """A run dir whose metrics.jsonl has one row per step; values [steps, len(KEYS)]."""
    d.mkdir(parents=True)
    rows = []
    for i, v in enumerate(values):
        row = {"step": i + 1, **{k: float(x) for k, x in zip(KEYS, v)}}
        if drop and (i + 1) in drop:
            row[drop[i + 1]] = None
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture()
def runs(tmp_path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    data = {"grpo_seed0": rng.random((23, len(KEYS))), "grpo_seed1": rng.random((20, len(KEYS))),
            "grpo_seed2": rng.random((23, len(KEYS))), "kl_cov_seed0": rng.random((23, len(KEYS))),
            "kl_cov_seed1": rng.random((23, len(KEYS))), "single": rng.random((7, len(KEYS)))}
    for name, vals in data.items():
        _write_run(tmp_path / name, vals)
    return data


def test_group_runs_by_seed_suffix(tmp_path: Path) -> None:
    dirs = [tmp_path / n for n in ("grpo_seed10", "grpo_seed2", "other", "kl_cov_seed0", "x/other", "a_seedling")]
    groups = group_runs(dirs)
    assert list(groups) == ["grpo", "other", "kl_cov", "other#2", "a_seedling"]
    assert groups["grpo"] == [tmp_path / "grpo_seed2", tmp_path / "grpo_seed10"]  # by seed number, not text
    assert groups["other#2"] == [tmp_path / "x/other"]


def test_band_matches_numpy(tmp_path: Path, runs: dict[str, np.ndarray]) -> None:
    names = ["grpo_seed0", "grpo_seed1", "grpo_seed2"]
    per_run = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in names]
    steps, mean, lo, hi = band(per_run, "entropy/mean")
    n = min(len(runs[x]) for x in names)  # seed1 is shorter: only the common steps
    stack = np.stack([runs[x][:n, 0] for x in names])
    assert steps == list(range(1, n + 1))
    np.testing.assert_allclose(mean, stack.mean(0), rtol=1e-12)
    np.testing.assert_allclose(lo, stack.min(0), rtol=0)
    np.testing.assert_allclose(hi, stack.max(0), rtol=0)


def test_band_skips_missing_values(tmp_path: Path) -> None:
    vals = np.arange(10 * len(KEYS), dtype=float).reshape(10, len(KEYS))
    a = _write_run(tmp_path / "a", vals, drop={3: "entropy/mean"})
    b = _write_run(tmp_path / "b", vals + 1.0)
    steps, mean, lo, hi = band([a, b], "entropy/mean")
    assert 3 not in steps and len(steps) == 9
    np.testing.assert_allclose(mean, vals[[i for i in range(10) if i != 2], 0] + 0.5)


def test_seed_summary_matches_numpy(tmp_path: Path, runs: dict[str, np.ndarray]) -> None:
    dirs = [tmp_path / n for n in runs]
    summary = seed_summary(dirs)
    assert [e["method"] for e in summary] == ["grpo", "kl_cov", "single"]
    for e in summary:
        names = [n for n in runs if n.rsplit("_seed", 1)[0] == e["method"] or n == e["method"]]
        assert e["seeds"] == len(names)
        assert e["steps"] == min(len(runs[n]) for n in names)
        for j, key in enumerate(("entropy/mean", "reward/mean")):
            k = [max(1, len(runs[n]) // 5) for n in names]
            first = np.array([runs[n][:kk, KEYS.index(key)].mean() for n, kk in zip(names, k)])
            last = np.array([runs[n][-kk:, KEYS.index(key)].mean() for n, kk in zip(names, k)])
            ddof = 1 if len(names) > 1 else 0
            np.testing.assert_allclose(e[key]["first"], (first.mean(), first.std(ddof=ddof)), rtol=1e-12)
            np.testing.assert_allclose(e[key]["last"], (last.mean(), last.std(ddof=ddof)), rtol=1e-12)
            assert e[key]["last_min"] == pytest.approx(last.min()) and e[key]["last_max"] == pytest.approx(last.max())
    table = format_summary(summary).splitlines()
    assert len(table) == 4 and table[1].startswith("grpo") and " +- " in table[1]
    h = summary[0]["entropy/mean"]
    assert table[1].endswith(f"{h['last_min']:.3f}..{h['last_max']:.3f}")


def test_fifth_means_edge_cases() -> None:
    assert all(math.isnan(x) for x in fifth_means([{"step": 1}], "entropy/mean"))
    rows = [{"step": i, "h": float(i)} for i in range(1, 4)]  # fewer than 5 rows: first and last row
    assert fifth_means(rows, "h") == (1.0, 3.0)


def test_plot_writes_png_grouped_ungrouped_and_cli(tmp_path: Path, runs: dict[str, np.ndarray]) -> None:
    import matplotlib.image as mpimg

    grouped = plot_runs([tmp_path / n for n in runs], out=tmp_path / "grouped.png")
    ungrouped = plot_runs([tmp_path / "single"])  # the old behaviour: default path in the first run dir
    assert ungrouped == tmp_path / "single" / "curves.png"
    for png in (grouped, ungrouped):
        img = mpimg.imread(png)
        assert img.shape[0] > 500 and img.shape[1] > 1000 and img.std() > 0  # 15x8 in at 110 dpi, not blank
    out = tmp_path / "cli.png"
    res = subprocess.run([sys.executable, "-m", "megaent.cli", "plot", str(tmp_path / "grpo_seed0"),
                          str(tmp_path / "grpo_seed1"), str(tmp_path / "single"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.is_file() and res.stdout.strip().endswith("cli.png")


def test_every_axis_labelled_and_law_fitted_with_ceiling(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    h = np.linspace(0.7, 0.3, 40) + rng.normal(0, 0.01, 40)
    r = -0.5 * np.exp(h) + 1.2 + rng.normal(0, 0.01, 40)
    vals = rng.random((40, len(KEYS)))
    vals[:, 0], vals[:, 1] = h, r
    _write_run(tmp_path / "grpo_seed0", vals)
    fig = build_figure([tmp_path / "grpo_seed0"])
    axes = fig.get_axes()
    assert len(axes) == 6
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
        assert "(" in ax.get_ylabel() or "/" in ax.get_ylabel(), f"no unit in {ax.get_ylabel()!r}"
    law = next(ax for ax in axes if "entropy" in ax.get_xlabel())
    fit = fit_entropy_law(h, r)
    (curve,) = [ln for ln in law.get_lines() if ln.get_gid() == "law-fit"]
    xs, ys = curve.get_data()
    assert xs[0] == 0.0 and xs[-1] == pytest.approx(h.max())
    np.testing.assert_allclose(ys, -fit.a * np.exp(xs) + fit.b, rtol=1e-12)
    (star,) = [ln for ln in law.get_lines() if ln.get_gid() == "law-ceiling"]
    assert list(star.get_xdata()) == [0.0] and star.get_ydata()[0] == pytest.approx(fit.b - fit.a)
    assert f"ceiling {fit.b - fit.a:.3f}" in curve.get_label()


def test_cli_plot_glob_skips_log_files(tmp_path: Path, runs: dict[str, np.ndarray]) -> None:
    for name in runs:
        (tmp_path / f"{name}.log").write_text("a log, not a run\n")
    out = tmp_path / "glob.png"
    res = subprocess.run(f"megaent plot {tmp_path}/*_seed* --out {out}", shell=True, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.is_file() and "skipping 5 file(s)" in res.stderr
    res = subprocess.run(["megaent", "plot", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no such run directory" in res.stderr and "Traceback" not in res.stderr


# ---- entropy dynamics row (issue #26) -----------------------------------------------------------------------

def _write_dynamics_run(d: Path, seed: int, steps: int = 30, *, controller: bool = False) -> dict[str, np.ndarray]:
    """metrics.jsonl with the plain KEYS plus the exact and advantage-covariance dH pairs (and a target)."""
    rng = np.random.default_rng(seed)
    pred = rng.normal(0, 0.02, steps)
    cols = {"dynamics/exact_pred_dH": pred, "dynamics/exact_dH": 1.05 * pred + rng.normal(0, 0.002, steps),
            "dynamics/pred_dH": 0.3 * pred + rng.normal(0, 0.01, steps), "dynamics/dH": pred + rng.normal(0, 0.005, steps)}
    if controller:
        cols["controller/target_entropy"] = np.full(steps, 0.5)
    rows = _write_run(d, rng.random((steps, len(KEYS))))
    for r, i in zip(rows, range(steps)):
        r.update({k: float(v[i]) for k, v in cols.items()})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return cols


def test_dynamics_row_predicted_vs_measured(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    from megaent.trainer.dynamics import pearson
    from megaent.trainer.plots import dynamics_correlations, format_dynamics

    cols = {n: _write_dynamics_run(tmp_path / n, s, controller=n.startswith("ctrl"))
            for s, n in enumerate(("grpo_seed0", "grpo_seed1", "ctrl_seed0"))}
    fig = build_figure([tmp_path / n for n in cols])
    axes = fig.get_axes()
    assert len(axes) == 9
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
        assert "(" in ax.get_ylabel() or "/" in ax.get_ylabel(), f"no unit in {ax.get_ylabel()!r}"
    exact = next(ax for ax in axes if ax.get_title().startswith("measured vs exact"))
    assert "Cov(log pi, dz)" in exact.get_xlabel() and "measured dH" in exact.get_ylabel()
    assert [ln for ln in exact.get_lines() if ln.get_gid() == "identity"]
    pooled = [np.concatenate([cols[n][k] for n in ("grpo_seed0", "grpo_seed1")])
              for k in ("dynamics/exact_pred_dH", "dynamics/exact_dH")]
    legend = [t.get_text() for t in exact.get_legend().get_texts()]
    assert f"grpo (2 seeds): r = {pearson(*map(list, pooled)):.3f}" in legend
    per_step = next(ax for ax in axes if ax.get_title().startswith("entropy change per step"))
    assert len(per_step.get_lines()) == 5  # measured + predicted for each of 2 methods, and the zero line
    entropy = next(ax for ax in axes if ax.get_title().startswith("policy entropy"))
    assert any(ln.get_linestyle() == ":" and "target" in ln.get_label() for ln in entropy.get_lines())
    png = plot_runs([tmp_path / n for n in cols], out=tmp_path / "dyn.png")
    img = mpimg.imread(png)
    assert img.shape[0] > 1200 and img.std() > 0  # 15x12 in at 110 dpi
    for e in dynamics_correlations([tmp_path / n for n in cols]):
        c = cols[e["run"]]
        assert e["exact_corr"] == pytest.approx(np.corrcoef(c["dynamics/exact_pred_dH"], c["dynamics/exact_dH"])[0, 1])
        assert e["adv_cov_corr"] == pytest.approx(np.corrcoef(c["dynamics/pred_dH"], c["dynamics/dH"])[0, 1])
        assert e["steps"] == 30 and e["exact_corr"] > 0.9 and e["exact2_corr"] is None  # no exact_second logged
    table = format_dynamics(dynamics_correlations([tmp_path / n for n in cols])).splitlines()
    assert len(table) == 4 and table[1].startswith("grpo_seed0") and f"{e['exact_corr']:+.3f}" in table[3]


def test_second_order_correlation(tmp_path: Path) -> None:
    from megaent.trainer.plots import dynamics_correlations

    cols = _write_dynamics_run(tmp_path / "grpo_seed0", 0)
    rng = np.random.default_rng(1)
    second = rng.normal(0, 0.01, size=len(cols["dynamics/exact_dH"]))
    rows = [json.loads(ln) for ln in (tmp_path / "grpo_seed0" / "metrics.jsonl").read_text().splitlines()]
    for r, x in zip((r for r in rows if "dynamics/exact_dH" in r), second):
        r["dynamics/exact_second"] = float(x)
    (tmp_path / "grpo_seed0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    e = dynamics_correlations([tmp_path / "grpo_seed0"])[0]
    want = np.corrcoef(np.asarray(cols["dynamics/exact_pred_dH"]) + second, cols["dynamics/exact_dH"])[0, 1]
    assert e["exact2_corr"] == pytest.approx(want)


def test_no_dynamics_row_without_exact_metrics(tmp_path: Path, runs: dict[str, np.ndarray]) -> None:
    from megaent.trainer.plots import dynamics_correlations

    assert len(build_figure([tmp_path / "grpo_seed0"]).get_axes()) == 6
    assert dynamics_correlations([tmp_path / "grpo_seed0"])[0]["exact_corr"] is None
