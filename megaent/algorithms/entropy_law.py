"""The empirical entropy-performance law R = -a * exp(H) + b (Cui et al. 2025, arXiv 2505.22617, Eq. 1).

The law is linear in x = exp(H), so the least-squares fit is the closed-form simple linear regression of
R on x: slope = -a, intercept = b. Its predicted ceiling, the reward once entropy is exhausted (H = 0),
is b - a. `early_fit` reproduces the paper's use of the law: fit on the first part of training, predict
the rest. Plain numpy in float64.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import numpy as np

ArrayLike = Union[Sequence[float], np.ndarray]


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
