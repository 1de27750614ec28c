"""Bucketed DP gradient SUM and the tied-embedding all-reduce vs sums computed in the test.

Two gloo ranks. DP = 2: every rank draws its own grads (fp32 and bf16 params, one param with no grad);
after `allreduce_grads` with tiny buckets each grad must equal the plain sum of both ranks' grads,
regenerated locally from their seeds, and the number of all-reduces must be what the bucket size implies.
PP = 2: the first stage's embedding and the last stage's head copy (both `shared_embedding`) end up
with the sum of the two grads; other params are untouched.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_grads.py
"""
from __future__ import annotations

import pytest
import torch

from dist import run_ranks

SHAPES = [((4, 3), torch.float32), ((5,), torch.bfloat16), ((2, 2), torch.float32), ((7,), torch.float32)]


def _grads_of(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(s, generator=g).to(dt) for s, dt in SHAPES]


def _checks(rank, world):
    from megaent.parallel import init_parallel
    from megaent.parallel.grads import allreduce_grads, reduce_gradients

    out = {}
    st = init_parallel(1, 1)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dt)) for s, dt in SHAPES]
    extra = torch.nn.Parameter(torch.zeros(3))  # no grad on this rank -> zeros join the buckets
    for p, g in zip(params, _grads_of(rank)):
        p.grad = g.clone()
    if rank == 1:
        extra.grad = torch.ones(3)
    n = allreduce_grads(params + [extra], group=st.dp_group, bucket_mb=40 / 2**20)  # 40-byte buckets
    want = [a.float() + b.float() for a, b in zip(_grads_of(0), _grads_of(1))]
    out["err"] = max(float((p.grad.float() - w.to(p.dtype).float()).abs().max()) for p, w in zip(params, want))
    out["extra"] = extra.grad.tolist()
    out["n"] = n

    st = init_parallel(1, 2)
    m = torch.nn.Module()
    m.tied = torch.nn.Parameter(torch.zeros(3, 2))
    m.tied.shared_embedding = True
    m.other = torch.nn.Parameter(torch.zeros(2))
    m.tied.grad = torch.full((3, 2), float(rank + 1))
    m.other.grad = torch.full((2,), float(rank + 1))
    counts = reduce_gradients(m, state=st)
    out["tied"] = m.tied.grad.tolist()
    out["other"] = m.other.grad.tolist()
    out["counts"] = counts
    return out


@pytest.mark.slow
def test_dp_sum_buckets_and_tied_embedding():
    res = run_ranks(_checks, 2)
    for rank, r in enumerate(res):
        assert r["err"] == 0.0  # a sum of two values is exact in either order
        assert r["extra"] == [1.0, 1.0, 1.0]
        # fp32 grads: 48 + 16 + 28 bytes, 40-byte buckets -> [48], [16, 28]; bf16: [10] -> 3 + 1 all-reduces
        assert r["n"] == 4
        assert r["tied"] == [[3.0, 3.0]] * 3
        assert r["other"] == [float(rank + 1)] * 2
        assert r["counts"] == {"dp_allreduces": 0, "tied_allreduces": 1}
