"""megaent.ops.entropy_change vs a plain full-vocab float64 computation written here, and vs the paper's claim.

- Second order (Cui et al. 2025, Lemma 1): on a pure-logit softmax policy (hidden = logits, head = identity)
  a step of size eta along a direction (a policy-gradient direction pi * (r - E r), and a random one) gives
  measured H_new - H_old = -cov + O(eta^2): the error at eta is ~4x the error at eta / 2 (ratio in [3.8,
  4.2]; the O(eta^3) term moves it by O(eta) relative; measured 3.97..4.05) while the error is << |dH|.
- TP = 1 (in process), 2 and 4 (one spawn of 4 gloo ranks, plain groups, no megatron-core) on V = 1001, the
  head padded per rank with NaN / +-1e30 rows that must never be read, fp64 (1e-10) and fp32 (the logits
  rounded to fp32, ~1e-7 relative, and sums of <= 1001 terms: 2e-5 absolute). All ranks of a TP group
  must return identical values.
- bf16 inputs with a realistic small update: cov to 1e-6 + 1e-4 relative of fp64 on the same bf16 values
  (dz is built from hidden/weight differences in fp32), >100x closer than from a bf16 z1 - z0.
- Chunk sizes 1, 7, 64, 1000, 5000 agree to 1e-12 in fp64 (only the summation order changes).
- sample_positions: fixed size, only valid positions flagged valid, no duplicates, deterministic in the seed.

Run: OMP_NUM_THREADS=1 timeout 900 python -m pytest -q tests/test_ops_entropy_change.py
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

import reference as ref
from dist import run_ranks
from megaent.ops.entropy_change import entropy_change, sample_positions

V, H, N, TEMP = 1001, 16, 9, 0.8


def full_reference(h0, h1, w0, w1, temperature=1.0):
    """Textbook formulas on the materialised [N, V] logits, float64: (cov, H_old, H_new)."""
    z0 = (h0.double() @ w0.double().t()) / temperature
    z1 = (h1.double() @ w1.double().t()) / temperature
    lp0, lp1 = torch.log_softmax(z0, -1), torch.log_softmax(z1, -1)
    p0, dz = lp0.exp(), z1 - z0
    cov = (p0 * lp0 * dz).sum(-1) - (p0 * lp0).sum(-1) * (p0 * dz).sum(-1)
    return cov, -(p0 * lp0).sum(-1), -(lp1.exp() * lp1).sum(-1)


def make_case(dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    h0 = torch.randn(N, H, generator=g, dtype=torch.float64)
    w0 = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 3
    h1 = h0 + 0.05 * torch.randn(N, H, generator=g, dtype=torch.float64)
    w1 = w0 + 0.05 * torch.randn(V, H, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (h0, h1, w0, w1)]


def garbage_rows(k: int, dtype) -> torch.Tensor:
    rows = torch.full((k, H), float("nan"), dtype=dtype)
    rows[1::3], rows[2::3] = 1e30, -1e30
    return rows


def check(out, refs, tol):
    for name, got, want in zip(("cov", "entropy_old", "entropy_new"), out, refs):
        assert got.shape == (N,)
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=0, msg=f"{name}")


# ---- the paper's first-order law ---------------------------------------------------------------------------

def _logit_step_errors(direction: str, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-logit policy over V actions at N states: (|measured - predicted| [N], |measured| [N])."""
    g = torch.Generator().manual_seed(3)
    z0 = 2.0 * torch.randn(N, 50, generator=g, dtype=torch.float64)
    if direction == "policy_gradient":  # d E_pi[r] / dz = pi (r - E_pi r)
        r, p = torch.randn(N, 50, generator=g, dtype=torch.float64), torch.softmax(z0, -1)
        u = p * (r - (p * r).sum(-1, keepdim=True))
    else:
        u = torch.randn(N, 50, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)  # unit step direction per state
    eye = torch.eye(50, dtype=torch.float64)  # the head: hidden = logits
    out = entropy_change(z0, z0 + eta * u, eye, eye, chunk_size=16)
    meas = out.entropy_new - out.entropy_old
    return (meas + out.cov).abs(), meas.abs()


