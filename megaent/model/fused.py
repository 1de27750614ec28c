"""Hand-written autograd for the elementwise blocks between the linears: RoPE, fp32 RMSNorm, SwiGLU.

Eager autograd runs each of these as a chain of small kernels, each reading and writing the whole
[tokens, width] tensor, and saves intermediates for a backward of as many kernels again (RoPE's
`rotate_half` is a `cat` of a negated half; the SwiGLU `chunk` comes back as a zero-filled concatenation).
On CPU, where these tensors are memory-bound, that traffic is a visible share of an update step. The
Functions here compute the same values with fewer passes and save only what the backward needs:

- RoPE: out = [x1 c - x2 s, x2 c + x1 s] (c, s: one half of cos/sin, whose two halves are equal) written
  into one buffer; the backward is the inverse rotation (sin negated); only cos/sin are saved.
- RMSNorm (fp32): y = x r w with r = rsqrt(mean(x^2) + eps) [.., 1]; backward
  dx = r (g w - x^ mean(g w x^)), dw = sum(g x^), x^ = x r; saves x and r.
- SwiGLU: silu(gate) * up from the fused gate_up output; the backward writes d_gate and d_up into one
  [.., 2F] buffer (torch's `silu_backward` kernel); saves gate_up only (the linear's output, kept anyway).

Values equal the plain formulation to rounding (tests/test_fused.py); under `torch.compile` the plain
formulation is used, so Inductor fuses it its own way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ---- RoPE ------------------------------------------------------------------------------------------------------
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """[x1 c - sign x2 s, x2 c + sign x1 s] for x [B, N, S, D], cos/sin [B, 1, S, D]; the result is laid out as
    [B, S, N, D] in memory (what attention's [B, S, N*D] reshapes read without a copy)."""
    h = x.shape[-1] // 2
    c, s = cos[..., :h], sin[..., :h]
    b, n, seq, d = x.shape
    out = torch.empty((b, seq, n, d), dtype=torch.result_type(x, cos), device=x.device).transpose(1, 2)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=sign)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(g, cos, sin, -1.0), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding of x [B, N, S, D] with cos/sin [B, 1, S, D] (both halves of each equal)."""
    grad = torch.is_grad_enabled() and x.requires_grad
    # Tiny inputs (a decode step) without autograd: the plain form has fewer dispatches (24 vs 33 us per call).
    if _compiling() or cos.requires_grad or sin.requires_grad or (not grad and x.numel() < 1 << 16):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
    if not grad:
        return _rotate(x, cos, sin, 1.0)
    return _Rope.apply(x, cos, sin)


# ---- RMSNorm ---------------------------------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, w, r)
        return (x * r).mul_(w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w, r = ctx.saved_tensors
        xhat = x * r
        dw = (g * xhat).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, dw, None
        gw = g * w
        c = (gw * xhat).mean(-1, keepdim=True)
        return gw.sub_(xhat.mul_(c)).mul_(r), dw, None


def rms_norm_fp32(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x * rsqrt(mean(x^2) + eps) over the last dim, x and w fp32."""
    if _compiling() or not torch.is_grad_enabled() or not (x.requires_grad or w.requires_grad):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    return _RMSNorm.apply(x, w, eps)


# ---- SwiGLU ----------------------------------------------------------------------------------------------------
class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.mul(g, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=d_gate)
        return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate, up] on the last dim."""
    if _compiling() or not (torch.is_grad_enabled() and gate_up.requires_grad):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(gate_up)
