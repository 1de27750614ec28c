"""oneDNN fast path of the TP linears (`megaent.model.layers._ColumnParallelLinear` / `_RowParallelLinear`).

On fp32 CPU the layers' forward/backward GEMMs run on `megaent.ops.gemm` (prepacked oneDNN) inside `_CpuLinear`,
with megatron-core's collectives around them. Checks:
- single process: output and the gradients of input, weight and bias equal a plain torch reference (F.linear
  with autograd) and megatron's own forward, to fp32 rounding (relative 1e-5 of the magnitude), for
  column-parallel (bias, no bias, skip_bias_add, the `weight=` argument of the tied head) and row-parallel
  layers on 3-D inputs; a whole `DecoderLayer` matches itself with the fast path off;
- the path is really taken (gemm.linear / input_grad / weight_grad are counted), and is not taken where megatron's
  forward must run (fp64, gather_output, torch.compile is covered by tests/test_compile.py); an instance-level
  `forward` (what `megaent.model.tape.replaying` sets) still wins; a frozen weight keeps megatron's gradients;
- TP = 2 over gloo: the sharded layers' outputs, input gradients and weight-gradient shards equal a
  single-process full-weight reference.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_fast_linear.py
"""
from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dist import run_ranks

B, S, K, N = 2, 5, 16, 24  # tiny: [B, S, K] inputs, [N, K] full weights


def _close(a: torch.Tensor, b: torch.Tensor, what: str = "", rel: float = 1e-5) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err, mag = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rel * max(mag, 1e-30), f"{what}: max |diff| {err:.3e} > {rel} * {mag:.3e}"


@contextlib.contextmanager
def _count_gemm():
    """Count calls of gemm.linear / input_grad / weight_grad (they still compute)."""
    from megaent.ops import gemm

    calls: Counter = Counter()
    saved = {n: getattr(gemm, n) for n in ("linear", "input_grad", "weight_grad")}

    def wrap(name, fn):
        def f(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return f

    for n, fn in saved.items():
        setattr(gemm, n, wrap(n, fn))
    try:
        yield calls
    finally:
        for n, fn in saved.items():
            setattr(gemm, n, fn)


def _data(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, S, K, generator=g, dtype=dtype),
            "w": torch.randn(N, K, generator=g, dtype=dtype) / K ** 0.5,
            "b": torch.randn(N, generator=g, dtype=dtype),
            "xr": torch.randn(B, S, N, generator=g, dtype=dtype),  # row-parallel input (full)
            "wr": torch.randn(K, N, generator=g, dtype=dtype) / N ** 0.5,
            "br": torch.randn(K, generator=g, dtype=dtype),
            "gy": torch.randn(B, S, N, generator=g, dtype=dtype),  # loss weights of column outputs
            "gyr": torch.randn(B, S, K, generator=g, dtype=dtype)}


def _column(st, k, n, *, bias, skip_bias_add=False, gather_output=False, dtype=torch.float32,
            skip_weight_param_allocation=False):
    from megaent.model.layers import _ColumnParallelLinear, _no_init, tp_layer_config

    return _ColumnParallelLinear(k, n, config=tp_layer_config(dtype), init_method=_no_init, bias=bias,
                                 gather_output=gather_output, skip_bias_add=skip_bias_add, tp_group=st.tp_group,
                                 skip_weight_param_allocation=skip_weight_param_allocation)


def _row(st, k, n, *, bias, skip_bias_add=False, dtype=torch.float32):
    from megaent.model.layers import _RowParallelLinear, _no_init, tp_layer_config

    return _RowParallelLinear(k, n, config=tp_layer_config(dtype), init_method=_no_init, bias=bias,
                              input_is_parallel=True, skip_bias_add=skip_bias_add, tp_group=st.tp_group)


def _fill(layer, w, b=None):
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(w)
        if layer.bias is not None:
            layer.bias.copy_(b)
    return layer


def _run(layer, x0, gy, forward=None, **kw):
    """(output incl. bias, returned bias, dx, dW, db) for loss sum(out * gy) (out = y + returned bias)."""
    layer.zero_grad()
    x = x0.clone().requires_grad_()
    y, ob = (forward or layer)(x, **kw)
    out = y + ob if ob is not None else y
    (out * gy).sum().backward()
    w = kw.get("weight", layer.weight)
    return (out.detach(), ob, x.grad, w.grad.clone() if w.grad is not None else None,
            layer.bias.grad.clone() if layer.bias is not None and layer.bias.grad is not None else None)


def _reference(x0, w0, b0, gy):
    """Plain torch: F.linear with autograd."""
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    b = b0.clone().requires_grad_() if b0 is not None else None
    out = F.linear(x, w, b)
    (out * gy).sum().backward()
    return out.detach(), x.grad, w.grad, (b.grad if b is not None else None)


@pytest.fixture(scope="module")
def st():
    from megaent.parallel import init_parallel

    return init_parallel(1, 1)


# ------------------------------------------------------------------------------------------- single process
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("bias,skip", [(False, False), (True, False), (True, True)])
def test_layer_matches_torch_and_megatron(st, kind, bias, skip):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if kind == "column":
        d = _data(0)
        x, w, b, gy = d["x"], d["w"], d["b"], d["gy"]
        layer, base = _fill(_column(st, K, N, bias=bias, skip_bias_add=skip), w, b), ColumnParallelLinear
    else:
        d = _data(1)
        x, w, b, gy = d["xr"], d["wr"], d["br"], d["gyr"]
        layer, base = _fill(_row(st, N, K, bias=bias, skip_bias_add=skip), w, b), RowParallelLinear
    with _count_gemm() as calls:
        out, ob, dx, dw, db = _run(layer, x, gy)
    assert calls == {"linear": 1, "input_grad": 1, "weight_grad": 1}, calls
    assert (ob is layer.bias) if skip else ob is None
    r_out, r_dx, r_dw, r_db = _reference(x, w, b if bias else None, gy)
    _close(out, r_out, "out")
    _close(dx, r_dx, "dx")
    _close(dw, r_dw, "dW")
    if bias:
        _close(db, r_db, "db")
    # megatron's own forward of the same layer (MKL matmul) agrees as well
    with _count_gemm() as calls:
        m = _run(layer, x, gy, forward=lambda inp: base.forward(layer, inp))
    assert sum(calls.values()) == 0
    for a, b_, what in zip((out, dx, dw, db), (m[0], m[2], m[3], m[4]), ("out", "dx", "dW", "db")):
        if b_ is not None:
            _close(a, b_, f"vs megatron {what}")


def test_column_weight_argument(st):
    """The tied LM head: no weight of its own, `weight=` the embedding's."""
    d = _data(2)
    layer = _column(st, K, N, bias=False, skip_weight_param_allocation=True)
    w = d["w"].clone().requires_grad_()
    with _count_gemm() as calls:
        out, _, dx, dw, _ = _run(layer, d["x"], d["gy"], weight=w)
    assert calls["linear"] == 1 and calls["weight_grad"] == 1
    r_out, r_dx, r_dw, _ = _reference(d["x"], d["w"], None, d["gy"])
    _close(out, r_out, "out")
    _close(dx, r_dx, "dx")
    _close(dw, r_dw, "dW")
    with pytest.raises(RuntimeError, match="shape"):  # megatron's check of a wrong weight
        layer(d["x"], weight=torch.zeros(N + 1, K))


def test_fallbacks_and_overrides(st):
    d = _data(3, torch.float64)
    # fp64: megatron's forward, same values
    layer = _fill(_column(st, K, N, bias=True, dtype=torch.float64), d["w"], d["b"])
    with _count_gemm() as calls:
        out, _, dx, dw, db = _run(layer, d["x"], d["gy"])
    assert sum(calls.values()) == 0
    r = _reference(d["x"], d["w"], d["b"], d["gy"])
    for a, b_, what in zip((out, dx, dw, db), r, ("out", "dx", "dW", "db")):
        _close(a, b_, what)
    # gather_output (also at runtime): megatron's forward
    d = _data(3)
    layer = _fill(_column(st, K, N, bias=True, gather_output=True), d["w"], d["b"])
    with _count_gemm() as calls:
        out = layer(d["x"])[0]
        layer.gather_output = False
        out2 = layer(d["x"], runtime_gather_output=True)[0]
    assert sum(calls.values()) == 0
    _close(out, F.linear(d["x"], d["w"], d["b"]), "gathered")
    _close(out2, out, "runtime gathered")
    # an instance-level forward (megaent.model.tape.replaying) beats the class method
    layer.forward = lambda x, weight=None, runtime_gather_output=None: ("patched", None)
    assert layer(d["x"])[0] == "patched"
    del layer.forward
    with _count_gemm() as calls:
        layer(d["x"])
    assert calls["linear"] == 1
    # an instance-level _forward_impl (megaent.model.fp8) keeps megatron's forward, which calls it
    seen = []
    layer._forward_impl = lambda **kw: seen.append(1) or F.linear(kw["input"], kw["weight"], kw["bias"])
    with _count_gemm() as calls:
        layer(d["x"])
    assert seen and sum(calls.values()) == 0
    del layer._forward_impl
    # empty input: megatron's path (oneDNN refuses M = 0)
    assert layer(torch.zeros(0, S, K))[0].shape == (0, S, N)


