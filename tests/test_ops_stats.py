"""megaent.ops.stats across "DP" ranks vs the single-process statistic of the concatenated batch.

One spawn of 4 gloo ranks runs every case on DP=4 (one group) and DP=2 (groups {0,1}, {2,3}
with different data), with uneven token counts per rank and one rank whose mask is all
false; plus an all-empty batch. Each rank backpropagates the same (replicated) loss
a*mean(x) + b*var(x) + c*cov(x, y); its gradients w.r.t. its own x, y must be the matching
slice of the reference gradient (torch autograd through x[mask].mean() etc. in float64).
Tolerance: 1e-5 relative (fp32 sums of <= 30 values; reference in float64).
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_ops_stats.py
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import reference as ref
from dist import run_ranks
from megaent.ops import global_sum, masked_cov, masked_mean, masked_sum_count, masked_var

SIZES = {4: [5, 9, 3, 7], 2: [10, 14]}  # tokens per rank (uneven)
EMPTY_RANK = {4: 2, 2: 1}  # this rank's mask is all false
COEF = (0.7, -1.3, 2.1)  # loss = a mean(x) + b var(x) + c cov(x, y)


def make_batch(dp: int, seed: int, empty: bool = False):
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES[dp])
    x = torch.randn(n, generator=g) * 2 + 1
    y = torch.randn(n, generator=g) + 0.5 * x
    mask = torch.rand(n, generator=g) < 0.7
    offs = [sum(SIZES[dp][:r]) for r in range(dp)]
    mask[offs[EMPTY_RANK[dp]]:offs[EMPTY_RANK[dp]] + SIZES[dp][EMPTY_RANK[dp]]] = False
    x[~mask] = float("nan")  # masked-out values must never leak into a statistic
    if empty:
        mask[:] = False
    return x, y, mask, offs


def local_stats(x, y, mask, group):
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    s, n = masked_sum_count(x, mask, group)
    mean, var, cov = masked_mean(x, mask, group), masked_var(x, mask, group), masked_cov(x, y, mask, group)
    a, b, c = COEF
    (a * mean + b * var + c * cov).backward()
    total = global_sum(torch.tensor([float(mask.sum())]), group)
    return dict(sum=s.detach(), count=n, mean=mean.detach(), var=var.detach(), cov=cov.detach(),
                gx=x.grad, gy=y.grad, total=total)


def reference(x, y, mask):
    xd, yd = torch.where(mask, x, 0).double().requires_grad_(), y.double().requires_grad_()
    mean, var, cov = ref.masked_mean(xd, mask), ref.masked_cov(xd, xd, mask), ref.masked_cov(xd, yd, mask)
    a, b, c = COEF
    loss = a * mean + b * var + c * cov
    if loss.requires_grad:
        loss.backward()
    gx = xd.grad if xd.grad is not None else torch.zeros_like(xd)
    gy = yd.grad if yd.grad is not None else torch.zeros_like(yd)
    return dict(sum=xd[mask].sum().detach(), count=mask.sum().double(), mean=mean.detach(), var=var.detach(),
                cov=cov.detach(), gx=gx, gy=gy)


def _worker(rank, world):
    from dist import init_gloo

    init_gloo()
    out = {}
    for dp in (4, 2):
        groups = [dist.new_group(list(range(s, s + dp))) for s in range(0, world, dp)]
        gi, r = rank // dp, rank % dp
        for empty in (False, True):
            x, y, mask, offs = make_batch(dp, seed=10 * dp + gi, empty=empty)
            sl = slice(offs[r], offs[r] + SIZES[dp][r])
            out[(dp, gi, empty)] = (r, local_stats(x[sl], y[sl], mask[sl], groups[gi]))
    dist.destroy_process_group()  # else dist.py's cleanup imports megatron-core just to tear down
    return out


@pytest.fixture(scope="module")
def dp_results():
    return run_ranks(_worker, 4)


def _check(got_per_rank, x, y, mask, offs, sizes):
    want = reference(x, y, mask)
    for r, got in got_per_rank.items():
        for key in ("sum", "count", "mean", "var", "cov"):
            torch.testing.assert_close(got[key].double(), want[key], rtol=1e-5, atol=1e-6, msg=key)
        sl = slice(offs[r], offs[r] + sizes[r])
        for key in ("gx", "gy"):
            assert torch.isfinite(got[key]).all(), f"{key} has NaN/inf"
            scale = max(float(want[key].abs().max()), 1e-30)
            assert (got[key].double() - want[key][sl]).abs().max() <= 1e-5 * scale, f"{key} on rank {r}"


@pytest.mark.slow
@pytest.mark.parametrize("empty", [False, True], ids=["uneven", "all_empty"])
@pytest.mark.parametrize("dp", [2, 4])
def test_dp_matches_concatenated_batch(dp_results, dp, empty):
    for gi in range(4 // dp):
        # ranks of group gi are gi*dp .. gi*dp + dp - 1
        got = {r: dp_results[gi * dp + r][(dp, gi, empty)][1] for r in range(dp)}
        x, y, mask, offs = make_batch(dp, seed=10 * dp + gi, empty=empty)
        _check(got, x, y, mask, offs, SIZES[dp])


def test_single_process_matches_reference():
    x, y, mask, offs = make_batch(2, seed=0)
    got = local_stats(x, y, mask, None)
    _check({0: got}, x, y, mask, [0], [len(x)])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
