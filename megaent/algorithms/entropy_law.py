"""The empirical entropy-performance law R = -a * exp(H) + b (Cui et al. 2025, arXiv 2505.22617, Eq. 1).

The law is linear in x = exp(H), so the least-squares fit is the closed-form simple linear regression of
R on x: slope = -a, intercept = b. Its predicted ceiling, the reward once entropy is exhausted (H = 0),
is b - a. `early_fit` reproduces the paper's use of the law: fit on the first part of training, predict
the rest; `bootstrap_fits` / `ceiling_interval` give the predicted ceiling's uncertainty from a bootstrap
over the fitted steps (pairs resampled with replacement, Efron's percentile interval). Plain numpy in float64.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import numpy as np

ArrayLike = Union[Sequence[float], np.ndarray]

MIN_FIT_POINTS = 3
"""Fewest steps a fit with an uncertainty needs: 2 points fix the line exactly and leave no residual, and a
bootstrap of 2 points draws the same point twice half the time."""


class EntropyLawFit(NamedTuple):
    a: float
    b: float
    r2: float

    @property
    def ceiling(self) -> float:
        """Predicted reward at zero entropy: b - a."""
        return self.b - self.a

    def predict(self, entropy: ArrayLike) -> np.ndarray:
        return -self.a * np.exp(np.asarray(entropy, dtype=np.float64)) + self.b


class EarlyFit(NamedTuple):
    fit: EntropyLawFit
    rmse: float
    """Root-mean-square error of the fit's prediction on the points after the fitted prefix."""
    n_fit: int


def fit_entropy_law(entropy: ArrayLike, reward: ArrayLike) -> EntropyLawFit:
    """Least-squares (a, b, r2) of reward = -a * exp(entropy) + b; 1-D arrays of equal length >= 2."""
    h = np.asarray(entropy, dtype=np.float64).reshape(-1)
    r = np.asarray(reward, dtype=np.float64).reshape(-1)
    if h.shape != r.shape or h.size < 2:
        raise ValueError(f"fit_entropy_law: need equal-length entropy and reward with >= 2 points, got "
                         f"{h.size} and {r.size}")
    x = np.exp(h)
    dx, dr = x - x.mean(), r - r.mean()
    sxx = float(dx @ dx)
    if sxx == 0.0:
        raise ValueError("fit_entropy_law: entropy is constant over all points; the law needs varying entropy")
    slope = float(dx @ dr) / sxx
    b = float(r.mean() - slope * x.mean())
    ss_res = float(((r - (slope * x + b)) ** 2).sum())
    ss_tot = float(dr @ dr)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return EntropyLawFit(a=-slope, b=b, r2=r2)


def early_fit(entropy: ArrayLike, reward: ArrayLike, fraction: float) -> EarlyFit:
    """Fit on the first `fraction` of the points (in training order), RMSE of the prediction on the rest."""
    h = np.asarray(entropy, dtype=np.float64).reshape(-1)
    r = np.asarray(reward, dtype=np.float64).reshape(-1)
    n_fit = int(fraction * h.size)
    if not 0.0 < fraction < 1.0 or n_fit < 2 or n_fit >= h.size:
        raise ValueError(f"early_fit: fraction={fraction} of {h.size} points must leave >= 2 to fit and >= 1 to "
                         "predict (e.g. 0.33)")
    fit = fit_entropy_law(h[:n_fit], r[:n_fit])
    rmse = float(np.sqrt(np.mean((fit.predict(h[n_fit:]) - r[n_fit:]) ** 2)))
    return EarlyFit(fit=fit, rmse=rmse, n_fit=n_fit)


def fit_count(n: int, fraction: float) -> int:
    """Points in the first `fraction` of `n` (floor; the 1e-9 keeps 0.3 * 10 at 3 despite binary rounding)."""
    return int(np.floor(fraction * n + 1e-9))


def steps_needed(fraction: float, min_points: int = MIN_FIT_POINTS) -> int:
    """The shortest run whose first `fraction` holds `min_points` points (for error messages)."""
    n = int(np.ceil(min_points / fraction - 1e-9))
    while fit_count(n, fraction) < min_points:
        n += 1
    return n


def bootstrap_fits(entropy: ArrayLike, reward: ArrayLike, *, n_boot: int = 200,
                   seed: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    """(a [n_used], b [n_used]) of the law refitted on `n_boot` resamples of the (entropy, reward) pairs drawn
    with replacement (np.random.default_rng(seed)); resamples whose entropy is constant (no line) are dropped,
    so n_used <= n_boot. All resamples are fitted at once: [n_boot, n] index matrix, closed-form slope."""
    h = np.asarray(entropy, dtype=np.float64).reshape(-1)
    r = np.asarray(reward, dtype=np.float64).reshape(-1)
    if h.shape != r.shape or h.size < MIN_FIT_POINTS:
        raise ValueError(f"bootstrap_fits: need equal-length entropy and reward with >= {MIN_FIT_POINTS} "
                         f"points, got {h.size} and {r.size}")
    idx = np.random.default_rng(seed).integers(0, h.size, size=(n_boot, h.size))
    x, y = np.exp(h)[idx], r[idx]                                      # [n_boot, n]
    dx = x - x.mean(axis=1, keepdims=True)
    sxx = (dx * dx).sum(axis=1)
    ok = sxx > 1e-12 * np.maximum(1.0, (x * x).sum(axis=1))            # a resample of one repeated point
    slope = (dx[ok] * (y[ok] - y[ok].mean(axis=1, keepdims=True))).sum(axis=1) / sxx[ok]
    b = y[ok].mean(axis=1) - slope * x[ok].mean(axis=1)
    return -slope, b


class CeilingInterval(NamedTuple):
    mean: float
    lo: float
    hi: float
    level: float
    n_used: int
    """Resamples that gave a fit (see bootstrap_fits)."""


def ceiling_interval(a: np.ndarray, b: np.ndarray, *, level: float = 0.9) -> CeilingInterval:
    """Mean and central `level` percentile interval of the bootstrapped ceilings b - a."""
    c = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if c.size == 0:
        raise ValueError("ceiling_interval: no bootstrap resample gave a fit (entropy constant in all of them)")
    lo, hi = np.quantile(c, [(1 - level) / 2, (1 + level) / 2])
    return CeilingInterval(mean=float(c.mean()), lo=float(lo), hi=float(hi), level=level, n_used=int(c.size))


def rmse(fit: EntropyLawFit, entropy: ArrayLike, reward: ArrayLike) -> float:
    """Root-mean-square error of the fit's prediction on (entropy, reward); nan for no points."""
    r = np.asarray(reward, dtype=np.float64).reshape(-1)
    if r.size == 0:
        return float("nan")
    return float(np.sqrt(np.mean((fit.predict(entropy) - r) ** 2)))