@pytest.mark.parametrize("direction", ["policy_gradient", "random"])
def test_predicted_equals_measured_to_second_order(direction):
    eta = 0.02
    err1, meas1 = _logit_step_errors(direction, eta)
    err2, _ = _logit_step_errors(direction, eta / 2)
    assert err1.sum() < 0.05 * meas1.sum(), "first order must carry nearly all of dH at a small step"
    ratio = err1 / err2  # per state: C eta^2 / (C eta^2 / 4) = 4, up to O(eta)
    assert ((ratio > 3.8) & (ratio < 4.2)).all(), ratio


@pytest.mark.parametrize("direction", ["policy_gradient", "random"])
def test_second_order_term_leaves_a_third_order_error(direction):
    """-cov + second misses measured dH by O(eta^3): the error at eta is ~8x the error at eta / 2."""
    def err3(eta):
        g = torch.Generator().manual_seed(3)
        z0 = 2.0 * torch.randn(N, 50, generator=g, dtype=torch.float64)
        u = torch.randn(N, 50, generator=g, dtype=torch.float64)
        if direction == "policy_gradient":
            p = torch.softmax(z0, -1)
            u = p * (u - (p * u).sum(-1, keepdim=True))
        u = u / u.norm(dim=-1, keepdim=True)
        eye = torch.eye(50, dtype=torch.float64)
        out = entropy_change(z0, z0 + eta * u, eye, eye, chunk_size=16)
        return (out.entropy_new - out.entropy_old + out.cov - out.second).abs()

    ratio = err3(0.04) / err3(0.02)
    assert ((ratio > 7.0) & (ratio < 9.0)).all(), ratio


# ---- against the full-vocab computation ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_tp1_padded_matches_reference(dtype, tol):
    h0, h1, w0, w1 = make_case(dtype)
    refs = full_reference(h0, h1, w0, w1, TEMP)
    pad = garbage_rows(5, dtype)
    out = entropy_change(h0, h1, torch.cat([w0, pad]), torch.cat([w1, pad.flip(0)]), vocab_size=V,
                         temperature=TEMP, chunk_size=100)
    assert all(t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) for t in out)
    check(out, refs, tol)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 5000])
def test_chunk_size_independent(chunk):
    h0, h1, w0, w1 = make_case()
    base = entropy_change(h0, h1, w0, w1, temperature=TEMP, chunk_size=V)
    out = entropy_change(h0, h1, w0, w1, temperature=TEMP, chunk_size=chunk)
    for got, want in zip(out, base):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_bf16_small_update_keeps_dz():
    """A realistic RL step changes bf16 logits by ~1e-3: the op upcasts and forms dz from the differences,
    so it matches fp64 on the same bf16 values to fp32 rounding (where bf16 z1 - z0 would be off by ~1e-2)."""
    h0, _, w0, _ = make_case()
    g = torch.Generator().manual_seed(11)
    h0, w0 = h0.bfloat16(), w0.bfloat16()
    h1 = (h0.double() + 1e-2 * torch.randn(N, H, generator=g, dtype=torch.float64)).bfloat16()
    w1 = (w0.double() + 1e-2 * torch.randn(V, H, generator=g, dtype=torch.float64)).bfloat16()
    refs = full_reference(h0, h1, w0, w1, TEMP)
    out = entropy_change(h0, h1, w0, w1, temperature=TEMP, chunk_size=128)
    torch.testing.assert_close(out.cov.double(), refs[0], atol=1e-6, rtol=1e-4)
    for got, want in zip(out[1:], refs[1:]):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    # why the op does not subtract logits: the same covariance from dz = bf16 z1 - bf16 z0
    lp0 = torch.log_softmax(h0.double() @ w0.double().t() / TEMP, -1)
    dz = (torch.mm(h1, w1.t()).double() - torch.mm(h0, w0.t()).double()) / TEMP
    naive = (lp0.exp() * lp0 * dz).sum(-1) - (lp0.exp() * lp0).sum(-1) * (lp0.exp() * dz).sum(-1)
    assert (naive - refs[0]).abs().max() > 100 * (out.cov.double() - refs[0]).abs().max()


