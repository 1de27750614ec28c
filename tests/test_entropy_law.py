"""fit_entropy_law / early_fit against synthetic curves with known (a, b) built here, and numpy.polyfit
on noisy data as an independent least-squares reference.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_entropy_law.py -q
"""
import numpy as np
import pytest

from megaent.algorithms import early_fit, fit_entropy_law


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