def test_frozen_weight_keeps_megatron_grads(st):
    """weight.requires_grad False: megatron's LinearWithFrozenWeight gives x a gradient, bias none."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    d = _data(4)
    layer = _fill(_column(st, K, N, bias=True), d["w"], d["b"])
    layer.weight.requires_grad_(False)
    with _count_gemm() as calls:
        fast = _run(layer, d["x"], d["gy"])
    assert calls == {"linear": 1, "input_grad": 1}, calls
    slow = _run(layer, d["x"], d["gy"], forward=lambda x: ColumnParallelLinear.forward(layer, x))
    assert fast[3] is None and slow[3] is None and fast[4] is None and slow[4] is None
    _close(fast[0], slow[0], "out")
    _close(fast[2], slow[2], "dx")
    with torch.no_grad(), _count_gemm() as calls:  # inference: forward only
        _close(layer(d["x"])[0], slow[0], "no_grad out")
    assert calls == {"linear": 1}


def test_decoder_layer_fast_equals_megatron(st, monkeypatch):
    """A whole decoder layer (qkv with bias, proj, gate_up, down): fast path vs megatron's forward."""
    from megaent.model import layers as L
    from megaent.model.arch import ModelArch
    from megaent.model.rope import inv_frequencies, rope_cos_sin

    arch = ModelArch(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                     rope_theta=10000.0, qkv_bias=True)
    layer = L.DecoderLayer(arch, tp_group=st.tp_group, tp=1, config=L.tp_layer_config(torch.float32))
    assert isinstance(layer.attn.qkv, L._ColumnParallelLinear) and isinstance(layer.mlp.gate_up,
                                                                              L._ColumnParallelLinear)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x0 = torch.randn(2, 7, 32, generator=g)
    pos = torch.arange(7)[None].expand(2, 7)
    cos, sin = rope_cos_sin(inv_frequencies(arch), pos, torch.float32)
    gy = torch.randn(2, 7, 32, generator=g)

    def run():
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        out = layer(x, cos, sin, None)
        (out * gy).sum().backward()
        return [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]

    with _count_gemm() as calls:
        fast = run()
    assert calls == {"linear": 4, "input_grad": 4, "weight_grad": 4}, calls
    monkeypatch.setattr(L, "_fast_linear_ok", lambda *a: False)
    with _count_gemm() as calls:
        slow = run()
    assert sum(calls.values()) == 0
    names = ["out", "dx"] + [n for n, _ in layer.named_parameters()]
    for a, b_, what in zip(fast, slow, names):
        _close(a, b_, what, rel=1e-5)


# ------------------------------------------------------------------------------------------- TP = 2 (gloo)
def _tp2_rank(rank, world):
    from megaent.parallel import init_parallel

    st = init_parallel(2, 1)
    d = _data(7)
    nl, kl = N // 2, N // 2
    rows = slice(st.tp_rank * nl, (st.tp_rank + 1) * nl)
    res = {}
    with _count_gemm() as calls:
        for skip in (False, True):
            col = _fill(_column(st, K, N, bias=True, skip_bias_add=skip), d["w"][rows], d["b"][rows])
            out, ob, dx, dw, db = _run(col, d["x"], d["gy"][..., rows])
            res[f"col{int(skip)}"] = (out, dx, dw, db, ob is not None)
            row = _fill(_row(st, N, K, bias=True, skip_bias_add=skip), d["wr"][:, rows], d["br"])
            out, ob, dx, dw, db = _run(row, d["xr"][..., rows], d["gyr"])
            res[f"row{int(skip)}"] = (out, dx, dw, db, ob is not None)
    res["calls"] = dict(calls)
    res["tp_rank"] = st.tp_rank
    return res


@pytest.mark.slow
def test_tp2_matches_full_weight():
    d = _data(7)
    col_ref = _reference(d["x"], d["w"], d["b"], d["gy"])
    row_ref = _reference(d["xr"], d["wr"], d["br"], d["gyr"])
    results = run_ranks(_tp2_rank, 2)
    nl = N // 2
    for res in results:
        assert res["calls"] == {"linear": 4, "input_grad": 4, "weight_grad": 4}, res["calls"]
        rows = slice(res["tp_rank"] * nl, (res["tp_rank"] + 1) * nl)
        for skip in (0, 1):
            out, dx, dw, db, returned = res[f"col{skip}"]
            assert returned == bool(skip)
            _close(out, col_ref[0][..., rows], f"col{skip} out")
            _close(dx, col_ref[1], f"col{skip} dx (all-reduced)")
            _close(dw, col_ref[2][rows], f"col{skip} dW shard")
            _close(db, col_ref[3][rows], f"col{skip} db shard")
            out, dx, dw, db, returned = res[f"row{skip}"]
            assert returned == bool(skip)
            _close(out, row_ref[0], f"row{skip} out (all-reduced)")
            _close(dx, row_ref[1][..., rows], f"row{skip} dx shard")
            _close(dw, row_ref[2][:, rows], f"row{skip} dW shard")
            _close(db, row_ref[3], f"row{skip} db")
