"""Advantage estimators against plain per-group Python reference formulas (statistics.mean/stdev on lists),
the token broadcast against an explicit loop, and the errors on bad input.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_advantages.py -q
"""
import statistics

import pytest
import torch

from megaent.algorithms import ADVANTAGE_ESTIMATORS, broadcast_to_tokens, compute_advantages
from megaent.config.schema import AlgorithmConfig

EPS = 1e-6


def ref_advantages(rows, estimator, norm_by_std=True):
    out = []
    if estimator == "reinforce_pp":
        centred = [[x - statistics.mean(r) for x in r] for r in rows]
        flat = [x for r in centred for x in r]
        sd = statistics.stdev(flat)
        return [[x / (sd + EPS) for x in r] for r in centred]
    for r in rows:
        g, m = len(r), statistics.mean(r)
        if estimator == "grpo":
            out.append([(x - m) / (statistics.stdev(r) + EPS) if norm_by_std else x - m for x in r])
        elif estimator == "drgrpo":
            out.append([x - m for x in r])
        elif estimator == "rloo":
            out.append([x - (sum(r) - x) / (g - 1) for x in r])  # leave-one-out mean of the others
    return out


def test_estimator_keys_are_the_config_literals():
    import typing
    hints = typing.get_type_hints(AlgorithmConfig)
    assert set(ADVANTAGE_ESTIMATORS) == set(typing.get_args(hints["advantage"]))


@pytest.mark.parametrize("estimator,norm", [("grpo", True), ("grpo", False), ("drgrpo", True), ("rloo", True),
                                            ("reinforce_pp", True)])
def test_matches_reference(estimator, norm):
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(5, 4, generator=g) < 0.5).float() + 0.1 * torch.rand(5, 4, generator=g)
    got = compute_advantages(rewards, estimator=estimator, norm_by_std=norm)
    want = torch.tensor(ref_advantages(rewards.tolist(), estimator, norm))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    flat = compute_advantages(rewards.reshape(-1), estimator=estimator, norm_by_std=norm, group_size=4)
    torch.testing.assert_close(flat, got.reshape(-1))


def test_degenerate_groups():
    same = torch.ones(3, 4)  # all rewards equal: zero advantage everywhere, finite
    for est in ADVANTAGE_ESTIMATORS:
        a = compute_advantages(same, estimator=est)
        assert torch.isfinite(a).all() and torch.all(a == 0)
        single = compute_advantages(torch.tensor([[1.0], [0.0]]), estimator=est)  # G = 1
        assert torch.isfinite(single).all() and torch.all(single == 0)


def test_broadcast_to_tokens():
    adv = torch.tensor([1.5, -2.0, 0.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    got = broadcast_to_tokens(adv, mask)
    want = torch.zeros(3, 3)
    for i in range(3):
        for j in range(3):
            if mask[i, j]:
                want[i, j] = adv[i]
    assert torch.equal(got, want)


def test_errors_name_the_key():
    with pytest.raises(ValueError, match="algorithm.advantage"):
        compute_advantages(torch.zeros(2, 2), estimator="ppo")
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages(torch.zeros(6), estimator="grpo", group_size=4)
    with pytest.raises(ValueError, match=r"\[B\]"):
        broadcast_to_tokens(torch.zeros(2), torch.ones(3, 4))
