"""Prepacked oneDNN GEMMs (megaent.ops.gemm), tape storage reuse (megaent.model.tape.TapePool / ActivationTape) and
the host allocator settings (megaent.trainer.host), single process.

References and checks:
- `gemm.linear` against `torch.nn.functional.linear` and `gemm.input_grad` against `g @ w` (fp32: relative error
  <= 1e-5 of the reference's magnitude, 3-D inputs, with and without bias, and a packed weight reused for another
  row count); float64 falls back to those very torch ops (bitwise equal) and packs nothing;
- the packed-weight cache follows the weight: after an in-place update (`w.add_` under no_grad), a new weight
  tensor, or a parameter whose `.data` is replaced (new storage, same version counter), results equal the torch op
  on the current values; a dropped weight frees its cache entry;
- `TapePool.take` gives a [rows, width] view of flat storage; storage handed back with `give` is taken again (same
  data_ptr) by a request of the same or a smaller size down to half of it, not by a smaller one, nor by another
  dtype; the smallest fitting storage is chosen; `trim` empties the pool;
- a decode of the embedded engine with record_tapes (tests/hf_tiny.py Qwen2): its tapes replay before
  `clear_tapes` and are refused after it (`ReplaySource.indices` is None, `act` / `logits` raise "released"),
  their storage is in the engine's pool (exactly `ActivationTape.nbytes_for` bytes) and the next decode's tapes
  are built from it; `ActivationTape.release` on a directly built tape does the same;
- `keep_freed_memory()` applies on Linux/glibc and a second call returns True without touching libc again.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_gemm_pool.py
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_tiny import make_tiny_hf

from megaent.model.tape import ActivationTape, ReplaySource, TapePool, param_stamp
from megaent.ops import gemm

VOCAB = 300


def _assert_rel_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """max |out - ref| <= rtol * max |ref| (summation-order rounding of an fp32 GEMM), same shape and dtype."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    err, scale = float((out - ref).abs().max()), float(ref.abs().max())
    assert err <= rtol * scale, (err, scale)


def _need_onednn() -> None:
    if not gemm.onednn_prepack_available():
        pytest.skip("this torch build has no oneDNN prepacked linear")


# ---------------------------------------------------------------------------------------------------- gemm
def test_linear_and_input_grad_match_torch_fp32():
    """fp32 on CPU goes through a packed weight (a cache entry appears) and matches F.linear / g @ w, 3-D inputs
    with and without bias; the same packed copy then serves a different number of rows."""
    _need_onednn()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=gen)
    b = torch.randn(24, generator=gen)
    x = torch.randn(3, 5, 16, generator=gen)
    g = torch.randn(3, 5, 24, generator=gen)
    assert gemm.uses_onednn(w)
    with torch.no_grad():
        _assert_rel_close(gemm.linear(x, w, b), F.linear(x, w, b))
        _assert_rel_close(gemm.linear(x, w), F.linear(x, w))
        _assert_rel_close(gemm.input_grad(g, w), g @ w)
        assert id(w) in gemm._PACKED and set(gemm._PACKED[id(w)][1]) == {False, True}  # both layouts packed
        x2, g2 = torch.randn(7, 11, 16, generator=gen), torch.randn(2, 19, 24, generator=gen)  # other row counts
        _assert_rel_close(gemm.linear(x2, w, b), F.linear(x2, w, b))
        _assert_rel_close(gemm.input_grad(g2, w), g2 @ w)


