"""Shared test harness pieces (not references): a runner that returns an attention function's output with its input
gradients."""
from __future__ import annotations

from typing import Callable

import torch


def attention_with_grads(fn: Callable, q0: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, w: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """out = fn(q, k, v) on fresh leaf copies of q0/k0/v0, backward of sum(out * w): (out, dq, dk, dv)."""
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    out = fn(q, k, v)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad
