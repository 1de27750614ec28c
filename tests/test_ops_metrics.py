"""megaent.ops.metrics vs plain single-process references on the concatenated batch.

`top_fraction_mean` is compared with a full sort of all valid values (tests/reference.py);
`token_mean_entropy` with x[mask].mean(). Distributed: one spawn of 4 gloo ranks, DP=4 and
DP=2 (two groups with different data), uneven token counts, one rank with an all-false
mask, ties (integer-valued data), negative values, several q (k = 1 ... N), and an all-empty
batch. In process: 300 random single-process cases, and a check that no host sync
(`.item()`, `bool()`, `int()`, `float()`, `.tolist()`) happens inside either metric.
Tolerance: 1e-6 relative (fp32 inputs, sums in float64).
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_ops_metrics.py
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

import reference as ref
from dist import run_ranks
from megaent.ops import token_mean_entropy, top_fraction_mean

SIZES = {4: [40, 7, 0, 23], 2: [31, 12]}  # tokens per rank (uneven, one rank has none at all)
EMPTY_RANK = {4: 1, 2: 1}  # and this rank has tokens but an all-false mask
QS = [2e-4, 0.05, 0.3, 1.0]
KINDS = ["normal", "ties", "empty"]


def make_batch(dp: int, seed: int, kind: str):
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES[dp])
    if kind == "ties":
        x = torch.randint(-2, 3, (n,), generator=g).float()
    else:
        x = torch.randn(n, generator=g) * 3 - 1
    mask = torch.rand(n, generator=g) < 0.8
    offs = [sum(SIZES[dp][:r]) for r in range(dp)]
    mask[offs[EMPTY_RANK[dp]]:offs[EMPTY_RANK[dp]] + SIZES[dp][EMPTY_RANK[dp]]] = False
    if kind == "empty":
        mask[:] = False
    return x, mask, offs


def _worker(rank, world):
    from dist import init_gloo

    init_gloo()
    out = {}
    for dp in (4, 2):
        groups = [dist.new_group(list(range(s, s + dp))) for s in range(0, world, dp)]
        gi, r = rank // dp, rank % dp
        for kind in KINDS:
            x, mask, offs = make_batch(dp, 100 * dp + gi, kind)
            sl = slice(offs[r], offs[r] + SIZES[dp][r])
            res = {q: top_fraction_mean(x[sl], mask[sl], q, groups[gi]) for q in QS}
            res["entropy"] = token_mean_entropy(x[sl], mask[sl], groups[gi])
            out[(dp, gi, kind)] = res
    dist.destroy_process_group()  # else dist.py's cleanup imports megatron-core just to tear down
    return out


@pytest.fixture(scope="module")
def dp_results():
    return run_ranks(_worker, 4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dp", [2, 4])
def test_dp_matches_concatenated_batch(dp_results, dp, kind):
    for rank, res in enumerate(dp_results):
        gi = rank // dp
        x, mask, _ = make_batch(dp, 100 * dp + gi, kind)
        for q in QS:
            got = res[(dp, gi, kind)][q]
            assert got.dtype == torch.float32 and got.dim() == 0
            torch.testing.assert_close(got.double(), ref.top_fraction_mean(x, mask, q), rtol=1e-6, atol=1e-6)
        got = res[(dp, gi, kind)]["entropy"]
        assert got.dtype == torch.float32 and got.dim() == 0
        torch.testing.assert_close(got.double(), ref.masked_mean(x.double(), mask), rtol=1e-6, atol=1e-6)


def test_single_process_random_cases():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 400, (), generator=g))
        x = torch.randn(n, generator=g) * float(torch.rand((), generator=g) * 10)
        if trial % 3 == 0:
            x = torch.randint(-3, 4, (n,), generator=g).float()
        if trial % 7 == 0:
            x[::2] = -0.0
        mask = torch.rand(n, generator=g) < 0.7
        q = float(torch.rand((), generator=g)) * 0.5 + 1e-4
        want = ref.top_fraction_mean(x, mask, q)
        torch.testing.assert_close(top_fraction_mean(x, mask, q).double(), want, rtol=1e-6, atol=1e-6,
                                   msg=f"trial {trial}")


def test_extreme_values_and_shapes():
    x = torch.tensor([[3.0e38, -3.0e38, 1e-40, -1e-40], [0.0, -0.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, True]])
    for q in (0.1, 0.25, 0.5, 0.7):  # not 1.0: 3e38 - 3e38 + 5 cancels catastrophically in any order
        torch.testing.assert_close(top_fraction_mean(x, mask, q).double(), ref.top_fraction_mean(x, mask, q),
                                   rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="q=0"):
        top_fraction_mean(x, mask, 0.0)


@contextlib.contextmanager
def no_host_sync():
    names = ["item", "tolist", "__bool__", "__int__", "__float__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def boom(self, *a, **k):
        raise AssertionError("host sync inside a metric")

    try:
        for n in names:
            setattr(torch.Tensor, n, boom)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_no_host_sync():
    x, mask = torch.randn(50), torch.rand(50) < 0.5
    with no_host_sync():
        top = top_fraction_mean(x, mask, 0.1)
        ent = token_mean_entropy(x, mask)
    torch.testing.assert_close(top.double(), ref.top_fraction_mean(x, mask, 0.1), rtol=1e-6, atol=0)
    torch.testing.assert_close(ent.double(), ref.masked_mean(x.double(), mask), rtol=1e-6, atol=0)