def test_float64_falls_back_to_torch_ops():
    """float64 is not packed: the results are the torch ops' own (bitwise equal), and no cache entry is made."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    b = torch.randn(24, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64)
    assert not gemm.uses_onednn(w)
    assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(gemm.linear(x, w), F.linear(x, w))
    assert torch.equal(gemm.input_grad(g, w), g @ w)
    assert id(w) not in gemm._PACKED


def test_packed_cache_follows_in_place_updates_and_replacement():
    """No stale packed copy: after w.add_ (version bump), after mul_ on the forward layout, for a new weight tensor,
    and for a Parameter whose .data is replaced (new data_ptr, version unchanged), the products equal the torch ops
    on the current values. Dropping the weight removes its cache entry."""
    _need_onednn()
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(24, 16, generator=gen)
    g = torch.randn(4, 3, 24, generator=gen)
    x = torch.randn(4, 3, 16, generator=gen)
    with torch.no_grad():
        first = gemm.input_grad(g, w)
        _assert_rel_close(first, g @ w)
        lin_first = gemm.linear(x, w)
        w.add_(1.0)
        updated = gemm.input_grad(g, w)
        _assert_rel_close(updated, g @ w)
        assert float((updated - first).abs().max()) > 1.0  # the update really changed the product
        w.mul_(-0.5)
        lin = gemm.linear(x, w)
        _assert_rel_close(lin, F.linear(x, w))
        assert float((lin - lin_first).abs().max()) > 1.0

        w_new = torch.randn(24, 16, generator=gen)  # another tensor (new data_ptr, own cache entry)
        _assert_rel_close(gemm.input_grad(g, w_new), g @ w_new)
        _assert_rel_close(gemm.linear(x, w_new), F.linear(x, w_new))

        p = torch.nn.Parameter(torch.randn(24, 16, generator=gen))
        _assert_rel_close(gemm.input_grad(g, p), g @ p)
        _assert_rel_close(gemm.linear(x, p), F.linear(x, p))
        ptr, version = p.data_ptr(), p._version
        keep = p.data  # the old storage stays alive, so the new one cannot reuse its address
        p.data = torch.randn(24, 16, generator=gen)
        assert p.data_ptr() != ptr and p._version == version  # only the storage moved
        _assert_rel_close(gemm.input_grad(g, p), g @ p)
        _assert_rel_close(gemm.linear(x, p), F.linear(x, p))
        del keep

    key = id(w_new)
    assert key in gemm._PACKED
    del w_new
    assert key not in gemm._PACKED  # the weakref callback dropped the packed copies


# ---------------------------------------------------------------------------------------------------- TapePool
def test_tape_pool_reuses_storage_within_2x():
    """take() -> (flat storage, [rows, width] view of it); a given-back storage is taken again (same data_ptr) for the
    same size and for a smaller one down to half, not for less than half nor for another dtype; the smallest fitting
    storage wins; nbytes counts the free storage and trim() empties the pool."""
    pool, f32, cpu = TapePool(), torch.float32, torch.device("cpu")
    assert pool.nbytes == 0
    flat, buf = pool.take(10, 8, f32, cpu)
    assert flat.numel() == 80 and buf.shape == (10, 8) and buf.data_ptr() == flat.data_ptr()
    buf.fill_(3.0)
    assert bool((flat == 3.0).all())  # a view of the storage, not a copy
    ptr = flat.data_ptr()

    pool.give(flat)
    assert pool.nbytes == 80 * 4
    flat2, buf2 = pool.take(10, 8, f32, cpu)  # same size
    assert flat2.data_ptr() == ptr and buf2.shape == (10, 8) and pool.nbytes == 0

    pool.give(flat2)
    flat3, buf3 = pool.take(5, 8, f32, cpu)  # exactly half: still fits (80 <= 2 * 40)
    assert flat3.data_ptr() == ptr and buf3.shape == (5, 8) and buf3.data_ptr() == ptr

    pool.give(flat3)
    small, small_buf = pool.take(4, 8, f32, cpu)  # less than half (80 > 2 * 32): fresh storage
    assert small.data_ptr() != ptr and small.numel() == 32 and small_buf.shape == (4, 8)
    assert pool.nbytes == 80 * 4  # the large storage is still free
    other, _ = pool.take(10, 8, torch.float64, cpu)  # another dtype never reuses it
    assert other.data_ptr() != ptr and other.dtype == torch.float64 and pool.nbytes == 80 * 4

    pool.give(small)
    big = torch.empty(100, dtype=f32)
    pool.give(big)  # free: 80, 32, 100 elements
    pick, _ = pool.take(6, 8, f32, cpu)  # need 48: 80 and 100 fit, 32 does not -> the smallest, 80
    assert pick.data_ptr() == ptr
    pick2, _ = pool.take(10, 5, f32, cpu)  # need 50: only 100 is left that fits
    assert pick2.data_ptr() == big.data_ptr()
    assert pool.nbytes == 32 * 4

    pool.give(pick)
    pool.give(pick2)
    pool.trim()
    assert pool.nbytes == 0
    fresh, _ = pool.take(10, 8, f32, cpu)
    assert fresh.data_ptr() not in (ptr, big.data_ptr())  # both are still alive here: a new allocation


# ---------------------------------------------------------------------------------------------------- tapes
@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, one_thread):
    from megaent.model import load_hf
    from megaent.parallel import init_parallel

    d = make_tiny_hf(tmp_path_factory.mktemp("tiny") / "m", "qwen2", vocab_size=VOCAB, hidden=32, layers=1,
                     heads=2, kv_heads=1, weight_std=0.05, seed=3)
    st = init_parallel(1, 1)
    return load_hf(str(d), st, dtype=torch.float32), st


def _train_samples(engine, groups):
    from megaent.trainer.batching import TrainSample

    samples, rows = [], {}
    for i, grp in enumerate(groups):
        for j, s in enumerate(grp):
            uid = i * len(grp) + j
            samples.append(TrainSample(tokens=torch.tensor(s.prompt_ids + s.output_ids), prompt_len=len(s.prompt_ids),
                                       advantage=1.0, group=i, uid=uid))
            rows[uid] = engine.tape_row(s)
    return samples, rows


def test_released_tape_is_refused_after_clear_tapes(tiny_policy):
    """Embedded decode with record_tapes: every micro-batch replays from the tape before clear_tapes (positive
    control); after it the same and a fresh ReplaySource refuse the micro-batches, tape.act / tape.logits raise
    'released', tape_row no longer finds the samples, and the released storage (ActivationTape.nbytes_for bytes of
    every tape) sits in the engine's pool, from which the next decode of the same shape builds its tapes."""
    from megaent.rollout.embedded import EmbeddedEngine
    from megaent.rollout.types import SamplingParams
    from megaent.trainer.batching import make_micro_batches

    policy, st = tiny_policy
    engine = EmbeddedEngine(policy, st, seed=1, record_tapes=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(n=2, max_new_tokens=4, temperature=1.0, seed=7)
    groups = engine.generate(prompts, params)
    samples, rows = _train_samples(engine, groups)
    assert all(r is not None for r in rows.values()), rows
    tapes = {id(t): t for t, _ in rows.values()}
    assert len(tapes) == 1  # one decode chunk
    tape = next(iter(tapes.values()))
    assert tape.stamp == param_stamp(policy)
    mbs = make_micro_batches(samples, max_tokens=64, dp_group=st.dp_group)
    source = ReplaySource(policy, rows=rows)
    hits = [source.indices(mb) for mb in mbs]
    assert hits and all(h is not None and h[0] is tape for h in hits)
    assert len(tape.act) == 1 and tape.logits.shape[0] == tape.b * tape.m + 1
    old_ptrs = {t.data_ptr() for t in tape._storage}

    engine.clear_tapes()
    assert tape.stamp is None
    assert all(source.indices(mb) is None for mb in mbs)  # cached hit, now refused
    assert all(ReplaySource(policy, rows=rows).indices(mb) is None for mb in mbs)
    with pytest.raises(RuntimeError, match="released"):
        tape.act
    with pytest.raises(RuntimeError, match="released"):
        tape.logits
    assert all(engine.tape_row(s) is None for grp in groups for s in grp)
    shape = dict(n_prompts=tape.u, prompt_pad_len=tape.p, n_rows=tape.b, max_new=tape.m)
    assert engine._tape_pool.nbytes == ActivationTape.nbytes_for(policy, **shape) > 0

    groups2 = engine.generate(prompts, params)  # same shape: every buffer comes from the pool
    _, rows2 = _train_samples(engine, groups2)
    tape2 = next(iter(rows2.values()))[0]
    assert tape2 is not tape and tape2.stamp == param_stamp(policy)
    assert {t.data_ptr() for t in tape2._storage} == old_ptrs
    assert engine._tape_pool.nbytes == 0
    engine.clear_tapes()
    assert engine._tape_pool.nbytes == ActivationTape.nbytes_for(policy, **shape)  # one step's tapes, no more


def test_activation_tape_release_returns_buffers(tiny_policy):
    """A directly built tape: buffers sized [U*P + B*m + 1, N] / [B*m + 1, Vl] with a zero last row (+inf for the
    log-sum-exp); release() sets
    stamp None, makes act / logits raise 'released', puts all its storage (nbytes_for bytes) in the pool, and is
    idempotent (a second release gives nothing twice)."""
    policy, _ = tiny_policy
    pool = TapePool()
    shape = dict(n_prompts=2, prompt_pad_len=3, n_rows=4, max_new=2)
    tape = ActivationTape(policy, stamp=param_stamp(policy), pool=pool, **shape)
    rows = 2 * 3 + 4 * 2 + 1
    # fp32 CPU policy: the attention output and its log-sum-exp are recorded too (megaent.model.tape).
    assert [set(b) for b in tape.act] == [{"qkv", "proj", "gate_up", "down", "attn", "lse"}]
    for name, buf in tape.act[0].items():
        assert buf.shape[0] == rows, name
        if name == "lse":  # the unfed row: +inf, so its attention weights exp(s - lse) are exactly 0
            assert bool(torch.isposinf(buf[-1]).all())
        else:
            assert not bool(buf[-1].any()), name
    assert tape.logits.shape == (4 * 2 + 1, policy.padded_vocab_size) and not bool(tape.logits[-1].any())
    assert pool.nbytes == 0
    tape.release()
    assert tape.stamp is None
    with pytest.raises(RuntimeError, match="released"):
        tape.act
    with pytest.raises(RuntimeError, match="released"):
        tape.logits
    need = ActivationTape.nbytes_for(policy, **shape)
    assert pool.nbytes == need > 0
    tape.release()
    assert pool.nbytes == need


# ---------------------------------------------------------------------------------------------------- host
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_keep_freed_memory_applies_and_is_idempotent(monkeypatch):
    """On Linux/glibc mallopt accepts the settings (True); a second call returns True from the first one's result,
    without loading libc again (ctypes.CDLL is made to fail for it)."""
    import ctypes

    from megaent.trainer import host

    monkeypatch.setattr(host, "_done", False)  # a fresh process's state, whatever ran before
    assert host.keep_freed_memory() is True
    assert host._done is True

    def refuse(*a, **k):
        raise AssertionError("libc loaded again")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    assert host.keep_freed_memory() is True


@pytest.mark.parametrize("n, k", [(48, 16), (16, 48), (24, 24)])
def test_weight_grad_matches_torch(n, k):
    """`gemm.weight_grad(g, x)` = g^T x over all leading positions, whichever operand is the narrower one
    (the two oneDNN orientations), 3-D inputs; float64 falls back to the torch product exactly."""
    torch.manual_seed(n * 100 + k)
    g, x = torch.randn(2, 37, n), torch.randn(2, 37, k)
    ref = g.reshape(-1, n).t() @ x.reshape(-1, k)
    out = gemm.weight_grad(g, x)
    _assert_rel_close(out, ref)
    assert out.is_contiguous()
    gd, xd = g.double(), x.double()
    assert torch.equal(gemm.weight_grad(gd, xd), gd.reshape(-1, n).t() @ xd.reshape(-1, k))
