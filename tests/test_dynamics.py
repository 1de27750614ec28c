"""megaent.trainer.dynamics: the exact entropy-change metrics (issue #26) and the advantage-covariance estimate.

Compares RunningCorrelation with numpy.corrcoef on random and near-constant-offset streams (1e-12), checks
that a resume from state_dict() continues bit-identically, that exact_dynamics_stats equals masked means
computed here (single process and 2 gloo ranks, where means are over the positions of both ranks) and
ignores garbage (NaN) at invalid positions, and that EntropyDynamics keeps its old metrics and loads
checkpoints written before the exact metrics existed.

Run: OMP_NUM_THREADS=1 timeout 900 python -m pytest -q tests/test_dynamics.py
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dist import run_ranks
from megaent.trainer.dynamics import EntropyDynamics, RunningCorrelation, exact_dynamics_stats, pearson


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_running_correlation_matches_numpy(offset):
    rng = np.random.default_rng(0)
    x = offset + rng.normal(size=50) * 1e-3
    y = 0.7 * (x - offset) + rng.normal(size=50) * 1e-3
    rc = RunningCorrelation()
    for i, (a, b) in enumerate(zip(x, y)):
        c = rc.update(float(a), float(b))
        if i < 2:
            assert c is None
        else:
            assert c == pytest.approx(np.corrcoef(x[:i + 1], y[:i + 1])[0, 1], abs=1e-9 if offset else 1e-12)
    assert rc.value == pytest.approx(pearson(list(x), list(y)), abs=1e-9)
    assert rc.sign_agree == pytest.approx(np.mean((x > 0) == (y > 0)))


def test_running_correlation_resume_is_exact():
    rng = np.random.default_rng(1)
    pairs = rng.normal(size=(30, 2)).tolist()
    full = RunningCorrelation()
    for a, b in pairs:
        full.update(a, b)
    first = RunningCorrelation()
    for a, b in pairs[:13]:
        first.update(a, b)
    resumed = RunningCorrelation()
    resumed.load_state_dict({k: v for k, v in first.state_dict().items()})
    for a, b in pairs[13:]:
        resumed.update(a, b)
    assert resumed.state_dict() == full.state_dict() and resumed.value == full.value


def test_running_correlation_degenerate():
    rc = RunningCorrelation()
    for _ in range(5):
        rc.update(1.0, 2.0)
    assert rc.value is None and rc.sign_agree == 1.0


def _per_position(seed: int, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    cov = torch.randn(n, generator=g, dtype=torch.float64) * 1e-3
    h0 = torch.rand(n, generator=g, dtype=torch.float64) * 3
    h1 = h0 - cov + torch.randn(n, generator=g, dtype=torch.float64) * 1e-5
    valid = torch.rand(n, generator=g) > 0.3
    for t in (cov, h0, h1):
        t[~valid] = float("nan")  # must never reach a mean
    return cov, h0, h1, valid


def _reference(parts):
    cov, h0, h1, valid = (torch.cat(x) for x in zip(*parts))
    return {"exact_pred_dH": -cov[valid].mean(), "exact_dH": (h1 - h0)[valid].mean(),
            "exact_H_old": h0[valid].mean(), "exact_positions": valid.sum().double()}


def test_exact_dynamics_stats_single_process():
    parts = [_per_position(0)]
    got = exact_dynamics_stats(*parts[0])
    for k, v in _reference(parts).items():
        assert got[k].dim() == 0 and got[k].item() == pytest.approx(v.item(), rel=1e-12, abs=1e-15), k
    empty = exact_dynamics_stats(*_per_position(0)[:3], torch.zeros(40, dtype=torch.bool))
    assert all(v.item() == 0 for v in empty.values())


def _dp_worker(rank, world):
    import torch.distributed as dist

    from dist import init_gloo

    init_gloo()
    out = exact_dynamics_stats(*_per_position(rank, n=40 + 10 * rank), group=dist.group.WORLD)
    dist.destroy_process_group()
    return {k: v.item() for k, v in out.items()}


@pytest.mark.slow
def test_exact_dynamics_stats_two_dp_ranks():
    res = run_ranks(_dp_worker, 2)
    want = _reference([_per_position(0, 40), _per_position(1, 50)])
    for r in res:
        for k, v in want.items():
            assert r[k] == pytest.approx(v.item(), rel=1e-12, abs=1e-15), k


def test_entropy_dynamics_exact_metrics_and_resume():
    rng = np.random.default_rng(2)
    pred = rng.normal(size=12) * 1e-3
    meas = pred * 1.1 + rng.normal(size=12) * 1e-4
    dyn = EntropyDynamics()
    for i, (p, m) in enumerate(zip(pred, meas)):
        out = dyn.observe_exact(p, m)
        if i == 5:
            saved = dyn.state_dict()
    assert out["dynamics/exact_ratio"] == pytest.approx(meas[-1] / pred[-1])
    assert out["dynamics/exact_corr"] == pytest.approx(np.corrcoef(pred, meas)[0, 1], abs=1e-12)
    assert out["dynamics/exact_sign_agree"] == pytest.approx(np.mean((pred > 0) == (meas > 0)))
    resumed = EntropyDynamics()
    resumed.load_state_dict(saved)
    for p, m in zip(pred[6:], meas[6:]):
        again = resumed.observe_exact(p, m)
    assert again == out
    assert "dynamics/exact_ratio" not in dyn.observe_exact(0.0, 1e-3)


def test_advantage_covariance_estimate_unchanged_and_old_checkpoints_load():
    dyn = EntropyDynamics()
    dyn.load_state_dict({"pred": [1.0, 2.0], "meas": [1.0, 3.0]})  # written before the exact metrics
    assert dyn.exact.n == 0
    out = dyn.observe({"cov/mean": -2.0, "entropy/mean": 1.0}, {"entropy/mean": 1.5}, lr=0.5)
    assert out["dynamics/pred_dH"] == 1.0 and out["dynamics/dH"] == 0.5
    assert out["dynamics/corr"] == pytest.approx(pearson([1.0, 2.0, 1.0], [1.0, 3.0, 0.5]))
    assert not math.isnan(out["dynamics/sign_agree"])
