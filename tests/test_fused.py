"""megaent.model.fused (hand-written RoPE / RMSNorm / SwiGLU autograd) against the plain formulations:
same values and same gradients, on the strided views the model feeds them (q/k heads sliced out of qkv)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaent.model import fused


def _plain_rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _cos_sin(seq: int, d: int, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = (torch.arange(seq, dtype=torch.float64) % 37)[:, None] * inv
    emb = torch.cat([ang, ang], dim=-1)[None, None]  # [1, 1, S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _grads(fn, leaves, g):
    for t in leaves:
        t.grad = None
    fn().backward(g)
    return [t.grad.clone() for t in leaves]


def test_rope_matches_plain_on_qkv_views():
    torch.manual_seed(0)
    b, s, nq, nkv, d = 2, 33, 4, 2, 16
    qkv = torch.randn(b, s, (nq + 2 * nkv) * d, dtype=torch.float64, requires_grad=True)
    cos, sin = _cos_sin(s, d, torch.float64)

    def heads():  # [B, N, S, D] views of the q and k columns of qkv, as SelfAttention makes them
        return qkv[..., :(nq + nkv) * d].view(b, s, nq + nkv, d).transpose(1, 2)

    got, want = fused.rope(heads(), cos, sin), _plain_rope(heads(), cos, sin)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert got.transpose(1, 2).is_contiguous()  # [B, S, N, D] in memory: attention's reshape needs no copy
    g = torch.randn_like(want)
    (ga,), (gb,) = _grads(lambda: fused.rope(heads(), cos, sin), [qkv], g), \
        _grads(lambda: _plain_rope(heads(), cos, sin), [qkv], g)
    assert torch.allclose(ga, gb, rtol=0, atol=1e-12)
    assert ga[..., (nq + nkv) * d:].abs().max() == 0  # v columns get no gradient from RoPE
    with torch.no_grad():  # no autograd, tiny (a decode step: the plain form) and large (the two-pass kernel)
        assert torch.allclose(fused.rope(heads(), cos, sin), want, rtol=0, atol=1e-12)
        big = torch.randn(2, 8, 512, d, dtype=torch.float64)  # >= 2^16 elements
        cb, sb = _cos_sin(512, d, torch.float64)
        assert big.numel() >= 1 << 16
        assert torch.allclose(fused.rope(big, cb, sb), _plain_rope(big, cb, sb), rtol=0, atol=1e-12)


def test_rms_norm_fp32_matches_plain():
    torch.manual_seed(1)
    x = torch.randn(3, 17, 64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(64)).requires_grad_()
    eps = 1e-6

    def plain():
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    assert torch.allclose(fused.rms_norm_fp32(x, w, eps), plain(), rtol=1e-6, atol=1e-6)
    g = torch.randn(3, 17, 64)
    ga = _grads(lambda: fused.rms_norm_fp32(x, w, eps), [x, w], g)
    gb = _grads(plain, [x, w], g)
    for a, b_ in zip(ga, gb):
        assert torch.allclose(a, b_, rtol=1e-5, atol=1e-5)
    # Float64 through the Function's math (gradcheck of the hand-written backward).
    xd = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    wd = (1 + 0.3 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b_: fused._RMSNorm.apply(a, b_, 1e-6), (xd, wd))


def test_swiglu_matches_plain():
    torch.manual_seed(2)
    gate_up = torch.randn(2, 9, 2 * 24, requires_grad=True)

    def plain():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    assert torch.allclose(fused.swiglu(gate_up), plain(), rtol=0, atol=1e-6)
    g = torch.randn(2, 9, 24)
    (ga,), (gb,) = _grads(lambda: fused.swiglu(gate_up), [gate_up], g), _grads(plain, [gate_up], g)
    assert torch.allclose(ga, gb, rtol=1e-6, atol=1e-6)
    gd = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused._SwiGLU.apply, (gd,))