def test_same_hidden_and_head_changes_nothing():
    h0, _, w0, _ = make_case()
    out = entropy_change(h0, h0, w0, w0, chunk_size=64)
    assert torch.equal(out.entropy_old, out.entropy_new)
    torch.testing.assert_close(out.cov, torch.zeros(N, dtype=torch.float64), atol=1e-14, rtol=0)


def tp_group(tp: int):
    """(group, rank in group) for contiguous TP groups of size tp over the default gloo group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]  # every rank creates all
    return groups[rank // tp], rank % tp


def _tp_worker(rank, world):
    from dist import init_gloo

    init_gloo()  # plain groups only: the op can use nothing but its tp_group argument
    out = {}
    for tp in (4, 2):
        group, tp_rank = tp_group(tp)
        for dtype in (torch.float64, torch.float32):
            h0, h1, w0, w1 = make_case(dtype)
            pad = garbage_rows(-(-V // tp) * tp - V, dtype)
            out[(tp, dtype)] = entropy_change(
                h0, h1, ref.shard_rows(w0, tp, tp_rank, pad), ref.shard_rows(w1, tp, tp_rank, pad), group,
                vocab_size=V, temperature=TEMP, chunk_size=37)
    out["megatron_imported"] = any(m.startswith("megatron") for m in sys.modules)
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def tp_results():
    return run_ranks(_tp_worker, 4)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_tp_matches_reference(tp_results, tp, dtype, tol):
    first = tp_results[0][(tp, dtype)]
    for res in tp_results:
        assert all(torch.equal(a, b) for a, b in zip(res[(tp, dtype)], first)), "ranks disagree"
    check(first, full_reference(*make_case(dtype), TEMP), tol)
    assert not any(r["megatron_imported"] for r in tp_results)


# ---- positions ----------------------------------------------------------------------------------------------

def test_sample_positions():
    mask = torch.rand(6, 50, generator=torch.Generator().manual_seed(0)) > 0.6
    n_valid = int(mask.sum())
    idx, valid = sample_positions(mask, 40, torch.Generator().manual_seed(1))
    idx2, _ = sample_positions(mask, 40, torch.Generator().manual_seed(1))
    assert idx.shape == (40,) and torch.equal(idx, idx2) and idx.unique().numel() == 40
    assert valid.all() and mask.reshape(-1)[idx].all() and (idx.diff() > 0).all()
    other, _ = sample_positions(mask, 40, torch.Generator().manual_seed(2))
    assert not torch.equal(idx, other)
    idx, valid = sample_positions(mask, 10_000, torch.Generator().manual_seed(1))  # budget > tokens
    assert idx.shape == (300,) and int(valid.sum()) == n_valid and torch.equal(valid, mask.reshape(-1)[idx])
    idx, valid = sample_positions(mask, n_valid + 5, torch.Generator().manual_seed(1))  # all valid, then pad
    assert int(valid.sum()) == n_valid and not mask.reshape(-1)[idx[~valid]].any()
    # uniform: over many seeds each valid position is drawn with probability budget / n_valid
    hits = torch.zeros(mask.numel())
    for s in range(400):
        hits[sample_positions(mask, 40, torch.Generator().manual_seed(s))[0]] += 1
    freq = hits[mask.reshape(-1)] / 400
    assert (freq - 40 / n_valid).abs().max() < 0.12 and hits[~mask.reshape(-1)].sum() == 0


def test_bad_inputs_name_the_problem():
    h0, h1, w0, w1 = make_case()
    with pytest.raises(ValueError, match="chunk_size=0"):
        entropy_change(h0, h1, w0, w1, chunk_size=0)
    with pytest.raises(ValueError, match="expected hidden"):
        entropy_change(h0, h1[:, :3], w0, w1)
    with pytest.raises(ValueError, match="vocab_size=2000"):
        entropy_change(h0, h1, w0, w1, vocab_size=2000)
    with pytest.raises(ValueError, match="budget=0"):
        sample_positions(torch.ones(3, dtype=torch.bool), 0, torch.Generator())


def test_outputs_stay_on_the_inputs_device():
    h, w = torch.randn(4, 8, device="meta"), torch.randn(10, 8, device="meta")  # no compute, only placement
    out = entropy_change(h, h + 1, w, w + 1, vocab_size=9, chunk_size=3)
    assert all(t.device.type == "meta" and t.shape == (4,) for t in out)
