"""fp32 CPU GEMMs through oneDNN with prepacked weights: the linears' forward and input-gradient products.

torch's CPU `matmul` / `F.linear` call MKL's sgemm. oneDNN (MKL-DNN, in every x86 torch build) runs the same
product on a weight stored once in its blocked layout (`_reorder_linear_weight`, what TorchInductor's CPU
weight prepacking uses) and is much faster on the machines we measured: on an AVX-512 AMD EPYC with 2
threads, ~480 GFLOP/s against MKL's ~220 for the training's [4216 x 1408] x [1408 x 256] input gradient,
the same fp32 arithmetic (results agree to summation-order rounding). The weight gradient dW = dy^T x has
two activations as operands: nothing to prepack; oneDNN packs one of them from its transposed view and
needs the other transposed into a contiguous copy (the narrower one), and still beats MKL's
`g.t() @ x` in the step (0.53 vs 0.64 s per bench_peer step, all other things equal).

A packed copy is cached per weight tensor and rebuilt when its storage or version counter moves (every
optimizer step and weight load), so it always holds the current values. Other dtypes and devices, and
torch builds without oneDNN, use the plain torch ops.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F


def onednn_prepack_available() -> bool:
    """Whether this torch build has the oneDNN prepacked-linear ops (CPU builds with MKLDNN)."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


_ONEDNN = onednn_prepack_available()
# id(weight) -> (weakref to it, {transposed?: (data_ptr, version, packed)}); a dropped weight frees its entry.
_PACKED: dict[int, tuple[weakref.ref, dict[bool, tuple[int, int, torch.Tensor]]]] = {}


def uses_onednn(w: torch.Tensor) -> bool:
    """Whether products with weight `w` go through the prepacked oneDNN path."""
    return _ONEDNN and w.device.type == "cpu" and w.dtype == torch.float32


def prepack(w: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """oneDNN-packed copy of a [N, K] weight for y = x w^T (rows_hint: the typical number of rows of x)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows_hint)


def _packed(w: torch.Tensor, *, transposed: bool, rows_hint: int) -> torch.Tensor:
    entry = _PACKED.get(id(w))
    if entry is None or entry[0]() is not w:
        key_id = id(w)
        entry = _PACKED[key_id] = (weakref.ref(w, lambda _, k=key_id: _PACKED.pop(k, None)), {})
    per = entry[1]
    hit = per.get(transposed)
    key = (w.data_ptr(), w._version)
    if hit is None or hit[:2] != key:
        src = w.detach().t().contiguous() if transposed else w.detach()
        hit = per[transposed] = (*key, prepack(src, rows_hint))
    return hit[2]


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x w^T (+ bias) for a weight packed by `prepack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x w^T (+ bias), x [..., K], w [N, K] (no autograd through the packed path: use in Functions)."""
    if not uses_onednn(w) or x.dtype != w.dtype:
        return F.linear(x, w, bias)
    x2 = x.reshape(-1, x.shape[-1])
    y = packed_linear(x2, _packed(w, transposed=False, rows_hint=x2.shape[0]), bias)
    return y.view(*x.shape[:-1], w.shape[0])


def input_grad(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dx = g w for y = x w^T: g [..., N], w [N, K] -> [..., K]."""
    if not uses_onednn(w) or g.dtype != w.dtype:
        return g @ w
    g2 = g.reshape(-1, g.shape[-1])
    out = packed_linear(g2, _packed(w, transposed=True, rows_hint=g2.shape[0]))
    return out.view(*g.shape[:-1], w.shape[1])


def weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = g^T x for y = x w^T: g [..., N], x [..., K] -> [N, K] (summed over all leading positions)."""
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    if not uses_onednn(g2) or x2.dtype != g2.dtype:
        return g2.t() @ x2
    # oneDNN wants its source operand row-major and packs its "weight" operand itself from any strides: the
    # narrower of the two activations is the one transposed into a contiguous copy.
    if x2.shape[1] < g2.shape[1]:
        return packed_linear(x2.t().contiguous(), g2.t()).t().contiguous()  # (x^T g)^T
    return packed_linear(g2.t().contiguous(), x2.t())


def linear_backward(g: torch.Tensor, x: Optional[torch.Tensor], w: Optional[torch.Tensor], needs: tuple[bool, ...],
                    has_bias: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dW, db) of y = x w^T + b for the upstream gradient g [..., N], each None unless `needs` (autograd's
    needs_input_grad for (x, w, b)) asks for it; dx takes g's leading shape. x is read only for dW and w only
    for dx, so a Function may save just what its needs ask for."""
    g2 = g.reshape(-1, g.shape[-1])
    gx = input_grad(g2, w).view(*g.shape[:-1], w.shape[1]) if needs[0] else None
    gw = weight_grad(g2, x) if needs[1] else None
    gb = g2.sum(0) if has_bias and needs[2] else None
    return gx, gw, gb
