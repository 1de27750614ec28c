"""The entropy-performance law R = -a exp(H) + b: the fit, the early fit that predicts the rest of a run, the
bootstrap of its ceiling b - a, and `megaent fit-law` (megaent/trainer/law.py).

References, all built here: synthetic curves with known (a, b) plus Gaussian noise of known sigma and seed (an
entropy collapse, most of the drop in the first quarter); numpy.polyfit as the least-squares reference; the
closed-form OLS standard error of the prediction at x = exp(0) = 1 for the bootstrap's spread; the true ceiling
for the interval's coverage. The CLI runs through the installed `megaent` console script on run dirs written by
megaent.trainer.metrics.MetricsSink, the trainer's own writer. About 20 s:

    OMP_NUM_THREADS=1 python -m pytest tests/test_entropy_law.py -q
"""
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from megaent.algorithms import early_fit, fit_entropy_law
from megaent.algorithms.entropy_law import bootstrap_fits, ceiling_interval, fit_count, steps_needed


def synthetic(a, b, n=60, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    h = np.sort(rng.uniform(0.05, 1.5, n))[::-1]  # entropy falls during training
    r = -a * np.exp(h) + b + noise * rng.standard_normal(n)
    return h, r


@pytest.mark.parametrize("a,b", [(0.3, 0.9), (0.05, 0.6), (1.2, 2.0)])
def test_recovers_known_coefficients(a, b):
    h, r = synthetic(a, b, noise=0.002)
    fit = fit_entropy_law(h, r)
    assert fit.a == pytest.approx(a, rel=0.01) and fit.b == pytest.approx(b, rel=0.01)
    assert fit.ceiling == pytest.approx(b - a, rel=0.02) and fit.r2 > 0.99
    exact = fit_entropy_law(*synthetic(a, b))
    assert exact.a == pytest.approx(a, rel=1e-9) and exact.b == pytest.approx(b, rel=1e-9) and exact.r2 == 1.0


def test_matches_polyfit_on_noisy_data():
    h, r = synthetic(0.4, 1.0, noise=0.05, seed=3)
    fit = fit_entropy_law(h, r)
    slope, icpt = np.polyfit(np.exp(h), r, 1)
    assert fit.a == pytest.approx(-slope, rel=1e-9) and fit.b == pytest.approx(icpt, rel=1e-9)
    pred = slope * np.exp(h) + icpt
    r2 = 1 - ((r - pred) ** 2).sum() / ((r - r.mean()) ** 2).sum()
    assert fit.r2 == pytest.approx(r2, rel=1e-9)


def test_early_fit_predicts_the_rest():
    h, r = synthetic(0.3, 0.9, n=90, noise=0.003, seed=1)
    ef = early_fit(h, r, 0.33)
    assert ef.n_fit == 29
    rest_pred = -ef.fit.a * np.exp(h[29:]) + ef.fit.b
    assert ef.rmse == pytest.approx(float(np.sqrt(np.mean((rest_pred - r[29:]) ** 2))))
    assert ef.rmse < 0.02  # the law extrapolates: error of the order of the noise


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="constant"):
        fit_entropy_law([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=">= 2 points"):
        fit_entropy_law([0.5], [0.1])
    with pytest.raises(ValueError, match="fraction"):
        early_fit([0.1, 0.2, 0.3], [1, 2, 3], 0.5)  # 1 point to fit


# ---- early fit, bootstrap of the ceiling ---------------------------------------------------------------------

A, B, SIGMA = 0.3, 0.95, 0.01          # true law and noise; true ceiling 0.65


def collapse(n, *, a=A, b=B, noise=SIGMA, seed=0):
    """Entropy falling from 1.2 to 0.2 nats with time constant n/12 (92% of the drop in the first quarter) and
    reward on the law plus N(0, noise^2)."""
    rng = np.random.default_rng(seed)
    h = 0.2 + 1.0 * np.exp(-np.arange(n) / (n / 12))
    return h, -a * np.exp(h) + b + noise * rng.standard_normal(n)


def ols_ceiling_se(h, r):
    """Closed-form standard error of the OLS prediction at x = exp(H=0) = 1: s sqrt(1/n + (1 - xbar)^2 / Sxx)."""
    x = np.exp(h)
    slope, icpt = np.polyfit(x, r, 1)
    res = r - (slope * x + icpt)
    s = math.sqrt(res @ res / (x.size - 2))
    return s * math.sqrt(1 / x.size + (1 - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum())


def test_fit_count_and_steps_needed():
    assert [fit_count(n, 0.25) for n in (4, 11, 12, 160)] == [1, 2, 3, 40]
    assert fit_count(10, 0.3) == 3                     # 0.3 * 10 = 2.9999999999999996 in binary
    for f in (0.25, 0.3, 0.1, 0.5, 0.9):
        n = steps_needed(f)
        assert fit_count(n, f) >= 3 and fit_count(n - 1, f) < 3


def test_early_quarter_recovers_law_and_predicts_last_half_at_noise_level():
    n = 160
    h, r = collapse(n, seed=4)
    k = fit_count(n, 0.25)
    fit = fit_entropy_law(h[:k], r[:k])
    slope, icpt = np.polyfit(np.exp(h[:k]), r[:k], 1)
    assert fit.a == pytest.approx(-slope, rel=1e-9) and fit.b == pytest.approx(icpt, rel=1e-9)
    assert fit.ceiling == pytest.approx(B - A, abs=4 * ols_ceiling_se(h[:k], r[:k]))
    assert fit.a == pytest.approx(A, rel=0.05) and fit.b == pytest.approx(B, abs=0.01)
    last = slice(n - n // 2, None)
    err = float(np.sqrt(np.mean((fit.predict(h[last]) - r[last]) ** 2)))
    oracle = float(np.sqrt(np.mean((-A * np.exp(h[last]) + B - r[last]) ** 2)))  # the noise itself
    assert 0.75 * SIGMA < err < 1.35 * SIGMA and err < 1.25 * oracle, (err, oracle)


def test_bootstrap_spread_matches_ols_standard_error_and_is_seeded():
    h, r = collapse(160, seed=5)
    a, b = bootstrap_fits(h[:40], r[:40], n_boot=200, seed=(0, 1))
    assert a.shape == b.shape == (200,)
    ratio = float((b - a).std()) / ols_ceiling_se(h[:40], r[:40])
    assert 0.75 < ratio < 1.3, ratio                   # 0.83-1.19 over 100 noise seeds
    a2, b2 = bootstrap_fits(h[:40], r[:40], n_boot=200, seed=(0, 1))
    a3, _ = bootstrap_fits(h[:40], r[:40], n_boot=200, seed=(1, 1))
    assert np.array_equal(a, a2) and np.array_equal(b, b2) and not np.array_equal(a, a3)
    c = ceiling_interval(a, b)
    assert c.lo < c.mean < c.hi and c.n_used == 200
    assert c.mean == pytest.approx(float(np.mean(b - a))) and c.lo == pytest.approx(float(np.quantile(b - a, 0.05)))


def test_bootstrap_interval_covers_true_ceiling_and_shrinks_with_more_points():
    widths = {}
    for n in (160, 640):
        covered, w = 0, []
        for sd in range(40):
            h, r = collapse(n, seed=sd)
            k = fit_count(n, 0.25)
            c = ceiling_interval(*bootstrap_fits(h[:k], r[:k], seed=sd))
            covered += c.lo <= B - A <= c.hi
            w.append(c.hi - c.lo)
        assert covered >= 0.75 * 40, (n, covered)      # nominal 90%; measured 85% (40 fitted), 94% (160)
        widths[n] = float(np.mean(w))
    assert 0.35 < widths[640] / widths[160] < 0.7, widths  # ~ sqrt(1/4) with 4x the points


def test_bootstrap_drops_degenerate_resamples():
    a, b = bootstrap_fits([0.5, 0.5, 0.9], [0.2, 0.2, 0.1], n_boot=300, seed=0)
    assert 0 < a.size < 300                            # P(all three draws the H = 0.5 pair) = 8/27
    np.testing.assert_allclose(b - a, np.full(a.size, b[0] - a[0]))  # every fit goes through both points


# ---- megaent fit-law -------------------------------------------------------------------------------------------

def write_run(d: Path, h, r, *, nan_at=()):
    """A run dir written by the trainer's MetricsSink (metrics.jsonl; non-finite values become null)."""
    from megaent.trainer.metrics import MetricsSink

    d.mkdir(parents=True)
    sink = MetricsSink(d, enabled=True)
    for i, (x, y) in enumerate(zip(h, r), 1):
        sink.log(i, {"entropy/mean": float(x), "reward/mean": math.nan if i in nan_at else float(y),
                     "loss": 0.1})
    sink.close()
    return d


ROOT = Path(__file__).resolve().parents[1]


def megaent(*args, cwd):
    """`megaent fit-law ARGS` through the installed console script, importing this tree's megaent (PYTHONPATH:
    the editable install may point at another checkout)."""
    exe = shutil.which("megaent")
    assert exe, "the megaent console script is not on PATH; pip install -e ."
    return subprocess.run([exe, "fit-law", *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Three seeds of 81 logged steps (step 7's reward non-finite: 80 points each), and their clean points."""
    root = tmp_path_factory.mktemp("law")
    dirs, pts = [], []
    for s in range(3):
        h, r = collapse(81, seed=10 + s)
        dirs.append(write_run(root / f"grpo_seed{s}", h, r, nan_at=(7,)))
        pts.append((np.delete(h, 6), np.delete(r, 6)))
    return root, dirs, pts


def reference(parts, fraction):
    """polyfit on each part's first int(F n) points; RMSE on its last n // 2 and on all after the prefix."""
    k = [int(fraction * h.size) for h, _ in parts]
    slope, icpt = np.polyfit(np.exp(np.concatenate([h[:n] for (h, _), n in zip(parts, k)])),
                             np.concatenate([r[:n] for (_, r), n in zip(parts, k)]), 1)

    def err(first):  # first(n_points, n_fitted) -> index of the first scored point
        res = [slope * np.exp(h[first(h.size, n):]) + icpt - r[first(h.size, n):] for (h, r), n in zip(parts, k)]
        return float(np.sqrt(np.mean(np.concatenate(res) ** 2)))

    all_h, all_r = np.concatenate([h for h, _ in parts]), np.concatenate([r for _, r in parts])
    s_all, i_all = np.polyfit(np.exp(all_h), all_r, 1)
    res = all_r - (s_all * np.exp(all_h) + i_all)
    return {"a": -slope, "b": icpt, "ceiling": icpt + slope, "rmse_last_half": err(lambda n, _: n - n // 2),
            "rmse_rest": err(lambda _, kf: kf), "r2": 1 - (res @ res) / ((all_r - all_r.mean()) ** 2).sum()}


def check(entry, ref):
    assert entry["fit"]["a"] == pytest.approx(ref["a"], rel=1e-7)
    assert entry["fit"]["b"] == pytest.approx(ref["b"], rel=1e-7)
    assert entry["fit"]["ceiling"] == pytest.approx(ref["ceiling"], rel=1e-7)
    assert entry["rmse_last_half"] == pytest.approx(ref["rmse_last_half"], rel=1e-7)
    assert entry["rmse_rest"] == pytest.approx(ref["rmse_rest"], rel=1e-7)
    assert entry["full_fit"]["r2"] == pytest.approx(ref["r2"], rel=1e-7)
    boot = entry["ceiling_bootstrap"]
    assert boot["lo"] < entry["fit"]["ceiling"] < boot["hi"] and boot["resamples_used"] == 200


def test_cli_fits_each_seed_and_the_pool(seeds, tmp_path):
    root, dirs, pts = seeds
    out = megaent(*dirs, "--fit-fraction", "0.25", "--out", tmp_path / "x.png", cwd=root)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    js = json.loads((tmp_path / "x.json").read_text())
    assert js["fit_fraction"] == 0.25 and js["bootstrap"] == {"resamples": 200, "seed": 0, "level": 0.9}
    assert [e["steps"] for e in js["runs"]] == [80, 80, 80] and [e["fit_steps"] for e in js["runs"]] == [20] * 3
    for entry, part in zip(js["runs"], pts):
        check(entry, reference([part], 0.25))
        assert entry["rmse_last_half"] < 1.5 * SIGMA   # the law extrapolates to the noise level
    check(js["pooled"], reference(pts, 0.25))
    assert js["pooled"]["steps"] == 240 and js["pooled"]["held_out_last_half_steps"] == 120
    c = js["pooled"]["ceiling_bootstrap"]
    assert c["lo"] <= B - A <= c["hi"]
    lines = out.stdout.splitlines()
    assert any(ln.startswith("│ pooled") and f"{js['pooled']['fit']['ceiling']:.4f}" in ln for ln in lines)
    assert sum("grpo_seed" in ln for ln in lines) == 3


def test_cli_early_fraction_is_a_deprecated_alias(seeds, tmp_path, capsys):
    """In-process (megaent.cli.main, the console script's entry point): each console-script start re-imports
    torch through megaent.algorithms, 5-10 s on a loaded 2-core host."""
    from megaent.cli import main

    root, dirs, pts = seeds
    assert main(["fit-law", str(dirs[0]), "--early-fraction", "0.3", "--seed", "3", "--out",
                 str(tmp_path / "y.png")]) == 0
    assert "--early-fraction is deprecated; use --fit-fraction" in capsys.readouterr().err
    js = json.loads((tmp_path / "y.json").read_text())
    assert js["fit_fraction"] == 0.3 and js["pooled"] is None and js["bootstrap"]["seed"] == 3
    check(js["runs"][0], reference(pts[:1], 0.3))
    assert main(["fit-law", str(dirs[0]), "--early-fraction", "0.3", "--fit-fraction", "0.25"]) == 2
    assert "disagree" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "1.5"])
def test_cli_bad_fraction_is_a_clear_error(seeds, bad):
    root, dirs, _ = seeds
    out = megaent(dirs[0], "--fit-fraction", bad, cwd=root)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"megaent fit-law: error: --fit-fraction {float(bad)}: must be in "
                                               "(0, 1), the share of each run's first steps the law is fitted on "
                                               "(0.25: the first quarter)"]


def test_cli_too_few_steps_and_missing_metrics(tmp_path, capsys):
    from megaent.cli import main

    h, r = collapse(40, seed=0)
    write_run(tmp_path / "two", h[:2], r[:2])
    assert main(["fit-law", str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err
    assert "2 step(s) with entropy/mean and reward/mean" in err and "at least 3" in err
    assert ">= 12 to fit on the first 0.25" in err
    write_run(tmp_path / "four", h[:4], r[:4])          # enough for the fit on all steps, not the early one
    assert main(["fit-law", str(tmp_path / "four"), "--fit-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "1 fitted step(s)" in out and ">= 12 steps per run at --fit-fraction 0.25" in out
    js = json.loads((tmp_path / "four" / "entropy_law.json").read_text())
    assert "fit" not in js["runs"][0] and js["runs"][0]["full_fit"]["r2"] > 0.9
    (tmp_path / "empty").mkdir()
    out = megaent(tmp_path / "empty", cwd=tmp_path)     # the console script: fails before the heavy imports
    assert out.returncode == 2 and "no metrics.jsonl" in out.stderr


def test_figure_marks_fitted_and_held_out_points_and_the_ceiling(seeds):
    import matplotlib.pyplot as plt

    from megaent.trainer.law import build_law_figure, fit_runs

    _, dirs, pts = seeds
    points, fits = fit_runs(dirs[:2], fit_fraction=0.25)
    fig = build_law_figure(points, fits, fit_fraction=0.25)
    ax = fig.axes[0]
    by_gid = lambda g: [a for a in ax.get_children() if a.get_gid() == g]  # noqa: E731
    fitted, held = by_gid("law-fitted"), by_gid("law-held-out")
    assert [len(c.get_offsets()) for c in fitted] == [20, 20] and [len(c.get_offsets()) for c in held] == [60, 60]
    np.testing.assert_allclose(held[0].get_offsets()[:, 0], pts[0][0][20:])
    lines = by_gid("law-fit")
    assert len(lines) == 3                              # two runs and the pool
    for line, f in zip(lines, fits):
        x, y = line.get_data()
        assert x[0] == 0.0 and x[-1] == pytest.approx(max(p.entropy.max() for p in points))
        np.testing.assert_allclose(y, -f.early.a * np.exp(x) + f.early.b)
    assert len(by_gid("law-band")) == 3
    stars = [ln for ln in by_gid("law-ceiling") if ln.get_marker() == "*"]  # (the caps carry the gid too)
    bars = by_gid("law-ceiling-interval")
    assert len(stars) == len(bars) == 3
    for star, bar, f in zip(stars, bars, fits):
        mx, my = star.get_data()
        assert (mx[0], my[0]) == (0.0, pytest.approx(f.early.b - f.early.a))
        seg = bar.get_segments()[0]                     # the bootstrap interval at H = 0
        assert seg[:, 0].tolist() == [0.0, 0.0] and seg[:, 1].tolist() == pytest.approx([f.ceiling.lo, f.ceiling.hi])
    plt.close(fig)
