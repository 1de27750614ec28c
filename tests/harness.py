"""Shared test harness pieces (not references): an optimizer stand-in that captures gradients, and a runner that
returns an attention function's output with its input gradients."""
from __future__ import annotations

from typing import Callable

import torch


class KeepGrads:
    """Optimizer stand-in for `train_mini_batch`: `step()` keeps a copy of every gradient and changes nothing. A
    parameter without a gradient is an error, or zeros with `missing_as_zero`."""

    def __init__(self, policy, *, missing_as_zero: bool = False) -> None:
        self.policy, self.grads, self.missing_as_zero = policy, None, missing_as_zero

    def zero_grad(self) -> None:
        for p in self.policy.parameters():
            p.grad = None

    def step(self) -> dict[str, float]:
        params = list(self.policy.named_parameters())
        missing = [n for n, p in params if p.grad is None]
        if missing and not self.missing_as_zero:
            raise AssertionError(f"parameters without a gradient: {missing}")
        self.grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for _, p in params]
        return {"grad_norm": 0.0, "lr": 0.0}


def attention_with_grads(fn: Callable, q0: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, w: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """out = fn(q, k, v) on fresh leaf copies of q0/k0/v0, backward of sum(out * w): (out, dq, dk, dv)."""
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    out = fn(q, k, v)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad
